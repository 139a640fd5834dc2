"""``systemd-unit``: a hardened systemd service file for this gateway, printed for
the operator to install (pure: paths in, text out)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

# Above the connections the gateway may hold and the backend connections beside them.
LIMIT_NOFILE = 65536
# Seconds systemd waits after SIGTERM beyond the drain before it kills.
STOP_MARGIN_S = 15


@dataclass(frozen=True, slots=True)
class UnitPaths:
    """Absolute paths the unit refers to."""

    command: tuple[str, ...]  # how to start ollama-proxy, without the subcommand
    config: str | None  # the ini file, if any
    database: str  # the SQLite file (its folder is the one the service may write)
    pythonpath: str | None = None  # a source checkout to import from (not for a .pyz)


def _under(path: str, *tops: str) -> bool:
    return any(path == top or path.startswith(top + "/") for top in tops)


def _escape(text: str) -> str:
    """A value as a unit file reads it literally: ``%`` starts a specifier there."""
    return text.replace("%", "%%")


def _command(argv: list[str]) -> str:
    """``ExecStart``'s words: quoted like a shell's, ``%`` and ``$`` taken literally."""
    return _escape(shlex.join(argv)).replace("$", "$$")


def render_unit(paths: UnitPaths, *, user: str, drain_s: float, port: int) -> str:
    """The unit file's text. The service may write only the database's folder
    (ledger, WAL files, the key-hashing secret); everything else is read-only. It
    holds no capability but the one a ``port`` below 1024 needs."""
    folder = os.path.dirname(paths.database) or "/"
    serve = [*paths.command, "serve", *(["--config", paths.config] if paths.config else [])]
    in_home = any(_under(p, "/home", "/root", "/run/user")
                  for p in (folder, paths.config or "", *paths.command))
    environment = (f"Environment={_escape(shlex.quote('PYTHONPATH=' + paths.pythonpath))}\n"
                   if paths.pythonpath else "")
    # systemd makes a folder under /var/lib for the service's user (and keeps it owned by
    # it); anywhere else the folder must exist before the start.
    state = (f"StateDirectory={folder[len('/var/lib/'):]}\n"
             if _under(folder, "/var/lib") and folder != "/var/lib" else "")
    # A private /tmp would hide a database kept in /tmp from everyone else (and lose it).
    private_tmp = "false" if _under(folder, "/tmp", "/var/tmp") else "true"
    capability = "CAP_NET_BIND_SERVICE" if 0 < port < 1024 else ""
    ambient = f"AmbientCapabilities={capability}\n" if capability else ""
    return f"""\
# ollama-proxy as a systemd service. Install:
#   sudo cp ollama-proxy.service /etc/systemd/system/
#   sudo systemctl daemon-reload && sudo systemctl enable --now ollama-proxy
# Reload the config without a restart: sudo systemctl reload ollama-proxy (SIGHUP).
[Unit]
Description=ollama-proxy: authenticating, metering gateway for Ollama and OpenAI-compatible servers
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
WorkingDirectory={_escape(folder)}
ExecStart={_command(serve)}
ExecReload=/bin/kill -HUP $MAINPID
{environment}# Secrets (OLLAMA_PROXY_ADMIN_KEY, backends' api_key_env) from a root-only file:
#EnvironmentFile=/etc/ollama-proxy.env
Restart=on-failure
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec={int(drain_s) + STOP_MARGIN_S}
LimitNOFILE={LIMIT_NOFILE}
NoNewPrivileges=true
ProtectSystem=strict
{state}ReadWritePaths={_escape(folder)}
ProtectHome={"read-only" if in_home else "true"}
PrivateTmp={private_tmp}
PrivateDevices=true
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=true
RestrictRealtime=true
RestrictSUIDSGID=true
LockPersonality=true
MemoryDenyWriteExecute=true
SystemCallArchitectures=native
{ambient}CapabilityBoundingSet={capability}
UMask=0077

[Install]
WantedBy=multi-user.target
"""
