"""The access log: one JSON line per proxied request, its ``RequestRecord``, on the
``ollama_proxy.usage`` logger (the name and the line are documented)."""

from __future__ import annotations

import logging

import trio

from ..api.record import RequestRecord


class AccessLog:
    """Keeps each request's record and writes its line later.

    A line costs tens of microseconds (JSON, logging, a write), so records are
    kept and written by ``flush`` while the gateway waits for a backend (the
    metering's ``while_waiting``), and at least every ``FLUSH_EVERY_S`` (``run``):
    never on a response's latency path.
    """

    FLUSH_EVERY_S = 1.0
    MAX_PENDING = 1000  # past this, keep writes at once (memory stays bounded)

    def __init__(self) -> None:
        self._log = logging.getLogger("ollama_proxy.usage")
        self._pending: list[RequestRecord] = []

    def keep(self, record: RequestRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= self.MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and self._log.isEnabledFor(logging.INFO):
            for record in pending:
                self._log.info("%s", record.to_json())

    async def run(self) -> None:
        """Flush on a timer, so lines appear when no request comes to carry them out."""
        try:
            while True:
                await trio.sleep(self.FLUSH_EVERY_S)
                self.flush()
        finally:
            self.flush()
