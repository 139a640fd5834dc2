"""What is kept of one proxied request: the ledger's row and the access log's line
(``RequestRecord``), and how the request ended (``Outcome``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Outcome(str, Enum):
    """How a proxied request ended; the ledger's ``outcome`` column holds the value.

    A ``str`` too, so rows, JSON lines and comparisons with the stored text work as
    they are (``StrEnum`` is Python 3.11+)."""

    OK = "ok"  # answered, a backend's 4xx included (the client's mistake, relayed)
    CLIENT_CLOSED = "client_closed"  # the client left before its response ended
    CLIENT_STALLED = "client_stalled"  # the client read nothing for send_timeout_s
    UPSTREAM_ERROR = "upstream_error"  # a 5xx, a broken stream or the backend's in-band error
    UNREACHABLE = "unreachable"  # no backend took the connection
    TIMEOUT = "timeout"  # the backend was too slow
    REFUSED = "refused"  # the gateway said no (a limit, a bad body ...)
    CANCELLED = "cancelled"  # the gateway shut down under it
    ERROR = "error"  # a bug in the gateway: answered 500
    UNRECORDED = "unrecorded"  # the ledger's minimal row: SQLite refused the whole one

    def __str__(self) -> str:  # the stored text in f-strings and logs, on every Python
        return self.value


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the ledger keeps of one proxied request (and the access log writes)."""

    request_id: str
    time: float  # start, Unix seconds
    endpoint: str  # the path, e.g. /api/chat
    model: str | None
    backend: str | None
    status: int
    outcome: Outcome
    prompt_tokens: int
    completion_tokens: int
    estimated: bool
    stream: bool
    duration_s: float
    ttfb_s: float | None
    client: str
    user: str | None = None  # who (None: no key was needed, or none was valid)
    key_prefix: str | None = None  # which key, by its non-secret prefix
    metered: bool = False  # a generation or an embedding: it counts for the limits
    alias: str | None = None  # the [aliases] name the client used; ``model`` is its target
    queued_s: float = 0.0  # waited in the fair queue for a GPU slot
    method: str = "POST"  # the client's HTTP method
    # Ollama's own timings from its final frame (ns; None: the backend did not say)
    total_ns: int | None = None
    load_ns: int | None = None  # loading the model
    prompt_eval_ns: int | None = None
    eval_ns: int | None = None

    @property
    def gpu_seconds(self) -> float | None:
        """The GPU's time on it: prompt evaluation + generation (None: not reported)."""
        if self.prompt_eval_ns is None and self.eval_ns is None:
            return None
        return ((self.prompt_eval_ns or 0) + (self.eval_ns or 0)) / 1e9

    @property
    def load_seconds(self) -> float | None:
        return None if self.load_ns is None else self.load_ns / 1e9
