"""The bench tools: compare.py without the packages it runs on says which and how to install
them, and its ratios to each relay it measures; the naive relay (its yardstick) passes
what the upstream sends through unchanged."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h11
import httpx
import trio

from child_process import Child
from ollama_proxy.sim.server import Simulator, run_simulator

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import compare  # noqa: E402

HIDE_H11 = ("import runpy, sys; sys.modules['h11'] = None; sys.argv = ['bench/compare.py']; "
            "runpy.run_path('bench/compare.py', run_name='__main__')")


def test_a_missing_package_is_named_with_the_command_that_installs_it():
    """No h11: exit non-zero, naming h11 and the pip command (it raised ValueError on a
    closed log file after the simulator died)."""
    proc = subprocess.run([sys.executable, "-c", HIDE_H11], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot import h11" in proc.stderr
    assert f"{sys.executable} -m pip install -r {REPO / 'tests' / 'requirements.txt'}" in proc.stderr


def load_report(req_s: float, p50_ms: float, chunks_s: float = 0.0) -> dict:
    """What bench/load.py --json reports, reduced to what compare.py reads (over 10 s)."""
    return {"requests": req_s * 10, "duration_s": 10.0, "requests_per_s": req_s,
            "chunks_per_s": chunks_s, "latency_ms": {"p50": p50_ms, "p99": p50_ms * 2},
            "ttfb_ms": {"p50": p50_ms}, "chunk_delay_ms": None, "status": {"200": 1},
            "broken": 0}


def test_the_gateway_is_read_against_direct_the_naive_relay_and_a_baseline():
    """Ratios are the gateway's over the other's, milliseconds the gateway's minus the
    other's; the simulator has no CPU figure, so no CPU ratio against it. Answers other
    than 200 and broken connections are called out."""
    pair = {"name": "w", "direct": load_report(4000, 0.25, 4000),
            "naive": load_report(1000, 1.0, 1000), "naive_cpu_ms": 5000.0,
            "gateway": load_report(500, 2.0, 500), "gateway_cpu_ms": 5000.0,
            "baseline": load_report(400, 2.5, 400), "baseline_cpu_ms": 6000.0}
    for name in ("naive", "gateway", "baseline"):
        pair[f"{name}_peak_rss_mb"] = 30.0
    row = compare.summarise(pair)
    assert (row["throughput_ratio"], row["added_p50_ms"], row["gateway_cpu_ms_per_request"]) == (
        0.125, 1.75, 1.0)
    assert row["gateway_vs_naive"] == {
        "req_s_ratio": 0.5, "chunks_s_ratio": 0.5, "added_p50_ms": 1.0, "added_p99_ms": 2.0,
        "added_ttfb_p50_ms": 1.0, "chunk_delay_p99_ratio": None, "cpu_ratio": 2.0}
    assert row["gateway_vs_baseline"]["req_s_ratio"] == 1.25
    assert row["gateway_vs_baseline"]["cpu_ratio"] == round(1.0 / 1.5, 3)
    head, line = compare.format_versus([row], "naive", "nv").splitlines()
    assert head.split()[:3] == ["workload", "nv/s", "gw/nv"]
    assert line.split() == ["w", "1000", "0.5", "1.0", "2.0", "1.0", "1000", "-", "-", "0.5",
                            "500.0", "2.0", "30.0"]
    assert compare.problems([pair]) == []
    pair["gateway"]["status"] = {"200": 3, "502": 7}
    pair["direct"]["broken"] = 7
    assert compare.problems([pair]) == ["warning: w, direct: 7 broken",
                                        "warning: w, gateway: 7 x 502"]


class Tap:
    """A TCP pass-through in front of the simulator that keeps, per connection, the bytes
    each side sent: what the upstream answered is compared with what the client got."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.to_upstream: list[bytearray] = []
        self.from_upstream: list[bytearray] = []

    async def serve(self, client: trio.SocketStream) -> None:
        up, down = bytearray(), bytearray()
        self.to_upstream.append(up)
        self.from_upstream.append(down)
        async with client, await trio.open_tcp_stream("127.0.0.1", self.upstream_port) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.pump, client, server, up)
                nursery.start_soon(self.pump, server, client, down)

    @staticmethod
    async def pump(source: trio.SocketStream, sink: trio.SocketStream, kept: bytearray) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for data in source:
                kept += data  # kept before it is passed on: the client cannot be ahead
                await sink.send_all(data)


def responses(wire: bytes, count: int) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
    """Status, headers and decoded body of the first ``count`` responses to POSTs in ``wire``."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(wire)
    out = []
    for _ in range(count):
        conn.send(h11.Request(method="POST", target="/",
                              headers=[("host", "tap"), ("content-length", "0")]))
        conn.send(h11.EndOfMessage())
        head = conn.next_event()
        body = b""
        while isinstance(event := conn.next_event(), h11.Data):
            body += event.data
        out.append((head.status_code, list(head.headers), body))
        conn.start_next_cycle()
    return out


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower(), value) for name, value in headers
            if name.lower() not in (b"transfer-encoding", b"connection", b"keep-alive")]


async def test_the_naive_relay_passes_bodies_through_byte_for_byte(nursery: trio.Nursery) -> None:
    """bench/naive_relay.py in front of the simulator: a small chat (Content-Length), a
    long one (chunked by the simulator, as Go does) and a streamed chat reach the client as the
    upstream sent them, over one upstream connection for the client's three requests."""
    with trio.fail_after(30):
        sim = Simulator()
        _, sim_port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
        tap = Tap(sim_port)
        [listener] = await nursery.start(functools.partial(
            trio.serve_tcp, tap.serve, 0, host="127.0.0.1"))
        tap_port = listener.socket.getsockname()[1]
        with Child([sys.executable, str(REPO / "bench" / "naive_relay.py"),
                    "--upstream", f"http://127.0.0.1:{tap_port}", "--listen", "127.0.0.1:0"],
                   cwd=REPO, env=dict(os.environ)) as child:
            match = await trio.to_thread.run_sync(
                child.wait_match, "stdout", re.compile(r"listening on (http://\S+)"), 15.0,
                abandon_on_cancel=True)
            sent = [json.dumps({"model": "llama3.2", "stream": stream, "messages": [
                {"role": "user", "content": f"hi [[sim:tokens={tokens}]]"}]}).encode()
                for stream, tokens in ((False, 5), (False, 800), (True, 20))]
            got = []
            async with httpx.AsyncClient(base_url=match.group(1), timeout=10) as client:
                for body in sent:
                    async with client.stream("POST", "/api/chat", content=body) as response:
                        raw = b"".join([piece async for piece in response.aiter_raw()])
                        got.append((response.status_code, response.headers.raw, raw))

    assert len(tap.from_upstream) == 1, "one upstream connection for the client's requests"
    upstream = responses(bytes(tap.from_upstream[0]), 3)
    for (status, headers, body), (up_status, up_headers, up_body) in zip(got, upstream):
        assert (status, end_to_end(headers), body) == (up_status, end_to_end(up_headers), up_body)
    framing = [dict(headers).get(b"content-length") or dict(headers).get(b"transfer-encoding")
               for _, headers, _ in upstream]
    assert framing[0].isdigit() and framing[1:] == [b"chunked", b"chunked"]
    assert [json.loads(line)["done"] for line in got[2][2].splitlines()][-1] is True
    assert all(body in tap.to_upstream[0] for body in sent)
