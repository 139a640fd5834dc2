"""``systemd-unit``: a hardened service file that starts this gateway with its config."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

from ollama_proxy.cli.systemd import UnitPaths, render_unit

REPO = Path(__file__).resolve().parents[2]


def parse(text: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(text)
    return unit


def test_unit_for_a_pyz_is_hardened_and_writes_only_the_database_folder():
    """The .pyz's unit: no privileges, a read-only system but the database folder,
    restarts on failure, reloads with SIGHUP, room for many connections."""
    paths = UnitPaths(command=("/usr/bin/python3", "/opt/ollama-proxy/ollama-proxy.pyz"),
                      config="/etc/ollama-proxy.ini", database="/var/lib/ollama-proxy/db.sqlite")
    service = parse(render_unit(paths, user="gw", drain_s=30, port=8080))["Service"]
    assert service["ExecStart"] == ("/usr/bin/python3 /opt/ollama-proxy/ollama-proxy.pyz serve "
                                    "--config /etc/ollama-proxy.ini")
    assert service["User"] == "gw" and service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ReadWritePaths"] == service["WorkingDirectory"] == "/var/lib/ollama-proxy"
    assert (service["NoNewPrivileges"], service["ProtectSystem"], service["ProtectHome"],
            service["Restart"]) == ("true", "strict", "true", "on-failure")
    assert int(service["LimitNOFILE"]) >= 65536 and service["CapabilityBoundingSet"] == ""
    assert int(service["TimeoutStopSec"]) > 30  # the drain fits before systemd kills
    assert service["StateDirectory"] == "ollama-proxy"  # systemd makes it, owned by the user
    assert service["PrivateTmp"] == "true" and "Environment" not in service


def test_paths_are_taken_literally_and_a_database_in_tmp_is_not_hidden():
    """``%`` and ``$`` in paths are escaped for systemd; outside /var/lib no
    StateDirectory; a database in /tmp is not put in a private /tmp."""
    paths = UnitPaths(command=("/usr/bin/python3", "/opt/100%/$HOME.pyz"), config=None,
                      database="/tmp/gw %d/db")
    service = parse(render_unit(paths, user="gw", drain_s=5, port=8080))["Service"]
    assert service["ExecStart"] == "/usr/bin/python3 '/opt/100%%/$$HOME.pyz' serve"
    assert service["ReadWritePaths"] == "/tmp/gw %%d" and service["PrivateTmp"] == "false"
    assert "StateDirectory" not in service


def test_a_privileged_port_gets_only_the_capability_to_bind_it():
    """Listening below 1024 needs CAP_NET_BIND_SERVICE, and nothing else."""
    paths = UnitPaths(command=("/usr/bin/python3", "/opt/p.pyz"), config=None,
                      database="/var/lib/p/db")
    service = parse(render_unit(paths, user="gw", drain_s=5, port=443))["Service"]
    assert service["AmbientCapabilities"] == service["CapabilityBoundingSet"] == \
        "CAP_NET_BIND_SERVICE"
    assert service["ExecStart"].endswith(" serve")


def test_the_command_uses_the_config_and_its_database(tmp_path: Path):
    """From a source checkout: python -m ollama_proxy with PYTHONPATH, the config's
    absolute path, and the database's folder as the one writable path."""
    config = tmp_path / "gw.ini"
    config.write_text("[server]\ndatabase = data/gw.db\nlisten = 127.0.0.1:9000\n")
    proc = subprocess.run([sys.executable, "-m", "ollama_proxy", "systemd-unit", "--config",
                           str(config), "--user", "svc"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr
    service = parse(proc.stdout)["Service"]
    assert service["ExecStart"] == f"{sys.executable} -m ollama_proxy serve --config {config}"
    assert service["Environment"] == f"PYTHONPATH={REPO}"
    assert service["ReadWritePaths"] == str(tmp_path / "data") and service["User"] == "svc"
