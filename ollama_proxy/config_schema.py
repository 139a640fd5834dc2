"""Every setting, one row each: its section and key, what its text may be, its default,
its help text and the dataclass field it fills. Validation, defaults, the environment
names and ``describe`` all come from this table, and the shipped ``ollama-proxy.ini``
repeats its help text (a test keeps the two equal). A new key is a new row plus a
dataclass field. Pure (no trio).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from .config_parsers import (
    access_target,
    auto_whole,
    backend_url,
    choice,
    cidrs,
    file_path,
    flag,
    gigabytes,
    globs,
    integer,
    listen_address,
    number,
    optional_env_var,
    optional_path,
    optional_time,
    optional_whole,
    seconds,
    show_cidrs,
    whole,
    words,
)
from .isotime import iso

ENV_PREFIX = "OLLAMA_PROXY_"
UPSTREAM = "upstream"  # schema section shared by every [upstream.NAME]
SECTIONS = ("server", "log", "limits", "routing", "metrics")  # the fixed sections, besides [upstream.NAME]
# Free-form NAME = TARGET lines, no schema rows: from the file only (an environment
# variable's name cannot spell a model name's dots, colons and slashes).
ALIASES = "aliases"
_MIB = 1024 * 1024
_KIB = 1024


@dataclass(frozen=True, slots=True)
class Key:
    """One ini key. ``default`` is written as in the ini ("" = unset); ``field`` is
    the dataclass attribute it fills, times ``scale`` (None: the loader derives the
    fields: host and port from listen, api_key from api_key_env or api_key_file)."""

    section: str  # one of SECTIONS or UPSTREAM
    name: str
    parse: Callable[[str], Any]
    default: str
    help: str
    field: str | None = None
    scale: int = 1
    show: Callable[[Any], str] | None = None  # the value as the ini writes it (describe)


SCHEMA: tuple[Key, ...] = (
    Key("server", "listen", listen_address, "127.0.0.1:8080",
        "Address and port to listen on, HOST:PORT; an IPv6 address in brackets: [::1]:8080.\n"
        "0.0.0.0:8080 accepts connections from other machines; port 0 lets the OS pick."),
    Key("server", "max_body_mb", whole(1), "64",
        "Largest request body accepted, in MiB (whole number >= 1); bigger gets 413.",
        "max_body_bytes", _MIB),
    Key("server", "max_header_kb", whole(1), "64",
        "Largest request head (request line and headers), in KiB (whole number >= 1); bigger gets 431.",
        "max_header_bytes", _KIB),
    Key("server", "header_timeout_s", seconds(0, inclusive=False), "30",
        "Seconds a client may take to send its request head, or the next part of its body\n"
        "(number > 0); slower gets 408.", "header_timeout_s"),
    Key("server", "keepalive_timeout_s", seconds(0, inclusive=False), "75",
        "Seconds an idle keep-alive connection waits for the next request (number > 0).",
        "keepalive_timeout_s"),
    Key("server", "drain_s", seconds(0, inclusive=True), "30",
        "On SIGTERM, seconds in-flight requests and streams get to finish before they are cut\n"
        "(number >= 0).", "drain_s"),
    Key("server", "database", file_path, "ollama-proxy.db",
        "SQLite database file (users, keys, usage ledger); a relative path is relative to the\n"
        "current folder.", "database"),
    Key("server", "ledger_wait", flag, "true",
        "Commit each response's ledger row before the response's last bytes go out (true),\n"
        "so every response a client got in full survives a crash, even kill -9; false stops\n"
        "waiting for the commit (a crash may then lose the last rows; for measurements).",
        "ledger_wait"),
    Key("server", "body_timeout_s", seconds(0, inclusive=False), "60",
        "Seconds a client may take to send a whole request body (number > 0), however it\n"
        "trickles it; slower gets 408.", "body_timeout_s"),
    Key("server", "send_timeout_s", seconds(0, inclusive=False), "60",
        "Seconds a client may go without accepting a byte of its response (number > 0); then\n"
        "the connection is cut and the backend request cancelled (a stalled reader never\n"
        "holds a GPU).", "send_timeout_s"),
    Key("server", "max_response_mb", whole(1), "32",
        "Largest backend reply that does not stream, in MiB (whole number >= 1); it is held\n"
        "whole to read its usage, so bigger gets 502. Streams are never held.",
        "max_response_bytes", _MIB),
    Key("server", "max_connections", auto_whole, "",
        "Most client connections open at once (whole number >= 1); empty: what the open-file\n"
        "limit (ulimit -n) leaves after the backend connections, at most 16384. At the cap a\n"
        "new connection closes the longest-idle one, or is refused when none is idle.",
        "max_connections"),
    Key("server", "max_connections_per_ip", whole(1), "256",
        "Most connections one client address may hold open at once (whole number >= 1); an\n"
        "IPv6 client counts by its /64.",
        "max_connections_per_ip"),
    Key("server", "allow", cidrs, "",
        "Client addresses that may connect, as addresses or CIDR blocks separated by commas\n"
        "or spaces, e.g. 10.0.0.0/8, 192.168.1.7, ::1; empty: every address.", "allow",
        show=show_cidrs),
    Key("server", "deny", cidrs, "",
        "Client addresses that may not connect (wins over allow); same form as allow.", "deny",
        show=show_cidrs),
    Key("server", "trusted_proxies", cidrs, "",
        "Reverse proxies in front of the gateway, as addresses or CIDR blocks: only for a\n"
        "connection from one of them is X-Forwarded-For read, and its last address that is\n"
        "not a trusted proxy is the client for allow/deny, logs and the ledger; empty: none.",
        "trusted_proxies", show=show_cidrs),
    Key("log", "level", choice("debug", "info", "warning", "error"), "info",
        "Log level: debug, info, warning or error.", "level"),
    Key("log", "access", access_target, "stderr",
        "Where the access log goes, one JSON line per request: stderr (through the log, as\n"
        "ollama_proxy.usage at level info), stdout, off, or a file PATH it is appended to\n"
        "(opened again on SIGHUP or a reload, so logrotate can rename it; copytruncate works too).",
        "access"),
    Key("limits", "requests_per_minute", optional_whole, "",
        "Requests (generations and embeddings) a user may start in any 60 seconds; empty:\n"
        "unlimited, 0: none.", "requests_per_minute"),
    Key("limits", "requests_per_day", optional_whole, "",
        "Requests a user may start in any 24 hours; empty: unlimited, 0: none.", "requests_per_day"),
    Key("limits", "tokens_per_minute", optional_whole, "",
        "Tokens (prompt + completion) a user may use in any 60 seconds; empty: unlimited, 0: none.",
        "tokens_per_minute"),
    Key("limits", "tokens_per_day", optional_whole, "",
        "Tokens a user may use in any 24 hours; empty: unlimited, 0: none.", "tokens_per_day"),
    Key("limits", "token_quota", optional_whole, "",
        "Tokens a user may use in all, or per month (see quota_period); empty: unlimited,\n"
        "0: none. A used-up quota is answered 429 insufficient_quota (clients do not retry).",
        "token_quota"),
    Key("limits", "quota_period", choice("total", "month"), "total",
        "What token_quota counts: total (all time, never resets) or month (the UTC calendar\n"
        "month; resets by itself on the 1st).", "quota_period"),
    Key("limits", "max_concurrent", optional_whole, "",
        "Requests a user may have in flight at once; empty: unlimited, 0: none.",
        "max_concurrent"),
    Key("limits", "max_tokens_per_request", optional_whole, "",
        "Completion tokens one request may ask for: a larger or missing max_tokens /\n"
        "options.num_predict is set to it (and to the token budget left); empty: no cap, 0: none.",
        "max_tokens_per_request"),
    Key("limits", "allowed_models", globs, "",
        "Models a user may use, as globs separated by commas or spaces, e.g. llama3.2, qwen*\n"
        "(case-insensitive; llama3.2 is llama3.2:latest); others get 403 and are not listed.\n"
        "Empty: every model.", "allowed_models", show=lambda globs: ", ".join(globs or ())),
    Key("limits", "expires_at", optional_time, "",
        "From this moment on, users get 403: an ISO 8601 date or time, e.g. 2026-12-31 or\n"
        "2026-12-31T18:00:00+01:00 (UTC unless an offset is given); empty: never.",
        "expires_at", show=lambda at: iso(at) or ""),
    Key("limits", "weight", number(0, 1000), "1",
        "A user's share of the GPU slots while requests wait for them (number > 0 and <= 1000):\n"
        "the fair queue serves a user of weight 2 about twice the tokens of a user of weight 1.\n"
        "Not a cap: with no one waiting, every user gets what is free.", "weight"),
    Key("routing", "refresh_s", seconds(0, inclusive=False), "30",
        "Seconds between two reads of a backend's own model list (/api/tags or /v1/models) when\n"
        "its models key is empty (number > 0); a request for a model no backend is known to serve\n"
        "reads the lists at once (at most once a second per backend).", "refresh_s"),
    Key("routing", "health_interval_s", seconds(0, inclusive=False), "5",
        "Seconds between two health checks of each backend (number > 0): GET /api/version and\n"
        "/api/ps for ollama, GET /v1/models for openai; they never load a model. A backend that\n"
        "fails them gets no requests until one succeeds.", "health_interval_s"),
    Key("routing", "queue_timeout_s", seconds(0, inclusive=False), "60",
        "Seconds a request may wait for a free slot (number > 0); longer gets 503 with Retry-After.",
        "queue_timeout_s"),
    Key("routing", "max_queue", whole(1), "256",
        "Most requests waiting for a slot, all users together (whole number >= 1); one more gets\n"
        "503 with Retry-After.", "max_queue"),
    Key("routing", "max_queued_per_user", whole(1), "16",
        "Most requests one user may have waiting for a slot (whole number >= 1); one more gets 429.",
        "max_queued_per_user"),
    Key("routing", "eject_after_failures", whole(1), "3",
        "Failures in a row (a refused connection, no first byte, 502, 503 or 504) after which a\n"
        "backend is ejected (whole number >= 1); requests go on to the next eligible backend.",
        "eject_after_failures"),
    Key("routing", "eject_s", seconds(0, inclusive=False), "30",
        "Seconds an ejected backend gets no requests (number > 0), doubled on each repeat up to\n"
        "5 minutes; then it is probed.", "eject_s"),
    Key("routing", "fair_queue", flag, "true",
        "When requests wait for slots, give a freed slot to the waiting user served least lately,\n"
        "counted in tokens divided by the user's weight limit (true); false: first come first\n"
        "served (for comparison).", "fair_queue"),
    Key("metrics", "allow", cidrs, "127.0.0.1, ::1",
        "Client addresses that may read GET /metrics without a key, as addresses or CIDR blocks\n"
        "separated by commas or spaces (as [server] allow); an admin key may read it from\n"
        "anywhere, anyone else gets 403. Empty: no address, admin keys only.", "allow",
        show=show_cidrs),
    Key("metrics", "per_user", flag, "true",
        "Label the per-request metrics with the user's name (true); false drops the user label\n"
        "(fewer series, and no user names on the metrics page).", "per_user"),
    Key(UPSTREAM, "url", backend_url, "http://127.0.0.1:11434",
        "Backend base URL, http://HOST[:PORT][/PATH] or https://HOST[:PORT][/PATH]; a PATH is\n"
        "put in front of every request path, e.g. http://gpu1:8000/ollama.", "url"),
    Key(UPSTREAM, "ca_file", optional_path, "",
        "For an https url: a PEM file of the CA certificates that sign the backend's certificate\n"
        "(a private CA), used instead of the system's CA store (empty: the system's).", "ca_file"),
    Key(UPSTREAM, "tls_verify", flag, "true",
        "For an https url: check the backend's certificate and name (true); false accepts any\n"
        "certificate, for testing only (a warning is logged at start).", "tls_verify"),
    Key(UPSTREAM, "kind", choice("ollama", "openai"), "ollama",
        "API the backend speaks: ollama (Ollama: /api and /v1) or openai (an OpenAI-compatible\n"
        "server such as vLLM or llama.cpp's llama-server).", "kind"),
    Key(UPSTREAM, "models", words, "",
        "Models this backend may serve, as globs separated by commas or spaces, e.g. llama3*,\n"
        "qwen2.5:7b (case-insensitive; llama3.2 is llama3.2:latest). Empty: the backend's own\n"
        "list, read from /api/tags (ollama) or /v1/models (openai) every [routing] refresh_s.",
        "models", show=lambda globs: ", ".join(globs)),
    Key(UPSTREAM, "priority", integer, "0",
        "Preference among the backends serving a model (a whole number, may be negative): lower\n"
        "is preferred; a higher number is a fallback, used only when every preferred backend\n"
        "serving the model is down or full.", "priority"),
    Key(UPSTREAM, "slots", whole(0), "0",
        "Most requests in flight at this backend at once (whole number >= 0; 0: no limit); match\n"
        "it to the server's OLLAMA_NUM_PARALLEL, vLLM's max batch or llama-server's -np. Requests\n"
        "beyond it wait in the gateway's fair queue (see [routing]), not at the backend.", "slots"),
    Key(UPSTREAM, "max_model_gb", gigabytes, "0",
        "Largest model routed to this backend, in GB of 10^9 bytes (the size /api/tags reports, in\n"
        "bytes, divided by 1000000000); a number >= 0, e.g. 40 or 7.5; 0: no limit."),
    Key(UPSTREAM, "api_key_env", optional_env_var, "",
        "Name of an environment variable holding the bearer key sent to this backend\n"
        "(empty: no key)."),
    Key(UPSTREAM, "api_key_file", optional_path, "",
        "Path of a file holding the bearer key sent to this backend, surrounding whitespace\n"
        "removed (empty: no key). Set at most one of api_key_env and api_key_file."),
    Key(UPSTREAM, "max_connections", whole(1), "1024",
        "Most connections open to this backend at once (whole number >= 1); one per request\n"
        "in flight, so it also caps the streams this backend serves at once.", "max_connections"),
    Key(UPSTREAM, "connect_timeout_s", seconds(0, inclusive=False), "5",
        "Seconds to wait for this backend to accept a connection (number > 0).",
        "connect_timeout_s"),
    Key(UPSTREAM, "first_byte_timeout_s", seconds(0, inclusive=False), "600",
        "Seconds to wait for the first byte of the backend's answer (number > 0); long because\n"
        "loading a model can take minutes. Slower gets 504.", "first_byte_timeout_s"),
    Key(UPSTREAM, "chunk_gap_timeout_s", seconds(0, inclusive=False), "300",
        "Seconds a streamed answer may go silent between two chunks before it is cut (number > 0).",
        "chunk_gap_timeout_s"),
    Key(UPSTREAM, "tokenize", choice("auto", "off"), "auto",
        "Exact counts for streams whose backend reports no usage (llama.cpp servers): auto asks\n"
        "the backend's tokenize endpoint (vLLM and llama-server POST /tokenize,\n"
        "llama-cpp-python POST /extras/tokenize/count) after the stream, off the latency path;\n"
        "off keeps the estimate.", "tokenize"),
)


def rows(section: str) -> tuple[Key, ...]:
    """The schema rows of ``section`` (one of SECTIONS or an "upstream.NAME")."""
    kind = UPSTREAM if section.startswith(UPSTREAM + ".") else section
    return tuple(row for row in SCHEMA if row.section == kind)


def env_name(section: str, key: str) -> str:
    """``OLLAMA_PROXY_<SECTION>_<KEY>``: ``[upstream.gpu-1] url`` -> ``OLLAMA_PROXY_UPSTREAM_GPU_1_URL``."""
    return ENV_PREFIX + re.sub(r"[.-]", "_", section).upper() + "_" + key.upper()
