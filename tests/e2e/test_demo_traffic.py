"""``demo --traffic``: demo users send requests in the background, so the console's
charts fill; the demo still stops on SIGTERM. Run from the source tree (the .pyz demo
test covers the zipapp, and that without --traffic no request is made but the test's)."""

from __future__ import annotations

import os
import random
import re
import sys
import time
from pathlib import Path

import httpx

from child_process import Child
from ollama_proxy.cli.demo import TRAFFIC_USERS, traffic_request

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 15.0
TRAFFIC_S = 30.0  # the first requests go within a second; rows of two users well within this
EXIT_S = 15.0


def test_traffic_mixes_chats_streams_and_embeddings() -> None:
    rng = random.Random(7)
    drawn = [traffic_request(rng) for _ in range(200)]
    assert {path for path, _ in drawn} == {"/api/chat", "/v1/chat/completions", "/api/generate",
                                           "/api/embed"}
    assert {body.get("stream") for _, body in drawn} >= {True, False}


def test_demo_traffic_fills_the_ledger_with_several_users(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_PROXY_")}
    env["PYTHONPATH"] = str(REPO)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    argv = [sys.executable, "-m", "ollama_proxy", "demo", "--listen", "127.0.0.1:0",
            "--tokens-per-s", "0", "--traffic"]
    with Child(argv, cwd=tmp_path, env=env) as child:
        base = child.wait_match("stdout", re.compile(r"gateway on (http://127\.0\.0\.1:\d+)"),
                                STARTUP_S).group(1)
        admin_key = child.wait_match("stdout", re.compile(r"admin +\(role admin\) key (\S+)"),
                                     STARTUP_S).group(1)
        child.wait_match("stdout", re.compile("Background traffic: " + ", ".join(TRAFFIC_USERS)),
                         STARTUP_S)
        auth = {"Authorization": f"Bearer {admin_key}"}
        deadline = time.monotonic() + TRAFFIC_S
        users: set[str] = set()
        while len(users) < 2:  # polled: the traffic's pace is its own
            assert time.monotonic() < deadline, f"rows of {users} only\n{child.describe()}"
            answer = httpx.get(base + "/admin/api/usage?group_by=user", headers=auth, timeout=10)
            assert answer.status_code == 200, answer.text
            users = {r["key"] for r in answer.json()["rows"] if r["requests"] > 0}
            time.sleep(0.1)
        assert users <= set(TRAFFIC_USERS)
        assert child.terminate(EXIT_S) == 0, child.describe()
    assert "Traceback" not in child.text("stderr"), child.describe()
