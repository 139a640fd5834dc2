"""The BUILT ollama-proxy.pyz as an operator runs it: ``python3 -I X.pyz COMMAND``
in a subprocess with a bare environment, driven by the official clients and httpx.

Every child is reaped (``Child`` kills and waits on the way out), every wait has
a deadline, and nothing sleeps to synchronise: the tests read the child's output
line by line until the address it announces appears.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import trio

from child_process import Child
from ollama_proxy.access.keys import new_key
from ollama_proxy.sim.server import Simulator, run_simulator

ADMIN_KEY = new_key()  # the bootstrap admin key the children get from the environment
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "build_pyz.py"
STARTUP_S = 15.0  # until the child announces its address
EXIT_S = 15.0  # from SIGTERM to exit
MESSAGES = [{"role": "user", "content": "Hello from the pyz test"}]


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ollama-proxy.pyz built once for this module (wheels from the repo's .pyz-cache)."""
    output = tmp_path_factory.mktemp("e2e-pyz") / "ollama-proxy.pyz"
    proc = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--output", str(output),
         "--cache-dir", str(REPO / ".pyz-cache")],
        cwd=output.parent, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"build failed:\n{proc.stdout}\n{proc.stderr}"
    return output


def child_env(home: Path) -> dict[str, str]:
    """A bare box: no PYTHONPATH, no virtualenv; loopback never through a proxy."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "OLLAMA_PROXY_ADMIN_KEY": ADMIN_KEY,
    }


def pyz_child(pyz: Path, *args: str, cwd: Path) -> Child:
    """``python3 -I PYZ ARGS`` in a bare environment."""
    return Child([sys.executable, "-I", str(pyz), *args], cwd=cwd, env=child_env(cwd))


def url_after(child: Child, name: str, marker: str) -> str:
    """The first ``http://127.0.0.1:PORT`` after ``marker`` on a line of ``name``."""
    pattern = re.compile(re.escape(marker) + r".*?(http://127\.0\.0\.1:\d+)")
    return child.wait_match(name, pattern, STARTUP_S).group(1)


def key_after(child: Child, name: str, marker: str) -> str:
    """The API key after ``marker`` on a line of ``name``."""
    pattern = re.compile(re.escape(marker) + r".*?(op-[A-Za-z0-9_-]{43})")
    return child.wait_match(name, pattern, STARTUP_S).group(1)


def usage_lines(stderr: str) -> list[dict[str, object]]:
    """The ledger lines (``ollama_proxy.usage: {json}``) a child logged."""
    marker = "ollama_proxy.usage: "
    return [json.loads(line.split(marker, 1)[1]) for line in stderr.splitlines() if marker in line]


def test_demo_serves_both_clients_and_stops_on_sigterm(pyz: Path, tmp_path: Path) -> None:
    """demo: the ollama and openai clients stream a chat through it; SIGTERM exits 0."""
    with pyz_child(pyz, "demo", "--listen", "127.0.0.1:0", "--tokens-per-s", "0", cwd=tmp_path) as child:
        base = url_after(child, "stdout", "ollama-proxy demo: gateway on")
        user_key = key_after(child, "stdout", "demo   (role user)")
        assert url_after(child, "stdout", "Web console: open") == base
        page = httpx.get(base + "/admin", timeout=10)  # the console's files, from inside the .pyz
        assert page.status_code == 200 and '<script src="/admin/console.js"' in page.text
        assert httpx.get(base + "/admin/console.js", timeout=10).status_code == 200

        with ollama.Client(host=base, timeout=10,
                           headers={"Authorization": f"Bearer {user_key}"}) as client:
            parts = list(client.chat(model="llama3.2", messages=MESSAGES, stream=True))
        assert "".join(p.message.content for p in parts).strip()
        assert parts[-1].done and parts[-1].eval_count == len(parts) - 1

        with openai.OpenAI(base_url=base + "/v1", api_key=user_key, max_retries=0,
                           timeout=10) as client:
            chunks = list(client.chat.completions.create(
                model="llama3.2", messages=MESSAGES, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
        assert chunks[-1].choices[0].finish_reason == "stop"

        assert child.terminate(EXIT_S) == 0, child.describe()
        ledger = usage_lines(child.text("stderr"))
        assert [(u["path"], u["outcome"], u["estimated"]) for u in ledger] == [
            ("/api/chat", "ok", False), ("/v1/chat/completions", "ok", False)], child.describe()


async def test_serve_relays_to_upstream_and_stops_on_sigterm(
        pyz: Path, tmp_path: Path, nursery: trio.Nursery) -> None:
    """serve --upstream: a chat streams through to the given backend; SIGTERM exits 0."""
    with trio.fail_after(30):
        sim = Simulator()
        sim_host, sim_port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
        upstream = f"http://{sim_host}:{sim_port}"
        with pyz_child(pyz, "serve", "--listen", "127.0.0.1:0", "--upstream", upstream,
                   cwd=tmp_path) as child:
            base = await trio.to_thread.run_sync(
                url_after, child, "stderr", "listening on", abandon_on_cancel=True)
            assert f"default={upstream}" in child.text("stderr")

            body = {"model": "llama3.2", "messages": MESSAGES}
            async with httpx.AsyncClient(timeout=10, headers=AUTH) as client:
                async with client.stream("POST", base + "/api/chat", json=body) as response:
                    assert response.status_code == 200
                    frames = [json.loads(line) async for line in response.aiter_lines() if line]
            assert frames[-1]["done"] is True
            text = "".join(f["message"]["content"] for f in frames)

            await sim.wait_for(lambda s: any(r.path == "/api/chat" and r.outcome == "completed"
                                             for r in s.records))
            [seen] = [r for r in sim.records if r.path == "/api/chat"]
            assert (seen.model, seen.stream, seen.status) == ("llama3.2", True, 200)
            assert seen.completion_tokens == frames[-1]["eval_count"] == len(frames) - 1
            assert text.strip()

            code = await trio.to_thread.run_sync(child.terminate, EXIT_S, abandon_on_cancel=True)
            assert code == 0, child.describe()
            [ledger] = usage_lines(child.text("stderr"))
            assert (ledger["path"], ledger["prompt_tokens"], ledger["completion_tokens"]) == (
                "/api/chat", seen.prompt_tokens, seen.completion_tokens)


@pytest.mark.parametrize(("line", "key"), [
    ("max_body_byts = 5", "max_body_byts"),  # unknown key
    ("max_body_mb = lots", "max_body_mb"),  # bad value
], ids=["unknown-key", "bad-value"])
def test_check_config_names_file_section_and_key(pyz: Path, tmp_path: Path, line: str,
                                                key: str) -> None:
    """check-config with a bad ini: exit 2, and stderr names the file, section and key."""
    bad = tmp_path / "bad.ini"
    bad.write_text(f"[server]\nlisten = 127.0.0.1:0\n{line}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-I", str(pyz), "check-config", "--config", str(bad)],
        cwd=tmp_path, env=child_env(tmp_path), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "bad.ini" in proc.stderr and "[server]" in proc.stderr and key in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_with_dead_upstream_answers_502_in_each_dialect(pyz: Path, tmp_path: Path) -> None:
    """serve with nothing at the upstream: native {"error": str} and OpenAI {"error": {...}};
    502 when the request itself finds the backend unreachable, 503 with Retry-After once a
    health check (which starts with the server) has found it down."""
    with pyz_child(pyz, "serve", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:1",
               cwd=tmp_path) as child:
        base = url_after(child, "stderr", "listening on")
        with httpx.Client(base_url=base, timeout=10, headers=AUTH) as client:
            native = client.post("/api/chat", json={"model": "llama3.2", "messages": MESSAGES})
            compat = client.post("/v1/chat/completions",
                                 json={"model": "llama3.2", "messages": MESSAGES})

        assert native.status_code in (502, 503), native.text
        assert native.headers["content-type"].startswith("application/json")
        error = native.json()
        assert list(error) == ["error"] and isinstance(error["error"], str) and error["error"]

        assert compat.status_code in (502, 503), compat.text
        for answer in (native, compat):
            assert (answer.status_code == 503) == ("retry-after" in answer.headers)
        assert compat.headers["content-type"].startswith("application/json")
        error = compat.json()["error"]
        assert {"message", "type", "code"} <= set(error), error
        assert error["message"] and error["code"]
        assert error["type"] == ("api_error" if compat.status_code == 502 else "server_error")

        assert child.terminate(EXIT_S) == 0, child.describe()
