"""Settings: ``ollama-proxy.ini``, then ``OLLAMA_PROXY_*`` environment variables,
then command-line flags, parsed once into frozen dataclasses (STYLE 19).

Pure (no trio). One table, ``SCHEMA``, lists every key: validation, defaults, the
environment names and ``describe`` all come from it, and the shipped
``ollama-proxy.ini`` repeats its help text (a test keeps the two equal). A new key
is a new row plus a dataclass field.
"""

from __future__ import annotations

import configparser
import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

from .errors import ConfigError
from .isotime import iso
from .access.limits import Limits
from .http.messages import host_port
from .config_parsers import (
    IpNetwork, auto_whole, choice, cidrs, file_path, flag, globs, http_url, listen_address,
    optional_env_var, optional_path, optional_time, optional_whole, seconds, show_cidrs, whole,
)

DEFAULT_CONFIG_FILE = "ollama-proxy.ini"
ENV_PREFIX = "OLLAMA_PROXY_"
ADMIN_KEY_ENV = "OLLAMA_PROXY_ADMIN_KEY"  # bootstrap admin key (PRODUCT §8): outside the scheme
UPSTREAM = "upstream"  # schema section shared by every [upstream.NAME]
_UPSTREAM_NAME = re.compile(r"[a-z0-9_-]+")
_API_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # it goes into an HTTP header: no spaces, no CR/LF
_MIB = 1024 * 1024
_KIB = 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str
    port: int
    max_body_bytes: int
    max_header_bytes: int
    header_timeout_s: float
    keepalive_timeout_s: float
    drain_s: float
    database: str
    ledger_wait: bool
    body_timeout_s: float
    send_timeout_s: float
    max_response_bytes: int
    max_connections: int | None  # None: from the file-descriptor limit at start
    max_connections_per_ip: int
    allow: tuple[IpNetwork, ...]  # empty: every address
    deny: tuple[IpNetwork, ...]
    trusted_proxies: tuple[IpNetwork, ...]


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str
    host: str
    port: int
    base_path: str
    kind: str
    api_key: str | None
    max_connections: int
    connect_timeout_s: float
    first_byte_timeout_s: float
    chunk_gap_timeout_s: float
    tokenize: str  # "auto" or "off"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    log: LogConfig
    limits: Limits  # every user's defaults (PRODUCT §4)
    upstreams: tuple[UpstreamConfig, ...]
    source: str | None


@dataclass(frozen=True, slots=True)
class Key:
    """One ini key. ``default`` is written as in the ini ("" = unset); ``field`` is
    the dataclass attribute it fills (None: derived in ``_build_*``), times ``scale``."""

    section: str  # "server", "log", "limits" or UPSTREAM
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
    Key(UPSTREAM, "url", http_url, "http://127.0.0.1:11434",
        "Backend base URL, http://HOST[:PORT][/PATH] (https is not supported yet); a PATH is\n"
        "put in front of every request path, e.g. http://gpu1:8000/ollama.", "url"),
    Key(UPSTREAM, "kind", choice("ollama", "openai"), "ollama",
        "API the backend speaks: ollama (Ollama: /api and /v1) or openai (an OpenAI-compatible\n"
        "server such as vLLM or llama.cpp's llama-server).", "kind"),
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

Raw = dict[str, tuple[str, str]]  # key -> (text, origin for messages)


SECTIONS = ("server", "log", "limits")  # the fixed sections, besides [upstream.NAME]


def rows(section: str) -> tuple[Key, ...]:
    """The schema rows of ``section`` ("server", "log", "limits" or an "upstream.NAME")."""
    kind = UPSTREAM if section.startswith(UPSTREAM + ".") else section
    return tuple(row for row in SCHEMA if row.section == kind)


def env_name(section: str, key: str) -> str:
    """``OLLAMA_PROXY_<SECTION>_<KEY>``: ``[upstream.gpu-1] url`` -> ``OLLAMA_PROXY_UPSTREAM_GPU_1_URL``."""
    return ENV_PREFIX + re.sub(r"[.-]", "_", section).upper() + "_" + key.upper()


def _redact(text: str) -> str:
    """Echo a bad value without any ``user:password@`` it holds."""
    return re.sub(r"//[^/@\s]*@", "//***@", text)


def _hint(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _parse_error(path: str, exc: configparser.Error) -> str:
    """configparser's error as ``FILE: line N: what``, never echoing the line (it may be a secret)."""
    lineno: Any = getattr(exc, "lineno", None)
    if isinstance(exc, configparser.DuplicateOptionError):
        what = f"[{exc.section}] {exc.option} is set twice"
    elif isinstance(exc, configparser.DuplicateSectionError):
        what = f"[{exc.section}] appears twice"
    elif isinstance(exc, configparser.MissingSectionHeaderError):
        what = "a setting before the first [section] header"
    elif isinstance(exc, configparser.ParsingError):
        lineno = lineno or (exc.errors[0][0] if exc.errors else "?")
        what = "expected KEY = VALUE, a [section] header or a # comment"
    else:
        what = type(exc).__name__
    return f"{path}: line {lineno}: {what}"


def _read_file(path: str | None) -> tuple[str | None, dict[str, Raw]]:
    """The ini's sections in file order, every section and key checked against SCHEMA."""
    if path is None:
        if not os.path.isfile(DEFAULT_CONFIG_FILE):
            return None, {}
        path = DEFAULT_CONFIG_FILE
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8-sig") as f:
            parser.read_file(f, source=path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    except configparser.Error as exc:
        raise ConfigError(_parse_error(path, exc)) from None
    if parser.defaults():
        raise ConfigError(f"{path}: [{parser.default_section}]: not supported (its keys would apply to "
                          "every section); put each key in its own section")
    sections: dict[str, Raw] = {}
    for section in parser.sections():
        if section.startswith(UPSTREAM + "."):
            if not _UPSTREAM_NAME.fullmatch(section[len(UPSTREAM) + 1:]):
                raise ConfigError(f"{path}: [{section}]: an upstream NAME may only hold lowercase "
                                  "letters, digits, _ and -")
        elif section not in SECTIONS:
            raise ConfigError(f"{path}: [{section}]: unknown section; allowed: [server], [log], "
                              f"[limits], [upstream.NAME]"
                              f"{_hint(section, [*SECTIONS, 'upstream.NAME'])}")
        known = [row.name for row in rows(section)]
        entries: Raw = {}
        for key, text in parser.items(section, raw=True):
            where = f"{path}: [{section}] {key}"
            if key == "api_key" and section.startswith(UPSTREAM):
                raise ConfigError(f"{where}: secrets never go in the config file; set api_key_env "
                                  "(name of an environment variable) or api_key_file (path) instead")
            if key not in known:
                raise ConfigError(f"{where}: unknown key{_hint(key, known)}; allowed: {', '.join(known)}")
            entries[key] = (text, where)
        sections[section] = entries
    return path, sections


def _apply_env(sections: dict[str, Raw], dropped: dict[str, Raw], env: Mapping[str, str],
               source: str | None) -> None:
    """Apply ``OLLAMA_PROXY_*`` overrides to ``sections``; those for ``dropped`` (file
    upstreams replaced by --upstream) are accepted and ignored. Unknown names are errors."""
    targets: dict[str, tuple[str, str]] = {}
    for section in dict.fromkeys([*sections, *dropped]):
        for row in rows(section):
            name = env_name(section, row.name)
            other = targets.setdefault(name, (section, row.name))[0]
            if other != section:
                raise ConfigError(f"{source}: [{other}] and [{section}] both map to {name}; rename one "
                                  "(environment names turn . and - into _)")
    unknown = []
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var == ADMIN_KEY_ENV:
            continue
        if var not in targets:
            unknown.append(var)
        elif targets[var][0] in sections:
            section, key = targets[var]
            sections[section][key] = (env[var], f"environment variable {var}")
    referenced = {text.strip() for raw in [*sections.values(), *dropped.values()]
                  for key, (text, _) in raw.items() if key == "api_key_env"}
    for var in unknown:
        if var not in referenced:
            raise ConfigError(
                f"environment variable {var}: matches no setting{_hint(var, list(targets))}; "
                f"expected {ENV_PREFIX}<SECTION>_<KEY> for a key of [server], [log], [limits] or an "
                f"[upstream.NAME] in the config file, or {ADMIN_KEY_ENV}")


def _parse_section(section: str, raw: Raw) -> dict[str, Any]:
    """Every key of ``section``, given or default, parsed; errors name where the value came from."""
    values: dict[str, Any] = {}
    for row in rows(section):
        text, where = raw.get(row.name, (row.default, f"default [{section}] {row.name}"))
        try:
            values[row.name] = row.parse(text.strip())
        except ValueError as exc:
            raise ConfigError(f'{where} = "{_redact(text.strip())}": {exc}') from None
    return values


def _fields(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    return {row.field: values[row.name] * row.scale if row.scale != 1 else values[row.name]
            for row in rows(section) if row.field is not None}


def _api_key(raw: Raw, values: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    """The upstream's bearer key from api_key_env or api_key_file; never echoed in errors."""
    var, file = values["api_key_env"], values["api_key_file"]
    where_var = raw.get("api_key_env", ("", "api_key_env"))[1]
    where_file = raw.get("api_key_file", ("", "api_key_file"))[1]
    if var and file:
        raise ConfigError(f'{where_file} = "{file}": api_key_env is set too ({where_var}); set only one')
    if var:
        key, where, problem = env.get(var, "").strip(), f'{where_var} = "{var}"', "is not set or empty"
    elif file:
        where, problem = f'{where_file} = "{file}"', "is empty"
        try:
            with open(file, encoding="utf-8") as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read the key file: {exc}") from None
    else:
        return None
    if not key:
        raise ConfigError(f"{where}: the {'environment variable' if var else 'key file'} {problem}")
    if not _API_KEY_CHARS.fullmatch(key):
        raise ConfigError(f"{where}: the key holds spaces, control or non-ASCII characters")
    return key


def _build_upstream(section: str, raw: Raw, env: Mapping[str, str]) -> UpstreamConfig:
    values = _parse_section(section, raw)
    parts = urlsplit(values["url"])
    return UpstreamConfig(name=section[len(UPSTREAM) + 1:], host=parts.hostname or "",
                          port=parts.port or 80, base_path=parts.path,
                          api_key=_api_key(raw, values, env), **_fields(section, values))


def load_config(path: str | None = None, *, env: Mapping[str, str] | None = None,
                listen: str | None = None, upstream_urls: Sequence[str] = ()) -> Config:
    """The effective config: file (``path``, else ``./ollama-proxy.ini`` if present),
    then ``env`` (default ``os.environ``), then ``listen`` and ``upstream_urls``.

    Raises ``ConfigError`` naming file, section, key, value and what is allowed."""
    env = os.environ if env is None else env
    source, file_sections = _read_file(path)
    sections = {name: file_sections.pop(name, {}) for name in SECTIONS}
    dropped: dict[str, Raw] = {}
    names = [f"{UPSTREAM}.default{i + 1 if i else ''}" for i in range(len(upstream_urls))]
    if upstream_urls:  # --upstream replaces every [upstream.NAME]
        dropped = file_sections
        sections.update({name: {} for name in names})
    elif file_sections:
        sections.update(file_sections)
    else:
        sections[f"{UPSTREAM}.default"] = {}
    _apply_env(sections, dropped, env, source)
    if listen is not None:
        sections["server"]["listen"] = (listen, "--listen")
    for name, url in zip(names, upstream_urls):
        sections[name]["url"] = (url, "--upstream")
    server = _parse_section("server", sections["server"])
    host, port = server["listen"]
    return Config(
        server=ServerConfig(host=host, port=port, **_fields("server", server)),
        log=LogConfig(**_fields("log", _parse_section("log", sections["log"]))),
        limits=Limits(**_fields("limits", _parse_section("limits", sections["limits"]))),
        upstreams=tuple(_build_upstream(name, raw, env) for name, raw in sections.items()
                        if name.startswith(UPSTREAM + ".")),
        source=source,
    )


def _show(row: Key, value: Any) -> str:
    if row.show is not None:
        return row.show(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value // row.scale if row.scale != 1 else value)


def settings(config: Config) -> dict[str, dict[str, str]]:
    """The effective settings as the ini writes them, by section; secrets only as ``(set)``."""
    out: dict[str, dict[str, str]] = {}
    named: list[tuple[str, Any]] = [("server", config.server), ("log", config.log),
                                    ("limits", config.limits)]
    named += [(f"{UPSTREAM}.{u.name}", u) for u in config.upstreams]
    for section, obj in named:
        values = out[section] = {}
        for row in rows(section):
            if row.field is not None:
                values[row.name] = _show(row, getattr(obj, row.field))
            elif row.name == "listen":
                values["listen"] = host_port(obj.host, obj.port)
            elif row.name == "api_key_env":
                values["api_key"] = "(set)" if obj.api_key else "(not set)"
    return out


def describe(config: Config) -> str:
    """The effective settings, ini-like, for ``check-config``."""
    lines = [f"# config file: {config.source or 'none (built-in defaults)'}"]
    for section, values in settings(config).items():
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {value}".rstrip() for key, value in values.items()]
    return "\n".join(lines) + "\n"
