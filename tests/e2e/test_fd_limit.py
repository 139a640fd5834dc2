"""``serve`` under a small open-file limit (``ulimit -n 256``): idle connections,
however many, never lock new clients out; the longest idle make room."""

from __future__ import annotations

import re
import resource
import socket
import sys
from pathlib import Path

import httpx
from test_crash_and_cli import LISTENING, STARTUP_S, child_env

from child_process import Child

IDLE = 400


def limit_files() -> None:
    """In the child, before exec: soft and hard open-file limits of 256."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_idle_connections_never_lock_out_new_clients(tmp_path: Path) -> None:
    """400 idle connections to a gateway limited to 256 open files: /health and
    a new request still get answers, and the first idle connections were closed."""
    config = tmp_path / "gateway.ini"
    config.write_text(f"[server]\ndatabase = {tmp_path / 'db.sqlite'}\n")
    argv = [sys.executable, "-m", "ollama_proxy", "serve", "--listen", "127.0.0.1:0",
            "--upstream", "http://127.0.0.1:9", "--config", str(config)]
    with Child(argv, cwd=tmp_path, env=child_env(None), preexec_fn=limit_files) as child:
        match = child.wait_match("stderr", LISTENING, STARTUP_S)
        address = (match.group(1), int(match.group(2)))
        idle = [socket.create_connection(address, timeout=5) for _ in range(IDLE)]
        try:
            for _ in range(3):
                response = httpx.get(f"http://{address[0]}:{address[1]}/health", timeout=5)
                assert response.status_code in (200, 503) and "backends" in response.json()
            idle[0].settimeout(5)
            assert idle[0].recv(1) == b""  # closed to make room
        finally:
            for sock in idle:
                sock.close()
        assert re.search(r"at most \d+ connections", child.text("stderr"))
