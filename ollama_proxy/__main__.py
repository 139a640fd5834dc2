"""Command line: ``python3 ollama-proxy.pyz COMMAND`` (same as ``python3 -m ollama_proxy``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import trio

from . import __version__
from .cli.admin import add_admin_commands
from .config import ADMIN_KEY_ENV, Config, describe, load_config
from .errors import CommandError, ConfigError


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(args: argparse.Namespace, upstreams: Sequence[str] = ()) -> Config:
    return load_config(args.config, listen=getattr(args, "listen", None),
                       upstream_urls=upstreams or getattr(args, "upstream", None) or ())


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import Gateway

    config = _load(args)
    _setup_logging(config.log.level)
    gateway = Gateway(config, admin_key=os.environ.get(ADMIN_KEY_ENV) or None,
                      loader=lambda: _load(args))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(lambda task_status: gateway.run(
                handle_signals=True, task_status=task_status))
            names = ", ".join(f"{u.name}={u.url}" for u in config.upstreams)
            logging.getLogger("ollama_proxy").info(
                "ollama-proxy %s listening on http://%s:%d, backends: %s; at most %d connections",
                __version__, host, port, names, gateway.server.settings.max_connections)
        logging.getLogger("ollama_proxy").info("stopped")

    trio.run(main)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .cli.demo import run_demo

    return run_demo(args)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    print(describe(config))
    return 0


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    from .cli.systemd import UnitPaths, render_unit

    config = _load(args)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command: tuple[str, ...]
    if os.path.isfile(package_root):  # running from the .pyz
        command, pythonpath = (sys.executable, package_root), None
    else:  # a source checkout
        command, pythonpath = (sys.executable, "-m", "ollama_proxy"), package_root
    paths = UnitPaths(command=command, pythonpath=pythonpath,
                      config=os.path.abspath(config.source) if config.source else None,
                      database=os.path.abspath(config.server.database))
    print(render_unit(paths, user=args.user, drain_s=config.server.drain_s,
                      port=config.server.port), end="")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"ollama-proxy {__version__} (Python {sys.version.split()[0]}, trio {trio.__version__})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ollama-proxy",
        description="An authenticating, metering gateway for Ollama and OpenAI-compatible servers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(func=func)
        return cmd

    serve = add("serve", cmd_serve, "run the gateway")
    serve.add_argument("--config", metavar="FILE",
                       help="ini file (default: ./ollama-proxy.ini when it exists)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on")
    serve.add_argument("--upstream", metavar="URL", action="append",
                       help="backend URL (repeatable); replaces the [upstream.*] sections")

    demo = add("demo", cmd_demo,
               "run the gateway in front of a built-in simulated Ollama and print examples")
    demo.add_argument("--config", metavar="FILE", help="ini file for the gateway's settings")
    demo.add_argument("--listen", metavar="HOST:PORT", help="address for the gateway")
    demo.add_argument("--tokens-per-s", type=float, default=20.0,
                      help="simulated generation speed (default 20; 0 = as fast as possible)")
    demo.add_argument("--first-byte-delay-s", type=float, default=0.0,
                      help="simulated model-load delay before each answer (default 0)")
    demo.add_argument("--traffic", action="store_true",
                      help="a few demo users send requests in the background, so that the "
                           "console's charts have something to show")

    check = add("check-config", cmd_check_config,
                "validate the config and print the effective settings")
    check.add_argument("--config", metavar="FILE", help="ini file (default: ./ollama-proxy.ini)")
    check.add_argument("--listen", metavar="HOST:PORT", help="as for serve")
    check.add_argument("--upstream", metavar="URL", action="append", help="as for serve")

    unit = add("systemd-unit", cmd_systemd_unit,
               "print a hardened systemd service file for `serve` with this config")
    unit.add_argument("--user", default="ollama-proxy",
                      help="the system user the service runs as (default: ollama-proxy)")
    unit.add_argument("--config", metavar="FILE",
                      help="ini file the service reads (default: ./ollama-proxy.ini when it exists)")

    add("version", cmd_version, "print the version")
    add_admin_commands(sub)
    return parser


def _leaf(exc: BaseException) -> BaseException:
    """The one real error inside (nested) single-member exception groups."""
    inner = getattr(exc, "exceptions", None)
    while isinstance(inner, tuple) and len(inner) == 1:
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    return exc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        err = _leaf(exc)
        if isinstance(err, OSError):  # e.g. the listen port is taken
            print(f"ollama-proxy: {err}", file=sys.stderr)
            return 1
        if isinstance(err, CommandError):  # e.g. a bad config, a newer database
            what = "config error: " if isinstance(err, ConfigError) else ""
            print(f"ollama-proxy: {what}{err.message}", file=sys.stderr)
            return err.exit_code
        raise


if __name__ == "__main__":
    sys.exit(main())
