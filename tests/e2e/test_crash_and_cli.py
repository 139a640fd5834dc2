"""``python3 -m ollama_proxy serve`` as a separate process in front of the in-process
simulated Ollama: the ledger after ``kill -9`` under load, offline CLI changes
seen by the running server, and the bootstrap admin key printed once.

Every child is reaped (``ServerProcess`` kills and waits on the way out); its stdout and
stderr are drained line by line by threads, so the info-level usage log can never fill
a pipe. Blocking waits run in worker threads, so the simulator (served by this test's
trio loop) keeps answering the child meanwhile. Nothing sleeps to synchronise: the only
polling is the bounded, 50 ms one that watches the server pick up a CLI change.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from child_process import Child
from ollama_proxy.access.keys import key_prefix, new_key
from ollama_proxy.sim.server import Simulator, run_simulator
from ollama_proxy.store import db

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 15.0
EXIT_S = 10.0
LISTENING = re.compile(r"listening on http://([0-9.]+):(\d+)")
KEY = re.compile(r"op-[A-Za-z0-9_-]{43}")
MESSAGES = [{"role": "user", "content": "[[sim:tokens=6]] [[sim:rate=150]] hello"}]


def child_env(admin_key: str | None) -> dict[str, str]:
    """This environment minus any OLLAMA_PROXY_* setting, plus the repo on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_PROXY_")}
    env.pop("OLLAMA_HOST", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    if admin_key is not None:
        env["OLLAMA_PROXY_ADMIN_KEY"] = admin_key
    return env


def write_config(folder: Path, database: Path) -> Path:
    path = folder / "gateway.ini"
    path.write_text(f"[server]\ndatabase = {database}\ndrain_s = 1\n\n[log]\nlevel = info\n")
    return path


class ServerProcess(Child):
    """``python3 -m ollama_proxy serve`` with its output drained by threads; always reaped."""

    def __init__(self, folder: Path, database: Path, upstream: str,
                 admin_key: str | None) -> None:
        config = write_config(folder, database)
        super().__init__([sys.executable, "-m", "ollama_proxy", "serve", "--listen", "127.0.0.1:0",
                          "--upstream", upstream, "--config", str(config)],
                         cwd=folder, env=child_env(admin_key))
        self.url = ""

    async def wait_line(self, name: str, pattern: re.Pattern[str],
                        timeout_s: float = STARTUP_S) -> re.Match[str]:
        """The first match of ``pattern`` on a line of ``name`` not read before."""
        return await trio.to_thread.run_sync(self.wait_match, name, pattern, timeout_s)

    async def started(self) -> str:
        match = await self.wait_line("stderr", LISTENING)
        self.url = f"http://{match.group(1)}:{match.group(2)}"
        return self.url

    async def kill9(self) -> int:
        return await trio.to_thread.run_sync(self.kill, EXIT_S)

    async def stop(self) -> int:
        return await trio.to_thread.run_sync(self.terminate, EXIT_S)


async def start_simulator(nursery: trio.Nursery, sim: Simulator | None = None) -> str:
    host, port = await nursery.start(run_simulator, sim or Simulator(), "127.0.0.1", 0)
    return f"http://{host}:{port}"


async def cli(database: Path, *args: str) -> dict[str, Any]:
    """``python3 -m ollama_proxy ARGS --database DB --json``: its JSON answer."""
    done = await trio.run_process(
        [sys.executable, "-m", "ollama_proxy", *args, "--database", str(database), "--json"],
        env=child_env(None), capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


# ------------------------------------------------------------------ (a) kill -9 under load

TOTAL = 320
CONCURRENCY = 64
KILL_AFTER = 100  # complete responses before the kill


async def one_request(client: httpx.AsyncClient, index: int, request_id: str,
                      headers: dict[str, str]) -> bool:
    """One of four request kinds; True only if the client got the whole response."""
    headers = {**headers, "X-Request-Id": request_id}
    kind = index % 4
    if kind == 0:  # native, streamed (NDJSON): ends with done:true, then the chunked end
        body = {"model": "llama3.2", "messages": MESSAGES}
        async with client.stream("POST", "/api/chat", json=body, headers=headers) as response:
            if response.status_code != 200:
                return False
            lines = [line async for line in response.aiter_lines() if line.strip()]
        return bool(lines) and json.loads(lines[-1]).get("done") is True
    if kind == 1:  # /v1, streamed (SSE): ends with data: [DONE]
        body = {"model": "llama3.2", "messages": MESSAGES, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers=headers) as response:
            if response.status_code != 200:
                return False
            lines = [line async for line in response.aiter_lines() if line.strip()]
        return bool(lines) and lines[-1] == "data: [DONE]"
    if kind == 2:  # native, whole
        body = {"model": "llama3.2", "messages": MESSAGES, "stream": False}
        response = await client.post("/api/chat", json=body, headers=headers)
        return response.status_code == 200 and response.json().get("done") is True
    body = {"model": "llama3.2", "messages": MESSAGES}  # /v1, whole
    response = await client.post("/v1/chat/completions", json=body, headers=headers)
    return response.status_code == 200 and bool(response.json().get("choices"))


async def test_every_response_received_in_full_survives_kill_9(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """After SIGKILL under load, each response a client got in full has its ledger row."""
    with trio.fail_after(60):
        upstream = await start_simulator(nursery)
        database = tmp_path / "ledger.db"
        admin_key = new_key()
        with ServerProcess(tmp_path, database, upstream, admin_key) as server:
            url = await server.started()
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                made = await client.post("/admin/api/users", json={"name": "loader"},
                                         headers={"Authorization": f"Bearer {admin_key}"})
                assert made.status_code == 201, made.text
            user_headers = {"Authorization": f"Bearer {made.json()['key']}"}

            complete: list[str] = []
            failed: list[str] = []
            in_flight = 0
            in_flight_at_kill = -1
            jobs = iter(range(TOTAL))
            limits = httpx.Limits(max_connections=CONCURRENCY,
                                  max_keepalive_connections=CONCURRENCY)

            async def worker(client: httpx.AsyncClient) -> None:
                nonlocal in_flight, in_flight_at_kill
                for index in jobs:
                    request_id = f"load-{index:04d}"
                    in_flight += 1
                    try:
                        whole = await one_request(client, index, request_id, user_headers)
                    except (httpx.HTTPError, ValueError):
                        whole = False
                    finally:
                        in_flight -= 1
                    (complete if whole else failed).append(request_id)
                    if len(complete) == KILL_AFTER and whole:
                        in_flight_at_kill = in_flight
                        server.proc.kill()

            async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
                async with trio.open_nursery() as workers:
                    for _ in range(CONCURRENCY):
                        workers.start_soon(worker, client)
            assert await server.kill9() == -signal.SIGKILL, server.describe()

        assert in_flight_at_kill > 0, "the kill did not happen under load"
        assert len(complete) >= KILL_AFTER and failed, (len(complete), len(failed))
        conn = db.connect(str(database))
        try:
            rows = {r[0]: r[1:] for r in conn.execute(
                "SELECT request_id, user, status, outcome, estimated FROM ledger")}
        finally:
            conn.close()
        missing = [rid for rid in complete if rid not in rows]
        assert not missing, f"{len(missing)} of {len(complete)} complete responses have no row: " \
                            f"{missing[:10]}"
        wrong = {rid: rows[rid] for rid in complete if rows[rid] != ("loader", 200, "ok", 0)}
        assert not wrong, list(wrong.items())[:10]


STALLED = 16


async def test_no_response_completes_while_its_row_cannot_be_committed(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """With the ledger write-locked, no response is received in full before kill -9."""
    # A commit takes microseconds, so under plain load a gateway that answered before
    # committing would almost always get away with it. Here the test holds SQLite's write
    # lock, so no row can be committed; the backend finishes the requests one after
    # another (staggered token counts), and only after the last one is the server killed.
    # A gateway that sent a response's last bytes before its row was committed has, by
    # then, delivered the early ones in full, and they have no row.
    with trio.fail_after(30):
        sim = Simulator()
        upstream = await start_simulator(nursery, sim)
        database = tmp_path / "locked.db"
        admin_key = new_key()
        with ServerProcess(tmp_path, database, upstream, admin_key) as server:
            url = await server.started()
            headers = {"Authorization": f"Bearer {admin_key}"}
            async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as client:
                assert (await client.get("/v1/me")).status_code == 200
                lock = sqlite3.connect(str(database), isolation_level=None, timeout=5)
                try:
                    lock.execute("BEGIN IMMEDIATE")  # the ledger writer now waits on us
                    complete: list[str] = []

                    async def call(index: int) -> None:
                        rid = f"stalled-{index:02d}"
                        text = f"[[sim:tokens={2 + 2 * index}]] [[sim:rate=400]] hi"
                        body = {"model": "llama3.2", "stream": index % 2 == 0,
                                "messages": [{"role": "user", "content": text}]}
                        try:
                            response = await client.post("/api/chat", json=body,
                                                         headers={"X-Request-Id": rid})
                        except httpx.HTTPError:
                            return
                        if response.status_code == 200:
                            complete.append(rid)

                    def backend_done(sim: Simulator) -> bool:
                        done = [r for r in sim.records if r.path == "/api/chat"
                                and r.outcome == "completed"]
                        return len(done) == STALLED

                    async with trio.open_nursery() as calls:
                        for index in range(STALLED):
                            calls.start_soon(call, index)
                        await sim.wait_for(backend_done, timeout_s=10)
                        assert await server.kill9() == -signal.SIGKILL, server.describe()
                finally:
                    lock.execute("ROLLBACK")
                    lock.close()
        conn = db.connect(str(database))
        try:
            rows = {r[0] for r in conn.execute("SELECT request_id FROM ledger")}
        finally:
            conn.close()
        lost = sorted(set(complete) - rows)
        assert not lost, f"answered in full before their rows were committed: {lost}"


# ------------------------------------------------------------------ (b) CLI seen by a server

POLL_DEADLINE_S = 2.5
POLL_INTERVAL_S = 0.05


async def poll_until(client: httpx.AsyncClient, key: str, wanted: int) -> float:
    """Seconds until ``GET /v1/me`` with ``key`` answers ``wanted`` (bounded polling)."""
    started = time.monotonic()
    deadline = started + POLL_DEADLINE_S
    while True:
        response = await client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
        if response.status_code == wanted:
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            raise AssertionError(f"still {response.status_code} (not {wanted}) "
                                 f"{POLL_DEADLINE_S} s after the CLI change: {response.text}")
        await trio.sleep(POLL_INTERVAL_S)  # cross-process observation: a short, bounded poll


async def test_offline_cli_changes_reach_the_running_server_within_2_s(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """users create, keys create, keys revoke, users suspend/resume on the file hold at once."""
    with trio.fail_after(45):
        upstream = await start_simulator(nursery)
        database = tmp_path / "shared.db"
        with ServerProcess(tmp_path, database, upstream, new_key()) as server:
            url = await server.started()
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                first = (await cli(database, "users", "create", "bob"))["key"]
                delays = {"users create": await poll_until(client, first, 200)}
                me = (await client.get("/v1/me", headers={"Authorization": f"Bearer {first}"}))
                assert (me.json()["name"], me.json()["role"]) == ("bob", "user")

                second = (await cli(database, "keys", "create", "bob"))["key"]
                delays["keys create"] = await poll_until(client, second, 200)

                await cli(database, "keys", "revoke", key_prefix(first))
                delays["keys revoke"] = await poll_until(client, first, 401)

                await cli(database, "users", "suspend", "bob")
                delays["users suspend"] = await poll_until(client, second, 403)

                await cli(database, "users", "resume", "bob")
                delays["users resume"] = await poll_until(client, second, 200)

                await cli(database, "users", "delete", "bob")
                delays["users delete"] = await poll_until(client, second, 401)
            assert server.proc.poll() is None, server.describe()
    assert all(delay < 2.0 for delay in delays.values()), delays


# ------------------------------------------------------------------ (c) bootstrap key


async def test_first_start_prints_an_admin_key_once_and_never_logs_it(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """Without OLLAMA_PROXY_ADMIN_KEY an empty database gets an admin key, shown once."""
    with trio.fail_after(45):
        upstream = await start_simulator(nursery)
        database = tmp_path / "fresh.db"
        chat = {"model": "llama3.2", "messages": MESSAGES, "stream": False}

        async def use(url: str, key: str) -> None:
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=url, timeout=5, headers=headers) as client:
                users = await client.get("/admin/api/users")
                assert users.status_code == 200, users.text
                assert [u["name"] for u in users.json()["users"]] == ["admin"]
                assert (await client.get("/v1/me")).json()["role"] == "admin"
                assert (await client.post("/api/chat", json=chat)).status_code == 200
                refused = await client.get("/admin/api/users",
                                           headers={"Authorization": f"Bearer {new_key()}"})
                assert refused.status_code == 401

        with ServerProcess(tmp_path, database, upstream, None) as first:
            url = await first.started()
            key = (await first.wait_line("stdout", KEY)).group(0)
            await use(url, key)
            assert await first.stop() == 0, first.describe()
        assert KEY.findall(first.text("stdout")) == [key], first.describe()

        with ServerProcess(tmp_path, database, upstream, None) as second:
            url = await second.started()
            await use(url, key)
            assert await second.stop() == 0, second.describe()
        assert not KEY.findall(second.text("stdout")), second.describe()

        for run in (first, second):
            logs = run.text("stderr")
            assert '"path":"/api/chat"' in logs, run.describe()  # the usage log was on
            assert key not in logs and key[len(key_prefix(key)):] not in logs
            assert not KEY.findall(logs), "a key in the server's log output"
