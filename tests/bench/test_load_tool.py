"""bench/load.py, the load tool: against the demo (gateway + simulated Ollama) in a
subprocess, against its own canned server (--self-test), and its parsers."""

from __future__ import annotations

import calendar
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import load  # noqa: E402


@pytest.fixture(scope="module")
def demo_url():
    """The demo's gateway URL, read from its output as it prints it (its user key too)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_proxy", "demo", "--listen", "127.0.0.1:0", "--tokens-per-s", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    # A demo that hangs is stopped: its output ends and the test fails, not the run.
    watchdog = threading.Timer(15, proc.kill)
    watchdog.start()
    try:
        url = None
        for line in proc.stdout:
            text = line.decode()
            m = re.search(r"gateway on (http://[0-9.]+:\d+)", text)
            k = re.search(r"demo +\(role user\) +key (op-\S+)", text)
            url = m.group(1) if m else url
            if k:
                DEMO_KEY["value"] = k.group(1)
            if url and DEMO_KEY["value"]:
                break
        watchdog.cancel()
        assert url and DEMO_KEY["value"], f"demo did not start (exit code {proc.poll()})"
        # Whatever it prints later is read and dropped: a full pipe would stall it.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield url
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()


DEMO_KEY = {"value": ""}  # the demo's user key, read from its output


def run(url: str, **options) -> dict:
    return load.run_load({"url": url, "key": DEMO_KEY["value"], "n": 50, "c": 4, "workers": 1,
                          **options})


# Frames per request for 5 tokens: NDJSON 5 + the done frame; SSE 5 + finish + usage + [DONE].
@pytest.mark.parametrize("api, stream, frames", [
    ("native", False, 1), ("native", True, 6), ("openai", False, 1), ("openai", True, 8)])
def test_counts_requests_frames_and_tokens(demo_url: str, api: str, stream: bool, frames: int) -> None:
    r = run(demo_url, api=api, stream=stream, prompt="Hello [[sim:tokens=5]]")
    assert r["requests"] == 50
    assert r["status"] == {"200": 50}
    assert (r["broken"], r["errors"]) == (0, 0)
    assert r["chunks"] == 50 * frames
    assert r["tokens"] == 50 * 5
    assert r["requests_per_s"] > 0 and r["chunks_per_s"] > 0 and r["tokens_per_s"] > 0
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["avg"] <= lat["max"]
    assert 0 < r["ttfb_ms"]["p50"] <= r["ttft_ms"]["p50"] <= lat["max"]
    assert r["connects"] == 4  # keep-alive: one connection per -c, reused
    assert r["tool_cpu_s"] > 0
    assert r["chunk_delay_ms"] is None


@pytest.mark.parametrize("api", ["native", "openai"])
def test_broken_streams_and_error_statuses(demo_url: str, api: str) -> None:
    r = run(demo_url, n=6, api=api, stream=True, prompt="Hello [[sim:error_after=2]]")
    assert r["requests"] == 6
    assert r["broken"] == 6 and r["tokens"] == 0
    r = run(demo_url, n=6, api=api, stream=True, prompt="Hello [[sim:status=429]]")
    assert r["status"] == {"429": 6}
    assert r["broken"] == 0


def test_duration_chunk_delay_and_other_paths(demo_url: str) -> None:
    r = run(demo_url, n=None, duration=0.4, c=2, stream=True, chunk_delay=True,
            prompt="Hello [[sim:tokens=10]] [[sim:rate=200]]")
    assert r["requests"] >= 2 and r["status"] == {"200": r["requests"]}
    assert r["duration_s"] >= 0.4
    assert r["chunk_delay_samples"] == r["chunks"] == r["requests"] * 11
    cd = r["chunk_delay_ms"]
    assert 0 <= cd["p50"] <= cd["p99"] <= cd["max"] < 1000

    r = run(demo_url, n=10, method="GET", path="/api/tags")
    assert r["status"] == {"200": 10} and r["broken"] == 0 and r["method"] == "GET"


def test_cli_json(demo_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert load.main(["--url", demo_url, "--key", DEMO_KEY["value"], "-n", "8", "-c", "2",
                      "--workers", "2", "--json", "--prompt", "Hi [[sim:tokens=2]]"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("requests_per_s", "latency_ms", "ttfb_ms", "ttft_ms", "chunks_per_s", "tokens_per_s",
                "status", "broken", "errors", "chunk_delay_ms", "duration_s", "requests", "tool_cpu_s"):
        assert key in r
    assert r["requests"] == 8 and r["workers"] == 2 and r["tokens"] == 16


def test_connection_refused_counts_errors() -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        r = load.run_load({"url": f"http://127.0.0.1:{port}", "n": 5, "c": 1, "workers": 1})
    assert r["requests"] == 5 and r["errors"] == 5 and r["status"] == {}


def test_self_test_reports_the_ceiling() -> None:
    result = load.self_test(load.parse_args(["--self-test", "--duration", "0.3", "--workers", "1"]))
    for phase in ("non_streamed", "streamed", "streamed_per_frame_writes"):
        r = result[phase]
        assert r["requests"] > 0 and r["errors"] == 0 and r["broken"] == 0
        assert r["chunks"] == r["requests"] * (1 if phase == "non_streamed" else load.SELF_TEST_FRAMES)
    assert "Tool ceiling per core" in load.format_self_test(result)


# --------------------------------------------------------------------------- parsers

def test_created_at_parser() -> None:
    def expected(date: str, frac: str, offset_s: int = 0) -> int:
        secs = calendar.timegm(time.strptime(date, "%Y-%m-%dT%H:%M:%S")) - offset_s
        return secs * 10**9 + int((frac + "000000000")[:9])

    p = load.parse_created_at
    assert p(b"2026-11-27T07:14:39.825881Z") == expected("2026-11-27T07:14:39", "825881")
    assert p(b"2026-11-27T07:25:09.73939485Z") == expected("2026-11-27T07:25:09", "73939485")
    assert p(b"2026-11-27T07:25:09.739593246Z") == expected("2026-11-27T07:25:09", "739593246")
    assert p("2024-02-29T23:59:59.5Z") == expected("2024-02-29T23:59:59", "5")
    assert p(b"2026-01-01T00:00:00Z") == expected("2026-01-01T00:00:00", "")
    assert p(b"2026-11-27T09:14:39.825881+02:00") == expected("2026-11-27T07:14:39", "825881")
    assert p(b"2026-11-27T02:14:39-05:00") == expected("2026-11-27T07:14:39", "")
    # the cached day is reused, other days are not confused with it
    assert p(b"2026-11-28T07:14:39.1Z") - p(b"2026-11-27T07:14:39.1Z") == 86400 * 10**9


def chunked(*payloads: bytes) -> bytes:
    body = b"".join(b"%X;ext=1\r\n%s\r\n" % (len(x), x) for x in payloads)
    return body + b"0\r\nX-Trailer: yes\r\n\r\n"


def test_chunked_decoder_byte_by_byte() -> None:
    payloads = [b'{"done":false}\n' * 3, b"x" * 300, b"\r\n", b"y"]
    wire = chunked(*payloads)
    dec = load.ChunkedDecoder()
    out: list[bytes] = []
    results = [dec.feed(wire[i:i + 1], out) for i in range(len(wire))]
    assert b"".join(out) == b"".join(payloads)
    assert results[-1] is True and not any(results[:-1])

    for step in (2, 3, 7, 64, len(wire)):
        dec, out = load.ChunkedDecoder(), []
        done = False
        for i in range(0, len(wire), step):
            done = dec.feed(wire[i:i + step], out)
        assert done and b"".join(out) == b"".join(payloads)


def test_chunked_decoder_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        load.ChunkedDecoder().feed(b"zz\r\nhello\r\n", [])
    with pytest.raises(ValueError):
        load.ChunkedDecoder().feed(b"2\r\nhiXX", [])


def test_int_after() -> None:
    assert load.int_after(b'{"eval_count":42,"eval_duration":1}', b'"eval_count"') == 42
    assert load.int_after(b'"usage": {"completion_tokens": 7}', b'"completion_tokens"') == 7
    assert load.int_after(b'{"done":true}', b'"eval_count"') == 0


def test_request_bytes() -> None:
    opts = load.parse_args(["--url", "http://localhost:8080/base/", "--api", "openai", "--stream",
                            "--max-tokens", "9", "--key", "sk-1", "-m", "m1", "--prompt", "P"])
    host, port, method, req = load.build_request(opts)
    assert (host, port, method) == ("localhost", 8080, "POST")
    head, body = req.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /base/v1/chat/completions HTTP/1.1\r\nHost: localhost:8080\r\n")
    assert b"\r\nAuthorization: Bearer sk-1" in head
    assert b"\r\nContent-Length: %d" % len(body) in head
    assert json.loads(body) == {"model": "m1", "messages": [{"role": "user", "content": "P"}], "stream": True,
                                "max_tokens": 9, "stream_options": {"include_usage": True}}
    opts = load.parse_args(["--url", "http://127.0.0.1:1", "--max-tokens", "3"])
    assert json.loads(load.build_request(opts)[3].split(b"\r\n\r\n", 1)[1])["options"] == {"num_predict": 3}
    opts = load.parse_args(["--url", "http://127.0.0.1:1", "--path", "/api/tags"])
    assert load.build_request(opts)[3].startswith(b"GET /api/tags HTTP/1.1\r\n")
    assert load.parse_cpu_list("2-3,5") == {2, 3, 5}
