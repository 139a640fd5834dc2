#!/usr/bin/env python3
"""load.py: the operator's load tool for LLM APIs (like ``hey`` or ``oha``).

    python3 bench/load.py --url http://127.0.0.1:8080 [--key KEY] [-n 1000 | --duration 10]
        [-c 32] [-m llama3.2] [--api native|openai] [--stream] [--prompt TEXT]
        [--max-tokens N] [--workers W] [--json] [--chunk-delay]
    python3 bench/load.py --url http://127.0.0.1:8080 --method GET --path /api/tags
    python3 bench/load.py --self-test          # the tool's own ceiling on this machine

Standard library + trio only.  ``W`` worker processes each run one ``trio.run``
with their share of the ``C`` persistent HTTP/1.1 keep-alive connections, send
pre-encoded request bytes and read responses with a small hand-written parser
(status line, headers, Content-Length / chunked / until-close bodies).  Streamed
bodies are looked at as little as possible: frames are counted by counting
newlines (NDJSON) or blank lines (SSE), the first token is found with one
substring search, the end marker and the token count are taken from the last
bytes of the stream only.  With ``--chunk-delay`` every NDJSON frame's
``created_at`` is parsed and ``receive time - created_at`` recorded (sender and
receiver must share a clock, i.e. run on this machine).

What is measured, per request (``time.perf_counter_ns``; ``t0`` is taken just
before the request is written, or before the connect when the connection has to
be (re)opened, e.g. after a ``Connection: close``):

* latency: t0 -> the end of the body; TTFB: t0 -> the first byte of the head;
* TTFT: t0 -> the first frame with content (NDJSON ``"done":false``; SSE an
  event with non-empty ``choices``); for a whole 2xx body, its end;
* chunks: NDJSON lines / SSE events (a whole body counts as one);
* tokens: ``eval_count`` of the final ``done:true`` frame (native) or
  ``usage.completion_tokens`` (openai), the same keys in a whole body;
* broken: a stream without its end marker (``"done":true`` / ``data: [DONE]``),
  one with an in-band ``{"error"`` frame, or any connection error; errors: the
  connection errors alone (refused, reset, closed early, timed out, bad HTTP).
  Latency/TTFB percentiles cover every request that got a status line.

Workers send their raw samples (arrays of nanoseconds) back to the parent,
which computes nearest-rank percentiles.  ``run_load(options) -> dict`` is the
in-process API (the dict is what ``--json`` prints); ``parse_args(argv)`` builds
the options.  Workers are forked when that is safe, spawned otherwise (threads
running, inside trio, not Linux): a script that calls ``run_load`` must then
guard its entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import argparse
import array
import calendar
import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
from functools import partial
from typing import Any
from urllib.parse import urlsplit

try:
    import resource
except ImportError:  # pragma: no cover - not Unix
    resource = None  # type: ignore[assignment]

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

RECV_SIZE = 65536
PLAIN, NDJSON, SSE = 0, 1, 2
NS_PER_S = 1_000_000_000
DEFAULT_N = 1000
READY_TIMEOUT_S = 60.0
SELF_TEST_FRAMES = 50
STALE_AFTER_NS = 50_000_000
PER_WRITE_MARK = b"[[canned:per-frame-writes]]"


# --------------------------------------------------------------------------- parsing helpers

class ChunkedDecoder:
    """Incremental decoder of an HTTP/1.1 chunked body.

    ``feed(data, out)`` appends the payload bytes found in ``data`` to ``out``
    (one slice per chunk, or per part of a chunk) and returns True once the
    last chunk and the trailers have been read.  Chunk-size lines, the CRLF
    after each chunk's data and the trailers may be split anywhere across calls.
    """

    __slots__ = ("state", "remaining", "partial")

    # states: 0 = chunk-size line, 1 = chunk data, 2 = CRLF after data, 3 = trailers, 4 = done
    def __init__(self) -> None:
        self.state = 0
        self.remaining = 0
        self.partial = b""

    def feed(self, data: bytes, out: list) -> bool:
        if self.partial:
            data = self.partial + data
            self.partial = b""
        state = self.state
        remaining = self.remaining
        pos = 0
        n = len(data)
        while pos < n:
            if state == 1:
                end = pos + remaining
                if end <= n:
                    out.append(data[pos:end])
                    pos = end
                    state = 2
                else:
                    out.append(data[pos:])
                    remaining = end - n
                    pos = n
            elif state == 0:
                i = data.find(b"\n", pos)
                if i < 0:
                    self.partial = data[pos:]
                    break
                line = data[pos:i]
                semi = line.find(b";")
                if semi >= 0:
                    line = line[:semi]
                size = int(line, 16)  # int() strips the CR and blanks; a bad line raises ValueError
                if size < 0:
                    raise ValueError("negative chunk size")
                pos = i + 1
                if size:
                    state = 1
                    remaining = size
                else:
                    state = 3
            elif state == 2:
                # The CRLF after a chunk's data (a lone LF is tolerated).
                c = data[pos]
                pos += 1
                if c == 10:
                    state = 0
                elif c != 13:
                    raise ValueError("missing CRLF after chunk data")
            elif state == 3:
                i = data.find(b"\n", pos)
                if i < 0:
                    self.partial = data[pos:]
                    break
                blank = i == pos or (i == pos + 1 and data[pos] == 13)
                pos = i + 1
                if blank:
                    state = 4
                    break
            else:
                break
        self.state = state
        self.remaining = remaining
        return state == 4


_DAY_CACHE: dict[bytes, int] = {}
_POW10 = [10 ** k for k in range(10)]


def parse_created_at(s: bytes | str) -> int:
    """RFC 3339 (Go's RFC3339Nano) timestamp -> nanoseconds since the epoch.

    ``2026-11-27T07:14:39.825881Z``: 0 to 9 fractional digits, ``Z`` or a
    ``+hh:mm`` / ``-hh:mm`` offset.  The date part's epoch at midnight is cached,
    so a frame costs a few slices and ``int()`` calls.
    """
    if isinstance(s, str):
        s = s.encode()
    day = s[:10]
    base = _DAY_CACHE.get(day)
    if base is None:
        base = calendar.timegm((int(s[0:4]), int(s[5:7]), int(s[8:10]), 0, 0, 0, 0, 0, 0)) * NS_PER_S
        if len(_DAY_CACHE) > 64:
            _DAY_CACHE.clear()
        _DAY_CACHE[day] = base
    ns = base + (int(s[11:13]) * 3600 + int(s[14:16]) * 60 + int(s[17:19])) * NS_PER_S
    n = len(s)
    if n > 20 and s[19] == 46:  # '.'
        if s[-1] in (90, 122):  # 'Z' / 'z': the fast path
            digits = n - 21
            if 0 < digits <= 9:
                return ns + int(s[20:-1]) * _POW10[9 - digits]
            if digits > 9:
                return ns + int(s[20:29])
            return ns
        end = 20
        while end < n and 48 <= s[end] <= 57:
            end += 1
        digits = end - 20
        if digits:
            ns += int(s[20:end]) * _POW10[9 - digits] if digits <= 9 else int(s[20:29])
        pos = end
    else:
        pos = 19
    if pos < n and s[pos] in (43, 45):  # '+' / '-'
        offset = (int(s[pos + 1:pos + 3]) * 3600 + int(s[pos + 4:pos + 6]) * 60) * NS_PER_S
        ns = ns - offset if s[pos] == 43 else ns + offset
    return ns


def int_after(buf: bytes, key: bytes) -> int:
    """The non-negative integer that follows the last ``key`` in ``buf`` (after
    optional blanks and a colon), or 0: a cheap way to read ``"eval_count":N``."""
    k = buf.rfind(key)
    if k < 0:
        return 0
    i = k + len(key)
    n = len(buf)
    while i < n and buf[i] in (32, 58, 9):  # ' ', ':', '\t'
        i += 1
    j = i
    while j < n and 48 <= buf[j] <= 57:
        j += 1
    return int(buf[i:j]) if j > i else 0


# --------------------------------------------------------------------------- worker

class _EOF(Exception):
    """The server closed the connection before the response was complete."""


def _cpu_s() -> float:
    if resource is None:  # pragma: no cover
        t = os.times()
        return t.user + t.system
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:  # pragma: no cover
        pass


async def _send_rest(sock: socket.socket, data: bytes, sent: int) -> None:
    view = memoryview(data)
    while sent < len(data):
        try:
            sent += sock.send(view[sent:])
        except BlockingIOError:
            await wait_writable(sock)


async def _recv_wait(sock: socket.socket) -> bytes:
    while True:
        await wait_readable(sock)
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            pass


class _Worker:
    """One worker process's connections and samples."""

    def __init__(self, idx: int, cfg: dict, counter: Any, lock: Any, progress: Any, stop: Any) -> None:
        self.idx = idx
        self.host = cfg["host"]
        self.port = cfg["port"]
        self.req = cfg["request"]
        self.no_body = cfg["method"] == "HEAD"
        self.chunk_delay = cfg["chunk_delay"]
        self.timeout = cfg["timeout"]
        self.n = cfg["n"]
        self.deadline = 0
        self.counter = counter
        self.lock = lock
        self.progress = progress
        self.stop = stop
        self.lat = array.array("q")
        self.ttfb = array.array("q")
        self.ttft = array.array("q")
        self.delays = array.array("q")
        self.status: dict[int, int] = {}
        self.requests = 0
        self.frames = 0
        self.tokens = 0
        self.broken = 0
        self.errors = 0
        self.timeouts = 0
        self.reconnects = 0
        self.connects = 0
        self.last_end = 0
        self.opened_at = 0

    async def connect(self) -> socket.socket:
        """A connected non-blocking socket (TCP_NODELAY is on): trio connects it, and the
        hot path then drives the plain socket with wait_readable / wait_writable, which
        saves a scheduler round trip per send and per read that SocketStream would cost."""
        stream = await trio.open_tcp_stream(self.host, self.port)
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        self.connects += 1
        return sock

    async def run_connection(self, stream: socket.socket | None) -> None:
        perf = time.perf_counter_ns
        mono = time.monotonic_ns
        n = self.n
        deadline = self.deadline
        counter = self.counter
        lock = self.lock
        stop = self.stop
        progress = self.progress
        idx = self.idx
        timeout = self.timeout
        exchange = self._exchange
        lat_append = self.lat.append
        ttfb_append = self.ttfb.append
        ttft_append = self.ttft.append
        status_counts = self.status
        idle_since = self.opened_at
        try:
            while not stop.value:
                if deadline:
                    if mono() >= deadline:
                        break
                else:
                    with lock:
                        v = counter.value
                        if v >= n:
                            break
                        counter.value = v + 1
                t0 = perf()
                retried = False
                while True:
                    # Retry-worthy if it fails untouched: a connection that sat idle long enough
                    # for the server to close it (never the case in a steady run).
                    reused = stream is not None and t0 - idle_since >= STALE_AFTER_NS
                    if stream is None:
                        try:
                            stream = await self.connect()
                        except OSError:
                            r = None
                            break
                    if timeout:
                        r = None
                        with trio.move_on_after(timeout):
                            r = await exchange(stream, t0)
                        if r is None:
                            self.timeouts += 1
                            r = (0, 0, 0, perf(), 0, 0, True, False, True, 1)
                    else:
                        r = await exchange(stream, t0)
                    if r[8] and r[9] == 0 and reused and not retried:
                        # A kept-alive connection the server had closed before our request:
                        # retry once on a new connection, like every HTTP client does.
                        _close(stream)
                        stream = None
                        retried = True
                        self.reconnects += 1
                        continue
                    break
                self.requests += 1
                progress[idx] += 1
                if r is None:
                    self.errors += 1
                    self.broken += 1
                    await checkpoint()  # a refused connect must not starve the other tasks
                    continue
                status, t_head, t_ttft, t_end, frames, tokens, broken, keep, err, _ = r
                if status:
                    status_counts[status] = status_counts.get(status, 0) + 1
                    lat_append(t_end - t0)
                    ttfb_append(t_head - t0)
                    if t_ttft:
                        ttft_append(t_ttft - t0)
                if frames:
                    self.frames += frames
                if tokens:
                    self.tokens += tokens
                if broken:
                    self.broken += 1
                if err:
                    self.errors += 1
                if keep:
                    idle_since = t_end
                else:
                    _close(stream)
                    stream = None
        finally:
            if stream is not None:
                _close(stream)
            end = mono()
            if end > self.last_end:
                self.last_end = end

    async def _exchange(self, sock: socket.socket, t0: int) -> tuple:
        """Send the request, read the whole response.  Returns
        (status, t_head, t_ttft, t_end, frames, tokens, broken, keep_alive, error, bytes_received)."""
        perf = time.perf_counter_ns
        status = t_head = t_ttft = frames = tokens = nbytes = 0
        broken = inband = False
        keep = False
        try:
            req = self.req
            try:
                sent = sock.send(req)
            except BlockingIOError:
                sent = 0
            if sent != len(req):
                await _send_rest(sock, req, sent)
            recv = sock.recv
            data = await _recv_wait(sock)  # the answer cannot be there yet: wait, then read
            if not data:
                raise _EOF
            t_head = perf()
            nbytes = len(data)
            while True:
                buf = data
                i = buf.find(b"\r\n\r\n")
                while i < 0:
                    more = await _recv_wait(sock)
                    if not more:
                        raise _EOF
                    nbytes += len(more)
                    start = len(buf) - 3
                    buf += more
                    i = buf.find(b"\r\n\r\n", start)
                if buf[:5] != b"HTTP/":
                    raise ValueError("not an HTTP response")
                status = int(buf[9:12])
                if status >= 200 or status == 101:
                    break
                data = buf[i + 4:]  # 1xx: an interim head, the real one follows
                if not data:
                    data = await _recv_wait(sock)
                    if not data:
                        raise _EOF
                    nbytes += len(data)
            last_len = len(buf)
            head = buf[:i + 2].lower()
            data = buf[i + 4:]
            keep = buf[5:8] == b"1.1"
            j = head.find(b"\r\nconnection:")
            if j >= 0:
                value = head[j + 13:head.find(b"\r\n", j + 13)]
                if b"close" in value:
                    keep = False
                elif b"keep-alive" in value:
                    keep = True
            dec = None
            remaining = -1  # -1: the body ends when the server closes
            j = head.find(b"\r\ntransfer-encoding:")
            if j >= 0 and b"chunked" in head[j:head.find(b"\r\n", j + 20)]:
                dec = ChunkedDecoder()
            else:
                j = head.find(b"\r\ncontent-length:")
                if j >= 0:
                    remaining = int(head[j + 17:head.find(b"\r\n", j + 17)])
            if self.no_body or status in (204, 304) or status < 200:
                dec = None
                remaining = 0
            if dec is None and remaining < 0:
                keep = False
            mode = PLAIN
            j = head.find(b"\r\ncontent-type:")
            if j >= 0:
                value = head[j + 15:head.find(b"\r\n", j + 15)]
                if b"ndjson" in value:
                    mode = NDJSON
                elif b"event-stream" in value:
                    mode = SSE
            chunk_delay = self.chunk_delay and mode == NDJSON
            delays_append = self.delays.append
            wall_ns = time.time_ns
            pending = b""
            sse_nl = False
            prev = cur = b""
            done = dec is None and remaining == 0
            eager = 0
            while True:
                if data:
                    if dec is not None:
                        out: list = []
                        done = dec.feed(data, out)
                        if not out:
                            payload = b""
                        elif len(out) == 1:
                            payload = out[0]
                        else:
                            payload = b"".join(out)
                    elif remaining >= 0:
                        if len(data) >= remaining:
                            payload = data[:remaining]
                            remaining = 0
                            done = True
                        else:
                            payload = data
                            remaining -= len(data)
                    else:
                        payload = data
                    if payload:
                        if mode == NDJSON:
                            frames += payload.count(b"\n")
                            if not t_ttft and (b'"done":false' in payload or b'"done": false' in payload):
                                t_ttft = perf()
                            if b'{"error"' in payload:
                                inband = True
                            if chunk_delay:
                                wall = wall_ns()
                                lines = (pending + payload if pending else payload).split(b"\n")
                                pending = lines.pop()
                                for line in lines:
                                    k = line.find(b'"created_at":"')
                                    if k >= 0:
                                        k += 14
                                        delays_append(wall - parse_created_at(line[k:line.find(b'"', k)]))
                        elif mode == SSE:
                            frames += payload.count(b"\n\n")
                            if sse_nl and payload[0] == 10:
                                frames += 1
                            sse_nl = payload[-1] == 10 and (len(payload) == 1 or payload[-2] != 10)
                            if not t_ttft and (b'"choices":[{' in payload or b'"choices": [{' in payload):
                                t_ttft = perf()
                            if b'{"error"' in payload:
                                inband = True
                        prev = cur
                        cur = payload
                if done:
                    break
                # A full read means more is probably waiting: read again at once (but yield
                # after a few, for fairness); a short one means the buffer is drained: wait.
                data = None
                if last_len == RECV_SIZE and eager < 8:
                    eager += 1
                    try:
                        data = recv(RECV_SIZE)
                    except BlockingIOError:
                        pass
                else:
                    eager = 0
                while data is None:
                    await wait_readable(sock)
                    try:
                        data = recv(RECV_SIZE)
                    except BlockingIOError:
                        pass
                last_len = len(data)
                if not data:
                    if dec is None and remaining < 0:
                        break  # a body delimited by the end of the connection
                    raise _EOF
                nbytes += len(data)
            t_end = perf()
            tail = prev + cur if prev else cur
            if mode == NDJSON:
                if tail and tail[-1] != 10:
                    frames += 1  # a last frame without its newline
                    if chunk_delay and pending:
                        k = pending.find(b'"created_at":"')
                        if k >= 0:
                            k += 14
                            delays_append(wall_ns() - parse_created_at(pending[k:pending.find(b'"', k)]))
                t = tail.rstrip()
                last = t[t.rfind(b"\n") + 1:]
                if b'"done":true' in last or b'"done": true' in last:
                    tokens = int_after(last, b'"eval_count"')
                else:
                    broken = True
            elif mode == SSE:
                if b"data: [DONE]" in tail or b"data:[DONE]" in tail:
                    tokens = int_after(tail, b'"completion_tokens"')
                else:
                    broken = True
            elif cur and 200 <= status < 300:
                frames = 1
                t_ttft = t_end
                tokens = int_after(tail, b'"eval_count"') or int_after(tail, b'"completion_tokens"')
            if inband:
                broken = True
            return status, t_head, t_ttft, t_end, frames, tokens, broken, keep, False, nbytes
        except (OSError, ValueError, IndexError, _EOF):
            return status, t_head, t_ttft, perf(), frames, tokens, True, False, True, nbytes


async def _worker_async(idx: int, cfg: dict, conn: Any, counter: Any, lock: Any,
                        progress: Any, stop: Any) -> dict | None:
    worker = _Worker(idx, cfg, counter, lock, progress, stop)
    streams: list[socket.socket | None] = [None] * cfg["connections"]
    limiter = trio.CapacityLimiter(64)

    async def open_one(i: int) -> None:
        async with limiter:
            try:
                streams[i] = await worker.connect()
            except OSError:
                pass  # retried (and counted) by the first request

    async with trio.open_nursery() as nursery:
        for i in range(len(streams)):
            nursery.start_soon(open_one, i)
    worker.opened_at = time.perf_counter_ns()
    conn.send(("ready", sum(s is not None for s in streams)))
    msg = await trio.to_thread.run_sync(conn.recv)
    if msg[0] != "go":
        for s in streams:
            if s is not None:
                _close(s)
        return None
    worker.deadline = msg[2]
    cpu0 = _cpu_s()
    async with trio.open_nursery() as nursery:
        for s in streams:
            nursery.start_soon(worker.run_connection, s)
    cpu = _cpu_s() - cpu0
    return {
        "lat": worker.lat, "ttfb": worker.ttfb, "ttft": worker.ttft, "delays": worker.delays,
        "status": worker.status, "requests": worker.requests, "frames": worker.frames,
        "tokens": worker.tokens, "broken": worker.broken, "errors": worker.errors,
        "timeouts": worker.timeouts, "reconnects": worker.reconnects, "connects": worker.connects,
        "cpu_s": cpu, "last_end": worker.last_end,
    }


def _worker_main(idx: int, cfg: dict, conn: Any, counter: Any, lock: Any, progress: Any, stop: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells us to stop
    try:
        if cfg["cpus"]:
            os.sched_setaffinity(0, cfg["cpus"])
        result = trio.run(_worker_async, idx, cfg, conn, counter, lock, progress, stop)
        conn.send(("result", result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        conn.close()


# --------------------------------------------------------------------------- options and requests

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="load.py", description="Load generator for Ollama / OpenAI-compatible APIs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", help="base URL of the server, e.g. http://127.0.0.1:8080")
    p.add_argument("--key", help="API key, sent as 'Authorization: Bearer KEY'")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-n", "--requests", dest="n", type=int,
                   help=f"total number of requests (default {DEFAULT_N} unless --duration)")
    g.add_argument("--duration", "-z", type=float, help="run for this many seconds instead of -n")
    p.add_argument("-c", "--concurrency", dest="c", type=int, default=32,
                   help="concurrent connections (one request in flight on each)")
    p.add_argument("-m", "--model", default="llama3.2")
    p.add_argument("--api", choices=("native", "openai"), default="native",
                   help="native: POST /api/chat (NDJSON); openai: POST /v1/chat/completions (SSE)")
    p.add_argument("--stream", action="store_true", help="ask for a streamed response")
    p.add_argument("--prompt", default="Hello", help="the user message")
    p.add_argument("--max-tokens", type=int,
                   help="options.num_predict (native) / max_tokens (openai)")
    p.add_argument("--path", help="request another path instead of the chat endpoint, e.g. /api/tags")
    p.add_argument("--body", help="raw request body (JSON) for --path; @FILE reads it from a file")
    p.add_argument("--method", help="HTTP method (default: POST with a body, GET without)")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra request header (repeatable)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes")
    p.add_argument("--cpus", metavar="LIST",
                   help="pin the workers to these CPUs, e.g. '1' or '2-3,5' (Linux), away from the server")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="per-request timeout in seconds (0 = none); a timeout counts as an error")
    p.add_argument("--chunk-delay", action="store_true",
                   help="record each NDJSON frame's delay: receive time - its created_at "
                        "(the server must run on this machine)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--no-progress", action="store_true", help="no live progress line on a terminal")
    p.add_argument("--self-test", action="store_true",
                   help="measure the tool's own ceiling against a canned-response server on loopback")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options for ``run_load`` from command-line arguments."""
    return _parser().parse_args(argv)


def _coerce_options(options: Any) -> argparse.Namespace:
    if isinstance(options, argparse.Namespace):
        return options
    if isinstance(options, (list, tuple)):
        return parse_args(list(options))
    if isinstance(options, dict):
        ns = parse_args([])
        for key, value in options.items():
            if not hasattr(ns, key) and key != "progress":
                raise ValueError(f"unknown option {key!r}")
            setattr(ns, key, value)
        return ns
    raise TypeError("options must be an argparse.Namespace, a dict or an argv list")


def build_request(opts: argparse.Namespace) -> tuple[str, int, str, bytes]:
    """(host, port, method, request bytes) for the options."""
    if not opts.url:
        raise ValueError("--url is required")
    u = urlsplit(opts.url if "://" in opts.url else "http://" + opts.url)
    if u.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, not {u.scheme}://")
    host = u.hostname or "127.0.0.1"
    port = u.port or 80
    prefix = u.path.rstrip("/")
    if opts.body is not None:
        body: bytes | None = opts.body.encode()
        if opts.body.startswith("@"):
            with open(opts.body[1:], "rb") as f:
                body = f.read()
    elif opts.path is None:
        msg: dict[str, Any] = {"model": opts.model,
                               "messages": [{"role": "user", "content": opts.prompt}],
                               "stream": bool(opts.stream)}
        if opts.api == "openai":
            if opts.max_tokens is not None:
                msg["max_tokens"] = opts.max_tokens
            if opts.stream:
                msg["stream_options"] = {"include_usage": True}
        elif opts.max_tokens is not None:
            msg["options"] = {"num_predict": opts.max_tokens}
        body = json.dumps(msg, separators=(",", ":")).encode()
    else:
        body = None
    path = opts.path or ("/v1/chat/completions" if opts.api == "openai" else "/api/chat")
    if not path.startswith("/"):
        path = "/" + path
    method = (opts.method or ("POST" if body is not None else "GET")).upper()
    host_header = f"[{host}]" if ":" in host else host
    if u.port is not None:
        host_header += f":{port}"
    lines = [f"{method} {prefix}{path} HTTP/1.1", f"Host: {host_header}",
             "User-Agent: ollama-proxy-load/1", "Accept: */*"]
    if opts.key:
        lines.append(f"Authorization: Bearer {opts.key}")
    for h in opts.header:
        lines.append(h)
    if body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    req = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    return host, port, method, req


def parse_cpu_list(text: str) -> set[int]:
    """'1', '0,2', '2-3,5' -> a set of CPU numbers."""
    cpus: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    if not cpus:
        raise ValueError(f"empty CPU list {text!r}")
    return cpus


def _mp_context() -> Any:
    """fork where that is safe (Linux, one thread, not inside trio), spawn elsewhere."""
    inside_trio = True
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        inside_trio = False
    if (sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
            and threading.active_count() == 1 and not inside_trio):
        return mp.get_context("fork")
    return mp.get_context("spawn")


# --------------------------------------------------------------------------- the run and its report

def _pct(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    return sorted_values[max(0, math.ceil(p / 100.0 * len(sorted_values)) - 1)]


def _ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def run_load(options: Any) -> dict:
    """Run one load test and return the report (the ``--json`` object).

    ``options``: the Namespace of ``parse_args``, a dict of its fields (unset
    ones take their defaults), or an argv list.  Set ``progress=True`` on it for
    the live progress line on stderr.
    """
    opts = _coerce_options(options)
    host, port, method, req = build_request(opts)
    conns = int(opts.c)
    if conns < 1:
        raise ValueError("-c must be >= 1")
    duration = float(opts.duration) if opts.duration else 0.0
    if opts.duration is not None and duration <= 0:
        raise ValueError("--duration must be > 0")
    n = 0 if duration else int(opts.n if opts.n is not None else DEFAULT_N)
    if not duration and n < 1:
        raise ValueError("-n must be >= 1")
    workers = max(1, min(int(opts.workers or 1), conns))
    show_progress = bool(getattr(opts, "progress", False))
    cpus = parse_cpu_list(opts.cpus) if getattr(opts, "cpus", None) else None
    if cpus is not None and not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus needs Linux (os.sched_setaffinity)")

    ctx = _mp_context()
    counter = ctx.RawValue("q", 0)
    lock = ctx.Lock()
    progress = ctx.RawArray("q", workers)
    stop = ctx.RawValue("b", 0)
    procs = []
    pipes = []
    sys.stdout.flush()
    sys.stderr.flush()
    for i in range(workers):
        cfg = {"host": host, "port": port, "request": req, "method": method,
               "chunk_delay": bool(opts.chunk_delay), "timeout": float(opts.timeout or 0),
               "n": n, "connections": conns // workers + (1 if i < conns % workers else 0),
               "cpus": cpus}
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, name=f"load-worker-{i}", daemon=True,
                           args=(i, cfg, child_end, counter, lock, progress, stop))
        proc.start()
        child_end.close()
        procs.append(proc)
        pipes.append(parent_end)
    results: list[dict | None] = [None] * workers
    try:
        _wait_ready(pipes, procs)
        start = time.monotonic_ns()
        deadline = start + int(duration * NS_PER_S) if duration else 0
        for pe in pipes:
            pe.send(("go", start, deadline))
        interrupted = _collect(pipes, procs, results, progress, stop, show_progress, n, start)
    finally:
        stop.value = 1  # after a failure, the other workers stop starting requests
        for pe in pipes:
            pe.close()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    report = _report(opts, results, start, workers, conns, method)
    report["interrupted"] = interrupted
    return report


def _wait_ready(pipes: list, procs: list) -> None:
    waiting = set(range(len(pipes)))
    limit = time.monotonic() + READY_TIMEOUT_S
    while waiting:
        ready = mp.connection.wait([pipes[i] for i in waiting], timeout=max(0.0, limit - time.monotonic()))
        if not ready:
            raise RuntimeError("load workers did not start in time")
        for pe in ready:
            i = pipes.index(pe)
            _receive(pe, i, procs, "while starting")
            waiting.discard(i)


def _receive(pipe: Any, i: int, procs: list, when: str = "") -> Any:
    """The next message of worker ``i``; its death or its error is raised here."""
    try:
        msg = pipe.recv()
    except EOFError:
        raise RuntimeError(
            f"load worker {i} died {when} (exit code {procs[i].exitcode})".replace("  ", " ")) from None
    if msg[0] == "error":
        raise RuntimeError(f"load worker {i} failed:\n{msg[1]}")
    return msg


def _collect(pipes: list, procs: list, results: list, progress: Any, stop: Any,
             show: bool, n: int, start: int) -> bool:
    pending = {pe: i for i, pe in enumerate(pipes)}
    last_t = time.monotonic()
    last_done = 0
    interrupted = 0
    shown = False
    while pending:
        try:
            ready = mp.connection.wait(list(pending), timeout=0.25)
            for pe in ready:
                i = pending.pop(pe)
                results[i] = _receive(pe, i, procs)[1]
            now = time.monotonic()
            if show and pending and now - last_t >= 0.25:
                done = sum(progress)
                rate = (done - last_done) / (now - last_t)
                total = f"/{n}" if n else ""
                elapsed = (time.monotonic_ns() - start) / NS_PER_S
                sys.stderr.write(f"\r  {done}{total} requests  {rate:,.0f} req/s  {elapsed:.1f} s   ")
                sys.stderr.flush()
                shown = True
                last_t, last_done = now, done
        except KeyboardInterrupt:
            interrupted += 1
            stop.value = 1  # nothing new starts; in-flight requests finish and are reported
            if interrupted > 1:
                for proc in procs:
                    proc.terminate()
                raise
    if shown:
        sys.stderr.write("\r" + " " * 72 + "\r")
        sys.stderr.flush()
    return interrupted > 0


def _report(opts: argparse.Namespace, results: list, start: int, workers: int, conns: int,
            method: str) -> dict:
    lat = array.array("q")
    ttfb = array.array("q")
    ttft = array.array("q")
    delays = array.array("q")
    status: dict[int, int] = {}
    totals = dict.fromkeys(("requests", "frames", "tokens", "broken", "errors", "timeouts",
                            "reconnects", "connects"), 0)
    cpu = []
    end = start
    for r in results:
        if r is None:
            continue
        lat.extend(r["lat"])
        ttfb.extend(r["ttfb"])
        ttft.extend(r["ttft"])
        delays.extend(r["delays"])
        for code, count in r["status"].items():
            status[code] = status.get(code, 0) + count
        for key in totals:
            totals[key] += r[key]
        cpu.append(r["cpu_s"])
        end = max(end, r["last_end"])
    duration = max(end - start, 1) / NS_PER_S
    req = totals["requests"]

    def stats(values: array.array, keys: tuple[str, ...]) -> dict:
        if not values:
            return dict.fromkeys(keys)
        s = sorted(values)
        out = {}
        for k in keys:
            if k == "min":
                out[k] = _ms(s[0])
            elif k == "max":
                out[k] = _ms(s[-1])
            elif k == "avg":
                out[k] = _ms(sum(s) / len(s))
            else:
                out[k] = _ms(_pct(s, float(k[1:])))
        return out

    tool_cpu = sum(cpu)
    return {
        "url": opts.url,
        "api": None if opts.path else opts.api,
        "path": opts.path,
        "method": method,
        "stream": bool(opts.stream),
        "connections": conns,
        "workers": workers,
        "duration_s": round(duration, 4),
        "requests": req,
        "requests_per_s": round(req / duration, 2),
        "latency_ms": stats(lat, ("min", "avg", "p50", "p90", "p99", "max")),
        "ttfb_ms": stats(ttfb, ("p50", "p99")),
        "ttft_ms": stats(ttft, ("p50", "p99")),
        "chunks": totals["frames"],
        "chunks_per_s": round(totals["frames"] / duration, 2),
        "tokens": totals["tokens"],
        "tokens_per_s": round(totals["tokens"] / duration, 2),
        "status": {str(code): status[code] for code in sorted(status)},
        "broken": totals["broken"],
        "errors": totals["errors"],
        "timeouts": totals["timeouts"],
        "reconnects": totals["reconnects"],
        "connects": totals["connects"],
        "chunk_delay_ms": stats(delays, ("p50", "p99", "max")) if opts.chunk_delay and delays else None,
        "chunk_delay_requested": bool(opts.chunk_delay),
        "chunk_delay_samples": len(delays),
        "tool_cpu_s": round(tool_cpu, 3),
        "tool_cpu_us_per_request": round(tool_cpu * 1e6 / req, 2) if req else None,
        "tool_busiest_worker_cpu_pct": round(max(cpu) / duration * 100, 1) if cpu else None,
    }


def _fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:,.2f}{unit}"


def format_report(r: dict) -> str:
    """The human-readable report."""
    what = r["path"] or ("/v1/chat/completions" if r["api"] == "openai" else "/api/chat")
    mode = "streamed" if r["stream"] and not r["path"] else "non-streamed" if not r["path"] else r["method"]
    lat = r["latency_ms"]
    out = [
        f"{r['method']} {r['url']}{what} ({mode}), {r['connections']} connections, {r['workers']} workers",
        "",
        f"  Requests:       {r['requests']:,} in {r['duration_s']:.3f} s   {r['requests_per_s']:,.1f} req/s",
        f"  Latency (ms):   min {_fmt(lat['min'])}  avg {_fmt(lat['avg'])}  p50 {_fmt(lat['p50'])}  "
        f"p90 {_fmt(lat['p90'])}  p99 {_fmt(lat['p99'])}  max {_fmt(lat['max'])}",
        f"  TTFB (ms):      p50 {_fmt(r['ttfb_ms']['p50'])}  p99 {_fmt(r['ttfb_ms']['p99'])}",
        f"  TTFT (ms):      p50 {_fmt(r['ttft_ms']['p50'])}  p99 {_fmt(r['ttft_ms']['p99'])}",
        f"  Chunks:         {r['chunks']:,}   {r['chunks_per_s']:,.1f} chunks/s",
        f"  Tokens:         {r['tokens']:,}   {r['tokens_per_s']:,.1f} tokens/s",
    ]
    status = dict(r["status"])
    for code in ("429", "503"):
        status.setdefault(code, 0)
    parts = []
    for code in sorted(status, key=int):
        mark = "" if code.startswith("2") or status[code] == 0 else " <--"
        parts.append(f"{code}: {status[code]:,}{mark}")
    out.append("  Status codes:   " + "   ".join(parts))
    out.append(f"  Broken:         {r['broken']:,}   (connection errors {r['errors']:,}, "
               f"timeouts {r['timeouts']:,}; stale keep-alive retries {r['reconnects']:,})")
    cd = r["chunk_delay_ms"]
    if cd:
        out.append(f"  Chunk delay (ms): p50 {_fmt(cd['p50'])}  p99 {_fmt(cd['p99'])}  max {_fmt(cd['max'])}"
                   f"   ({r['chunk_delay_samples']:,} frames)")
    elif r["chunk_delay_requested"]:
        out.append("  Chunk delay:    no NDJSON frames with created_at")
    busiest = r["tool_busiest_worker_cpu_pct"]
    cpu_line = (f"  Tool CPU:       {r['tool_cpu_s']:.2f} s over {r['workers']} workers"
                f"   ({_fmt(r['tool_cpu_us_per_request'])} us/request, busiest worker "
                f"{_fmt(busiest)}% of a core)")
    out.append(cpu_line)
    if r.get("interrupted"):
        out.append("  Interrupted: the figures cover the requests that had finished.")
    if busiest is not None and busiest >= 90 and r["duration_s"] >= 1:
        out.append("  WARNING: a load worker was near 100% CPU: the tool may be the bottleneck "
                   "(add --workers, or see --self-test)")
    return "\n".join(out)


# --------------------------------------------------------------------------- self-test

def canned_responses(frames: int) -> dict[str, Any]:
    """The canned server's replies: small JSON and streamed NDJSON / SSE of ``frames`` frames each,
    one write per response, and NDJSON in one write per frame (a list of writes)."""
    created = "2026-01-01T00:00:00.000000000Z"
    small = (b'{"model":"llama3.2","created_at":"' + created.encode() +
             b'","message":{"role":"assistant","content":"Hello!"},"done_reason":"stop","done":true,'
             b'"total_duration":1000,"prompt_eval_count":5,"eval_count":3,"eval_duration":1000}')
    small_openai = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1767225600,"model":"llama3.2",'
                    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},'
                    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":3,'
                    b'"total_tokens":8}}')

    def chunk(payload: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(payload), payload)

    nd = []
    for _ in range(frames - 1):
        nd.append(chunk(b'{"model":"llama3.2","created_at":"' + created.encode() +
                        b'","message":{"role":"assistant","content":" word"},"done":false}\n'))
    nd.append(chunk(b'{"model":"llama3.2","created_at":"' + created.encode() +
                    b'","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,'
                    b'"total_duration":1000,"prompt_eval_count":5,"eval_count":%d,"eval_duration":1000}\n'
                    % (frames - 1)))
    sse = []
    for _ in range(max(1, frames - 2)):
        sse.append(chunk(b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1767225600,'
                         b'"model":"llama3.2","choices":[{"index":0,"delta":{"content":" word"},'
                         b'"finish_reason":null}]}\n\n'))
    sse.append(chunk(b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1767225600,'
                     b'"model":"llama3.2","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":%d,'
                     b'"total_tokens":%d}}\n\n' % (frames - 2, frames + 3)))
    sse.append(chunk(b"data: [DONE]\n\n"))

    def whole(ctype: bytes, body: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                + body)

    def streamed(ctype: bytes, chunks: list[bytes]) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(chunks) + b"0\r\n\r\n")

    nd_head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    return {
        # One write per frame, the way a streaming server flushes: [head + frame 1, frame 2, ...].
        "native_stream_per_write": [nd_head + nd[0]] + nd[1:-1] + [nd[-1] + b"0\r\n\r\n"],
        "native": whole(b"application/json; charset=utf-8", small),
        "openai": whole(b"application/json", small_openai),
        "native_stream": streamed(b"application/x-ndjson", nd),
        "openai_stream": streamed(b"text/event-stream", sse),
    }


async def _canned_handler(replies: dict[str, Any], stream: trio.SocketStream) -> None:
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    buf = b""
    try:
        while True:
            i = buf.find(b"\r\n\r\n")
            while i < 0:
                data = await _recv_wait(sock)
                if not data:
                    return
                buf += data
                i = buf.find(b"\r\n\r\n")
            head = buf[:i + 2].lower()
            j = head.find(b"\r\ncontent-length:")
            length = int(head[j + 17:head.find(b"\r\n", j + 17)]) if j >= 0 else 0
            need = i + 4 + length
            while len(buf) < need:
                data = await _recv_wait(sock)
                if not data:
                    return
                buf += data
            body = buf[i + 4:need]
            buf = buf[need:]
            key = "openai" if b" /v1/" in head[:head.find(b"\r\n")] else "native"
            if b'"stream":true' in body:
                key += "_stream"
                if PER_WRITE_MARK in body and key == "native_stream":
                    for piece in replies["native_stream_per_write"]:
                        await _send_rest(sock, piece, 0)
                        await checkpoint()  # let the other connections' writes interleave
                    continue
            reply = replies[key]
            try:
                sent = sock.send(reply)
            except BlockingIOError:
                sent = 0
            if sent != len(reply):
                await _send_rest(sock, reply, sent)
    except OSError:
        return
    finally:
        sock.close()


async def _canned_server_async(conn: Any, frames: int) -> None:
    replies = canned_responses(frames)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    conn.send(listeners[0].socket.getsockname()[1])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, partial(_canned_handler, replies), listeners))
        while True:
            msg = await trio.to_thread.run_sync(conn.recv)
            if msg == "cpu":
                conn.send(_cpu_s())
            else:
                nursery.cancel_scope.cancel()
                return


def _canned_server_main(conn: Any, frames: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trio.run(_canned_server_async, conn, frames)
    except EOFError:
        pass
    finally:
        conn.close()


def self_test(opts: argparse.Namespace) -> dict:
    """The tool against a canned-response server (one process) on loopback: the tool's ceiling."""
    ctx = _mp_context()
    parent_end, child_end = ctx.Pipe()
    server = ctx.Process(target=_canned_server_main, args=(child_end, SELF_TEST_FRAMES),
                         name="load-canned-server", daemon=True)
    server.start()
    child_end.close()
    try:
        if not parent_end.poll(30):
            raise RuntimeError("canned server did not start")
        port = parent_end.recv()
        url = f"http://127.0.0.1:{port}"
        duration = opts.duration or 3.0
        phases = {}
        # -c applies to every phase; by default 32 small requests and 64 streams (compare.py's workloads).
        streams = 64 if opts.c == 32 else opts.c
        for name, stream, conns, prompt in (
                ("non_streamed", False, opts.c, "Hello"),
                ("streamed", True, streams, "Hello"),
                ("streamed_per_frame_writes", True, streams, "Hello " + PER_WRITE_MARK.decode())):
            o = _coerce_options({"url": url, "stream": stream, "c": conns, "prompt": prompt,
                                 "duration": duration, "workers": opts.workers,
                                 "cpus": getattr(opts, "cpus", None),
                                 "progress": bool(getattr(opts, "progress", False))})
            parent_end.send("cpu")
            cpu0 = parent_end.recv()
            report = run_load(o)
            parent_end.send("cpu")
            cpu1 = parent_end.recv()
            report["server_cpu_pct"] = round((cpu1 - cpu0) / report["duration_s"] * 100, 1)
            phases[name] = report
        phases["frames_per_stream"] = SELF_TEST_FRAMES
        phases["cpu_count"] = os.cpu_count()
        return phases
    finally:
        try:
            parent_end.send("stop")
        except OSError:
            pass
        server.join(timeout=5)
        if server.is_alive():
            server.terminate()
            server.join()
        parent_end.close()


def format_self_test(result: dict) -> str:
    a, b, c = result["non_streamed"], result["streamed"], result["streamed_per_frame_writes"]
    frames = result["frames_per_stream"]
    workers = f"{a['workers']} worker process" + ("es" if a["workers"] > 1 else "")
    out = [f"Self-test: the tool ({workers}) against a canned-response trio server "
           f"(1 process) on loopback, {result['cpu_count']} CPUs, {a['duration_s']:.1f} s per workload", ""]

    def per_core(r: dict, what: str) -> float:
        return r[what] / r["tool_cpu_s"] if r["tool_cpu_s"] else 0.0

    for label, r in ((f"small JSON, c={a['connections']}", a),
                     (f"NDJSON {frames} frames in 1 write, c={b['connections']}", b),
                     (f"NDJSON {frames} frames, 1 write each, c={c['connections']}", c)):
        out.append(f"  {label:<40} {r['requests_per_s']:>9,.0f} req/s {r['chunks_per_s']:>11,.0f} chunks/s"
                   f"   p50 {_fmt(r['latency_ms']['p50'])} ms   errors {r['errors']}  broken {r['broken']}")
        per_req = 1e6 / per_core(r, "requests") if r["requests"] else 0
        per_chunk = 1e6 / per_core(r, "chunks") if r["chunks"] else 0
        out.append(f"  {'':<40} tool CPU {per_req:,.1f} us/request, {per_chunk:,.2f} us/chunk; busiest "
                   f"worker {_fmt(r['tool_busiest_worker_cpu_pct'])}% of a core; server "
                   f"{_fmt(r['server_cpu_pct'])}% of a core")
    out += ["",
            f"  Tool ceiling per core: ~{per_core(a, 'requests'):,.0f} small req/s; "
            f"~{per_core(c, 'chunks'):,.0f} chunks/s when frames arrive in separate writes, "
            f"~{per_core(b, 'chunks'):,.0f} when they come in bulk.",
            f"  With --workers {a['workers']} on free cores, multiply by {a['workers']}. A run whose busiest "
            "worker is near 100% of a core measures the tool, not the server."]
    return "\n".join(out)


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    opts = parser.parse_args(argv)
    opts.progress = sys.stdout.isatty() and not opts.json and not opts.no_progress
    try:
        if opts.self_test:
            result = self_test(opts)
            print(json.dumps(result, indent=2) if opts.json else format_self_test(result))
            return 0
        if not opts.url:
            parser.error("--url is required (or --self-test)")
        report = run_load(opts)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"load.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if opts.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
