"""Prometheus metrics, sans-IO: counters, gauges and histograms keyed by label tuples,
rendered in the text exposition format 0.0.4 (``GET /metrics``).

``GatewayMetrics`` holds the gateway's metrics (the names are documented in the README):
it is fed each request's record once, after the response (never per frame), and reads
the backends' gauges and the process's figures when scraped. Counters start at zero with
the process: the ledger is the durable record.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from ..api.record import Outcome, RequestRecord
from ..api.routes import PREFIX_ROUTES, ROUTES

# Seconds. A first token comes in milliseconds from a loaded model, in minutes from a cold
# load of a big one; a whole request lasts up to the stream's end.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 5.0)

REJECTION_REASONS = ("unauthorized", "forbidden", "rate_limit", "quota", "concurrency",
                     "queue_timeout", "queue_full", "too_large", "bad_request")

Labels = tuple[str, ...]
# One backend's state when scraped: name, up, requests in flight, requests queued for it.
BackendState = tuple[str, bool, int, int]


def endpoint_label(path: str) -> str:
    """A relayed path as the ``endpoint`` label: itself, or its prefix and ``*`` for
    the paths that name a model or a blob (a label never takes every value a client
    may send)."""
    if path in ROUTES:
        return path
    for prefix, _ in PREFIX_ROUTES:
        if path.startswith(prefix):
            return prefix + "*"
    return "other"


def escape_label(value: str) -> str:
    """A label value as the text format quotes it: backslash, double quote, newline."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    if isinstance(value, int) or value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class Family:
    """One metric name: its type, help, label names and a value per label tuple."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labels = tuple(labels)

    def _selector(self, key: Labels, extra: str = "") -> str:
        """``{a="x",b="y"}`` for ``key`` (plus ``extra`` pairs), "" when there are none."""
        pairs = [f'{n}="{escape_label(v)}"' for n, v in zip(self.labels, key)]
        if extra:
            pairs.append(extra)
        return "{" + ",".join(pairs) + "}" if pairs else ""

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        return self.header() + self.samples()


class Counter(Family):
    """A value per label tuple that only grows (``inc``); dict lookups only."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[Labels, float] = {}

    def inc(self, key: Labels = (), amount: float = 1) -> None:
        values = self.values
        values[key] = values.get(key, 0) + amount

    def samples(self) -> list[str]:
        return [f"{self.name}{self._selector(k)} {format_value(v)}"
                for k, v in sorted(self.values.items())]


class Gauge(Family):
    """Values set whole when scraped (``set_all``) or one by one (``set``)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[Labels, float] = {}

    def set(self, key: Labels, value: float) -> None:
        self.values[key] = value

    def set_all(self, values: dict[Labels, float]) -> None:
        self.values = values

    def samples(self) -> list[str]:
        return [f"{self.name}{self._selector(k)} {format_value(v)}"
                for k, v in sorted(self.values.items())]


class Histogram(Family):
    """Counts per bucket (not cumulative: one increment per observation), sum and count
    per label tuple; cumulated when rendered. A bucket's bound is its ``le``."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), *,
                 buckets: Sequence[float]) -> None:
        super().__init__(name, help, labels)
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"{name}: buckets must increase")
        self.bounds = tuple(float(b) for b in buckets)
        self.series: dict[Labels, list[float]] = {}  # [per bucket ..., +Inf, sum, count]

    def observe(self, key: Labels, value: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0] * (len(self.bounds) + 3)
        series[bisect_left(self.bounds, value)] += 1
        series[-2] += value
        series[-1] += 1

    def samples(self) -> list[str]:
        out = []
        les = [f'le="{format_value(b)}"' for b in self.bounds] + ['le="+Inf"']
        for key, series in sorted(self.series.items()):
            series = list(series)  # a copy: another thread may observe meanwhile
            cumulative = 0.0
            for le, count in zip(les, series):
                cumulative += count
                out.append(f"{self.name}_bucket{self._selector(key, le)} {format_value(cumulative)}")
            selector = self._selector(key)
            out.append(f"{self.name}_sum{selector} {format_value(series[-2])}")
            out.append(f"{self.name}_count{selector} {format_value(cumulative)}")
        return out


# --------------------------------------------------------------------------- the process


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


_STARTED = time.time()  # the fallback start time: when this module was imported


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _process_start(ticks: int) -> float:
    """When this process started (Unix seconds): from /proc on Linux, else the import time."""
    boot = _boot_time()
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return _STARTED
    if boot is None:
        return _STARTED
    fields = stat.rsplit(b")", 1)[1].split()
    return boot + int(fields[19]) / ticks  # starttime, field 22 (fields after "comm")


def process_figures(ticks: int, page_size: int) -> dict[str, float]:
    """CPU seconds, resident bytes and open file descriptors of this process: /proc on
    Linux, else the ``resource`` module (its resident figure is the peak)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        out["cpu"] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        out["rss"] = int(fields[21]) * page_size
    except (OSError, IndexError, ValueError):
        try:
            import resource
        except ImportError:  # not Unix
            return out
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["cpu"] = usage.ru_utime + usage.ru_stime
        out["rss"] = usage.ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
    try:
        out["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------- the gateway's


class GatewayMetrics:
    """The gateway's metrics. ``observe`` takes a request's record (None: a request
    without a valid key, which leaves none), the reason it was refused and its time to
    the first content frame; ``ledger_committed`` a commit's seconds, from the ledger's
    thread; ``render`` the page, reading ``backends`` (each one's state) then."""

    def __init__(self, *, per_user: bool = True, version: str = "",
                 backends: Callable[[], Iterable[BackendState]] = lambda: ()) -> None:
        self.per_user = per_user
        self._backends = backends
        user = ("user",) if per_user else ()
        p = "ollama_proxy_"
        self.requests = Counter(p + "requests_total", "Proxied requests, by how they ended.",
                                ("endpoint", "model", "backend", "code", *user))
        self.tokens = Counter(p + "tokens_total", "Tokens used, prompt and completion.",
                              ("type", "model", *user))
        self.duration = Histogram(p + "request_duration_seconds",
                                  "Whole proxied requests, first byte in to last byte out.",
                                  ("endpoint", "model"), buckets=DURATION_BUCKETS)
        self.ttft = Histogram(p + "time_to_first_token_seconds",
                              "Streams: from the request to the first frame with content.",
                              ("model", "backend"), buckets=TTFT_BUCKETS)
        self.tpot = Histogram(p + "time_per_output_token_seconds",
                              "Streams: seconds per completion token after the first.",
                              ("model", "backend"), buckets=TPOT_BUCKETS)
        self.queue_wait = Histogram(p + "queue_wait_seconds",
                                    "Generations and embeddings: time waited for a GPU slot.",
                                    ("backend",), buckets=QUEUE_BUCKETS)
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting that may use the backend.",
                                 ("backend",))
        self.in_flight = Gauge(p + "in_flight_requests", "Requests in flight at the backend.",
                               ("backend",))
        self.up = Gauge(p + "backend_up", "1 while the backend passes its health checks.",
                        ("backend",))
        self.rejections = Counter(p + "rejections_total", "Requests the gateway refused, by why.",
                                  ("reason",))
        for reason in REJECTION_REASONS:  # each a series from the start (for rate())
            self.rejections.inc((reason,), 0)
        self.gpu = Counter(p + "gpu_seconds_total",
                           "GPU time the backends reported (prompt evaluation + generation).",
                           ("model", *user, "backend"))
        self.commit = Histogram(p + "ledger_commit_seconds",
                                "Ledger commits (one transaction, many requests' rows).",
                                buckets=COMMIT_BUCKETS)
        self.build = Gauge(p + "build_info", "The gateway's version and Python's.",
                           ("version", "python"))
        self.build.set((version, platform.python_version()), 1)
        self._commit_lock = threading.Lock()  # ledger_committed runs in the ledger's thread
        self._ticks = _clock_ticks()
        self._page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._started = _process_start(self._ticks)
        self.families: tuple[Family, ...] = (
            self.requests, self.tokens, self.duration, self.ttft, self.tpot, self.queue_wait,
            self.queue_depth, self.in_flight, self.up, self.rejections, self.gpu, self.commit,
            self.build)

    def refused(self, reason: str) -> None:
        """A refusal outside the relay (the admin API, /metrics): counted, no record."""
        self.rejections.inc((reason,))

    def observe(self, record: RequestRecord | None, reason: str | None = None,
                first_token_s: float | None = None) -> None:
        """Once per request, after its response: a few dict lookups."""
        if reason is not None:
            self.rejections.inc((reason,))
        if record is None:
            return
        endpoint = record.endpoint
        if endpoint not in ROUTES:
            endpoint = endpoint_label(endpoint)
        backend = record.backend or ""
        # The model a backend served; none for one no backend answered or that it did
        # not know (a refusal, an unknown name: any text a client sends is no label).
        model = record.model or "" if backend and record.status != 404 else ""
        if self.per_user:
            user = record.user or ""
            self.requests.inc((endpoint, model, backend, str(record.status), user))
            if record.prompt_tokens:
                self.tokens.inc(("prompt", model, user), record.prompt_tokens)
            if record.completion_tokens:
                self.tokens.inc(("completion", model, user), record.completion_tokens)
        else:
            self.requests.inc((endpoint, model, backend, str(record.status)))
            if record.prompt_tokens:
                self.tokens.inc(("prompt", model), record.prompt_tokens)
            if record.completion_tokens:
                self.tokens.inc(("completion", model), record.completion_tokens)
        self.duration.observe((endpoint, model), record.duration_s)
        if record.metered:
            self.queue_wait.observe((backend,), record.queued_s)
        if first_token_s is not None:
            self.ttft.observe((model, backend), first_token_s)
            completion = record.completion_tokens
            if completion > 1 and record.outcome is Outcome.OK:
                self.tpot.observe((model, backend),
                                  max(0.0, record.duration_s - first_token_s) / (completion - 1))
        gpu = record.gpu_seconds
        if gpu is not None:
            key = (model, record.user or "", backend) if self.per_user else (model, backend)
            self.gpu.inc(key, gpu)

    def ledger_committed(self, seconds: float) -> None:
        with self._commit_lock:
            self.commit.observe((), seconds)

    def render(self) -> bytes:
        """The page: every family, then the process's figures."""
        depth: dict[Labels, float] = {}
        flight: dict[Labels, float] = {}
        up: dict[Labels, float] = {}
        for name, is_up, requests, queued in self._backends():
            depth[(name,)], flight[(name,)], up[(name,)] = queued, requests, int(is_up)
        self.queue_depth.set_all(depth)
        self.in_flight.set_all(flight)
        self.up.set_all(up)
        lines: list[str] = []
        for family in self.families:
            if family is self.commit:
                with self._commit_lock:
                    lines += family.render()
            else:
                lines += family.render()
        lines += self._process()
        return ("\n".join(lines) + "\n").encode()

    def _process(self) -> list[str]:
        figures = process_figures(self._ticks, self._page_size)
        out: list[str] = []
        for name, kind, help, value in (
                ("process_cpu_seconds_total", "counter", "User and system CPU time in seconds.",
                 figures.get("cpu")),
                ("process_resident_memory_bytes", "gauge", "Resident memory in bytes.",
                 figures.get("rss")),
                ("process_open_fds", "gauge", "Open file descriptors.", figures.get("fds")),
                ("process_start_time_seconds", "gauge",
                 "Start time of the process since the Unix epoch in seconds.", self._started)):
            if value is not None:
                out += [f"# HELP {name} {help}", f"# TYPE {name} {kind}",
                        f"{name} {format_value(value)}"]
        return out
