"""State that grows: the gateway over a ledger of a year of traffic.

    python3 bench/ledger_scale.py [--rows 1000000] [--repeat 5] [--json-out FILE]

Builds a database with straight SQL (50 users with keys, six models, a year of
timestamps, ~220 bytes a row: the rows never went through the gateway, so its
first start finds them all new), then times, each as the client sees it:
gateway start to its first answered request (the first start, then a second one
once the usage summaries caught up), the admin API's user and usage views, the
user's own /v1/usage, the offline CLI's ``users list`` and ``usage``, /v1/me
while three admin reports run at once, and how long a key revoked by the CLI
keeps working while those reports run. Standard library only (besides the
gateway's package); a run takes a minute or two.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from ollama_proxy.access.keys import key_prefix, new_key  # noqa: E402
from ollama_proxy.store import accounts, db  # noqa: E402

YEAR_S = 365 * 86400
USERS = 50
MODELS = ("llama3.2:latest", "qwen2.5:7b-instruct", "mistral:7b-instruct-v0.3", "gemma2:9b",
          "phi3:mini", "nomic-embed-text:latest")
ENDPOINTS = ("/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions",
             "/api/embed")
ROWS_SQL = """
WITH RECURSIVE seq(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM seq WHERE n + 1 < :rows)
INSERT INTO ledger (time, user, key_prefix, backend, model, endpoint, status, outcome,
                    prompt_tokens, completion_tokens, estimated, stream, duration_s, ttfb_s,
                    request_id, client)
SELECT :start + (n + abs(random()) % 1000 / 1000.0) * :step, u.name, u.prefix, 'gpu-box-1',
       m.name, e.path, CASE WHEN n % 37 = 0 THEN 429 ELSE 200 END,
       CASE WHEN n % 23 = 0 THEN 'client_closed' ELSE 'ok' END,
       5 + abs(random()) % 2000, abs(random()) % 1000, n % 11 = 0, n % 3 != 0,
       abs(random()) % 30000 / 1000.0, abs(random()) % 2000 / 1000.0,
       lower(hex(randomblob(16))), '10.1.' || (n % 200) || '.' || (n / 200 % 250)
FROM seq
JOIN bench_users u ON u.i = (n * 2654435761) % :users
JOIN bench_models m ON m.i = (n * 40503 / 7) % :models
JOIN bench_endpoints e ON e.i = (n * 69069 / 3) % :endpoints
"""


# --- the database --------------------------------------------------------------------------

def build(path: str, rows: int, now: float) -> dict[str, str]:
    """A ``rows``-row ledger and its users; returns each user's key."""
    conn = db.connect(path)
    try:
        secret = accounts.server_secret(conn, path)
        keys = {}
        for i in range(USERS):
            name = f"user{i:02d}"
            _user, keys[name] = accounts.create_user(conn, secret, name, actor="bench")
        conn.execute("CREATE TEMP TABLE bench_users (i INTEGER PRIMARY KEY, name, prefix)")
        conn.execute("CREATE TEMP TABLE bench_models (i INTEGER PRIMARY KEY, name)")
        conn.execute("CREATE TEMP TABLE bench_endpoints (i INTEGER PRIMARY KEY, path)")
        conn.executemany("INSERT INTO bench_users VALUES (?, ?, ?)",
                         [(i, name, key_prefix(key)) for i, (name, key) in enumerate(keys.items())])
        conn.executemany("INSERT INTO bench_models VALUES (?, ?)", enumerate(MODELS))
        conn.executemany("INSERT INTO bench_endpoints VALUES (?, ?)", enumerate(ENDPOINTS))
        with db.transaction(conn):
            conn.execute(ROWS_SQL, {"rows": rows, "start": now - YEAR_S, "step": YEAR_S / rows,
                                    "users": USERS, "models": len(MODELS),
                                    "endpoints": len(ENDPOINTS)})
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return keys
    finally:
        conn.close()


def folded(path: str) -> tuple[int | None, int]:
    """(the summaries' watermark, or None before summaries existed; the highest row id)."""
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'ledger_folded'").fetchone()
        top = conn.execute("SELECT ifnull(MAX(id), 0) FROM ledger").fetchone()[0]
        return (None if row is None else int(row[0])), top
    finally:
        conn.close()


# --- the gateway and its clients ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(port: int, path: str, key: str, timeout_s: float = 60.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Gateway:
    """``serve`` in a child process; ``started_s``: spawn to the first answered request."""

    def __init__(self, database: str, admin_key: str, log: pathlib.Path) -> None:
        self.port = free_port()
        self.log = open(log, "w")
        env = {**os.environ, "OLLAMA_PROXY_ADMIN_KEY": admin_key,
               "OLLAMA_PROXY_SERVER_DATABASE": database}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ollama_proxy", "serve", "--listen",
             f"127.0.0.1:{self.port}", "--upstream", "http://127.0.0.1:9"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT)
        deadline = t0 + 120
        while True:
            try:
                status, _ = request(self.port, "/v1/me", admin_key)
                break
            except OSError:
                if self.proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"the gateway did not start; see {log}") from None
                time.sleep(0.002)
        self.started_s = time.perf_counter() - t0
        assert status == 200, status

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    """Median and worst wall time of ``repeat`` calls, in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 4), "max_s": round(max(times), 4)}


def get_ok(port: int, path: str, key: str) -> Callable[[], None]:
    def call() -> None:
        status, body = request(port, path, key)
        assert status == 200, (path, status, body[:200])
    return call


def cli(database: str, *args: str) -> Callable[[], None]:
    def run() -> None:
        subprocess.run([sys.executable, "-m", "ollama_proxy", *args, "--database", database],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return run


class Reports:
    """Three admin reports requested over and over, each in its own thread, until stopped."""

    PATHS = ("/admin/api/usage?group_by=hour", "/admin/api/users",
             "/admin/api/usage?group_by=day")

    def __init__(self, port: int, key: str) -> None:
        self._stop = threading.Event()
        self.done = 0
        self._threads = [threading.Thread(target=self._loop, args=(port, key, path))
                         for path in self.PATHS]
        for t in self._threads:
            t.start()

    def _loop(self, port: int, key: str, path: str) -> None:
        while not self._stop.is_set():
            request(port, path, key)
            self.done += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --- the run -----------------------------------------------------------------------------

def measure(workdir: str, rows: int, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": rows}
    path = os.path.join(workdir, "ledger.db")
    now = time.time()
    t0 = time.perf_counter()
    keys = build(path, rows, now)
    out["build_s"] = round(time.perf_counter() - t0, 1)
    out["bytes_per_row"] = round(os.path.getsize(path) / rows)
    print(f"... {rows:,} rows built in {out['build_s']} s ({out['bytes_per_row']} bytes a row)",
          file=sys.stderr, flush=True)
    admin = new_key()
    log = pathlib.Path(workdir, "gateway.log")

    gateway = Gateway(path, admin, log)
    out["start_first_s"] = round(gateway.started_s, 3)
    t0 = time.perf_counter()
    me_during = timed(get_ok(gateway.port, "/v1/me", keys["user07"]), repeat)
    while True:  # the summaries catch up with the rows (none before they existed)
        mark, top = folded(path)
        if mark is None or mark >= top:
            break
        time.sleep(0.05)
    out["catch_up_s"] = None if mark is None else round(time.perf_counter() - t0, 1)
    out["me_during_catch_up"] = me_during
    gateway.stop()
    print(f"... first start {out['start_first_s']} s, caught up in {out['catch_up_s']} s",
          file=sys.stderr, flush=True)

    gateway = Gateway(path, admin, log)
    out["start_second_s"] = round(gateway.started_s, 3)
    port = gateway.port
    since, until = iso(now - 95.5 * 86400 - 1234), iso(now - 3.3 * 86400)
    views = {"GET /admin/api/users": "/admin/api/users",
             "GET /admin/api/users/user07": "/admin/api/users/user07"}
    for group in ("user", "model", "day", "hour"):
        views[f"usage group_by={group}"] = f"/admin/api/usage?group_by={group}"
        views[f"usage group_by={group} since/until"] = (
            f"/admin/api/usage?group_by={group}&since={since}&until={until}")
    views["usage group_by=hour user=user07"] = "/admin/api/usage?group_by=hour&user=user07"
    views["usage group_by=day model=qwen"] = \
        "/admin/api/usage?group_by=day&model=qwen2.5:7b-instruct"
    out["views"] = {}
    for name, target in views.items():
        out["views"][name] = timed(get_ok(port, target, admin), repeat)
    out["views"]["GET /v1/usage (user07)"] = timed(get_ok(port, "/v1/usage", keys["user07"]),
                                                   repeat)
    out["cli"] = {"version (python, imports)": timed(
        lambda: subprocess.run([sys.executable, "-m", "ollama_proxy", "version"], cwd=ROOT,
                               check=True, stdout=subprocess.DEVNULL), repeat)}
    for name, args in (("users list", ("users", "list")),
                       ("users show user07", ("users", "show", "user07")),
                       ("usage --group-by day", ("usage", "--group-by", "day")),
                       ("usage --group-by hour --user user07",
                        ("usage", "--group-by", "hour", "--user", "user07"))):
        out["cli"][name] = timed(cli(path, *args), repeat)
    print("... views timed", file=sys.stderr, flush=True)

    reports = Reports(port, admin)
    try:
        time.sleep(0.2)  # the three are running
        out["me_while_reports"] = timed(get_ok(port, "/v1/me", keys["user03"]), 4 * repeat)
        victim = keys["user11"]
        t0 = time.perf_counter()
        cli(path, "keys", "revoke", key_prefix(victim))()
        revoked = time.perf_counter()
        while request(port, "/v1/me", victim)[0] == 200:
            time.sleep(0.01)
        refused = time.perf_counter()
        out["revoked_key_refused_after_s"] = {"from_cli_start": round(refused - t0, 3),
                                              "from_commit": round(refused - revoked, 3)}
        out["reports_during"] = reports.done
    finally:
        reports.stop()
        gateway.stop()
    return out


def report(out: dict[str, Any]) -> str:
    lines = [f"{out['rows']:,} ledger rows ({out['bytes_per_row']} bytes a row, built in "
             f"{out['build_s']} s)",
             f"start to first answer, first start     {out['start_first_s']:8.3f} s",
             "  usage summaries caught up after      "
             + ("       - (none)" if out["catch_up_s"] is None else f"{out['catch_up_s']:8.1f} s"),
             f"  /v1/me meanwhile (median / max)      {out['me_during_catch_up']['median_s']:8.3f}"
             f" / {out['me_during_catch_up']['max_s']:.3f} s",
             f"start to first answer, second start    {out['start_second_s']:8.3f} s"]
    for group in ("views", "cli"):
        for name, t in out[group].items():
            lines.append(f"{(('CLI ' if group == 'cli' else '') + name)[:38]:38s} "
                         f"{t['median_s']:8.3f} s (max {t['max_s']:.3f})")
    me = out["me_while_reports"]
    lines.append(f"/v1/me while 3 reports run             {me['median_s']:8.3f} s (max "
                 f"{me['max_s']:.3f}; {out['reports_during']} reports meanwhile)")
    revoked = out["revoked_key_refused_after_s"]
    lines.append(f"key revoked by the CLI refused after   {revoked['from_cli_start']:8.3f} s "
                 f"({revoked['from_commit']:.3f} after its commit)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5, help="calls per view (median, max)")
    parser.add_argument("--json-out", metavar="FILE", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="ollama-proxy-ledger-scale-")
    try:
        out = measure(workdir, args.rows, args.repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(out))
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
