"""The access log: one JSON line per proxied request (``access_line``), to standard error
through the ``ollama_proxy.usage`` logger, to standard output or appended to a file
(``[log] access``); the fields are documented in the README."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Callable

import trio

from ..api.record import RequestRecord

LOGGER = "ollama_proxy.usage"
STDERR, STDOUT, OFF = "stderr", "stdout", "off"
# The line's keys, in this order; never a key's text, a prompt or a response.
ACCESS_FIELDS = (
    "time", "unix", "request_id", "client", "user", "key_prefix", "method", "path", "model",
    "alias", "backend", "status", "outcome", "stream", "prompt_tokens", "completion_tokens",
    "estimated", "queued_s", "ttfb_s", "duration_s", "gpu_seconds", "load_seconds")


_encode = json.JSONEncoder(separators=(",", ":")).encode  # made once, not per line
_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def iso_ms(ts: float) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds (``2026-11-27T07:14:39.123Z``)."""
    global _second
    whole = int(ts)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{min(int((ts - whole) * 1000), 999):03d}Z"


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def access_line(r: RequestRecord) -> str:
    """One request's line: compact JSON, ASCII only (control characters escaped)."""
    return _encode({
        "time": iso_ms(r.time), "unix": round(r.time, 3), "request_id": r.request_id,
        "client": r.client, "user": r.user, "key_prefix": r.key_prefix, "method": r.method,
        "path": r.endpoint, "model": r.model, "alias": r.alias, "backend": r.backend,
        "status": r.status, "outcome": r.outcome, "stream": r.stream,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
        "estimated": r.estimated, "queued_s": r.queued_s, "ttfb_s": r.ttfb_s,
        "duration_s": r.duration_s, "gpu_seconds": _seconds(r.gpu_seconds),
        "load_seconds": _seconds(r.load_seconds),
    })


Sink = Callable[[list[str]], None]  # writes whole lines (without their newlines)


def _to_logger(lines: list[str]) -> None:
    log = logging.getLogger(LOGGER)
    if log.isEnabledFor(logging.INFO):  # [log] level = warning silences it
        for line in lines:
            log.info("%s", line)


def _to_stdout(lines: list[str]) -> None:
    out = sys.stdout  # looked up each time: whatever stdout is now
    out.write("\n".join(lines) + "\n")
    out.flush()


class _FileSink:
    """Appends to a file: opened with O_APPEND, so each write lands at its end whoever
    else appends (and after logrotate's copytruncate); whole lines per write."""

    def __init__(self, path: str) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self.fd: int | None = os.open(path, flags, 0o640)

    def __call__(self, lines: list[str]) -> None:
        if self.fd is None:
            return
        data = memoryview(("\n".join(lines) + "\n").encode())
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def open_sink(target: str) -> Sink | None:
    """Where ``[log] access`` sends lines (None: off); a file is opened now (an
    ``OSError`` when it cannot be)."""
    if target == OFF:
        return None
    if target == STDERR:
        return _to_logger
    if target == STDOUT:
        return _to_stdout
    return _FileSink(target)


WARN_EVERY_S = 60.0  # a failing sink is said at most this often


class AccessLog:
    """Keeps each request's record and writes its line later.

    A line costs microseconds (JSON, a write, and the logging system's handlers for
    ``stderr``), so records are kept and written by ``flush`` while the gateway
    waits for a backend (the metering's ``while_waiting``), and at least every
    ``FLUSH_EVERY_S`` (``run``): never on a response's latency path.
    """

    FLUSH_EVERY_S = 1.0
    MAX_PENDING = 1000  # past this, keep writes at once (memory stays bounded)

    def __init__(self, target: str = STDERR) -> None:
        self._sink = open_sink(target)
        self._pending: list[RequestRecord] = []
        self.lost = 0  # lines the sink refused (the ledger still has their rows)
        self._warned_at = float("-inf")

    def keep(self, record: RequestRecord) -> None:
        if self._sink is None:
            return
        self._pending.append(record)
        if len(self._pending) >= self.MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and self._sink is not None:
            try:
                self._sink([access_line(record) for record in pending])
            except (OSError, ValueError) as err:  # a full disk, a closed pipe: not the gateway's end
                self.lost += len(pending)
                now = time.monotonic()
                if now - self._warned_at >= WARN_EVERY_S:
                    self._warned_at = now
                    logging.getLogger("ollama_proxy.access").error(
                        "access log lines lost (%d so far): %s", self.lost, err)

    def reopen(self, target: str) -> None:
        """Write to ``target`` from now on (a config reload, SIGHUP): a file is opened
        again, so a log rotated by renaming starts anew. The lines kept go where they
        were going; when ``target`` cannot be opened (``OSError``) nothing changes."""
        sink = open_sink(target)
        self.flush()
        self.close()
        self._sink = sink

    def close(self) -> None:
        """Write what is kept and close the file, if any (the gateway stopped)."""
        self.flush()
        if isinstance(self._sink, _FileSink):
            self._sink.close()

    async def run(self) -> None:
        """Flush on a timer, so lines appear when no request comes to carry them out."""
        try:
            while True:
                await trio.sleep(self.FLUSH_EVERY_S)
                self.flush()
        finally:
            self.flush()
