"""Settings: ``ollama-proxy.ini``, then ``OLLAMA_PROXY_*`` environment variables,
then command-line flags, parsed once into frozen dataclasses with units in their field
names, so that no other module reads the ini: each gets its section or plain values.

Pure (no trio). What each key accepts is the table in ``config_schema``; this module
reads the sources in order, builds the dataclasses with errors naming file, section and
key, and writes the effective settings back out (``settings``, ``describe``).
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from .access.limits import Limits
from .api.models import NO_ALIASES, Aliases, canonical_model, name_problem
from .backends.settings import RoutingSettings
from .config_parsers import DEFAULT_PORTS, IpNetwork
from .config_schema import ALIASES, ENV_PREFIX, SECTIONS, UPSTREAM, Key, env_name, rows
from .errors import ConfigError
from .http.messages import host_port

DEFAULT_CONFIG_FILE = "ollama-proxy.ini"
# The bootstrap admin key: the one OLLAMA_PROXY_ variable outside the scheme, never an error.
ADMIN_KEY_ENV = "OLLAMA_PROXY_ADMIN_KEY"
_UPSTREAM_NAME = re.compile(r"[a-z0-9_-]+")
_API_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # it goes into an HTTP header: no spaces, no CR/LF
TLS_KEYS = ("ca_file", "tls_verify")  # [upstream.NAME] keys of an https url only
GB = 10**9  # max_model_gb: Ollama reports model sizes in bytes


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
    access: str  # stdout, stderr, off or a file path


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    allow: tuple[IpNetwork, ...] = (ipaddress.ip_network("127.0.0.1"), ipaddress.ip_network("::1"))
    per_user: bool = True


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str
    scheme: str  # "http" or "https"
    host: str
    port: int
    base_path: str
    ca_file: str | None  # https: the private CA's certificates; None: the system's store
    tls_verify: bool
    kind: str
    api_key: str | None
    max_connections: int
    connect_timeout_s: float
    first_byte_timeout_s: float
    chunk_gap_timeout_s: float
    tokenize: str  # "auto" or "off"
    models: tuple[str, ...] = ()  # globs it may serve; (): its own list, learned
    priority: int = 0  # lower is preferred
    slots: int = 0  # requests in flight at once; 0: no limit
    max_model_bytes: int | None = None  # largest model routed here (max_model_gb); None: any


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    log: LogConfig
    limits: Limits  # every user's defaults; a user's own limits override them
    upstreams: tuple[UpstreamConfig, ...]
    source: str | None
    aliases: Aliases = NO_ALIASES  # [aliases]: model names that stand for others
    routing: RoutingSettings = RoutingSettings()
    metrics: MetricsConfig = MetricsConfig()


Raw = dict[str, tuple[str, str]]  # key -> (text, origin for messages)


def _redact(text: str) -> str:
    """Echo a bad value without any ``user:password@`` it holds, and with control
    characters escaped (an escape sequence from the file must not reach the terminal)."""
    return _printable(re.sub(r"//[^/@\s]*@", "//***@", text))


def _printable(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


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
    # Only "=" separates: alias names hold colons (llama3.2:latest = ...).
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
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
        elif section not in (*SECTIONS, ALIASES):
            raise ConfigError(f"{path}: [{section}]: unknown section; allowed: "
                              f"{', '.join(f'[{s}]' for s in SECTIONS)}, [upstream.NAME], [aliases]"
                              f"{_hint(section, [*SECTIONS, 'upstream.NAME', ALIASES])}")
        known = [row.name for row in rows(section)]
        entries: Raw = {}
        for key, text in parser.items(section, raw=True):
            where = f"{path}: [{section}] {_printable(key)}"
            if section == ALIASES:  # free-form names, checked by _build_aliases
                entries[key] = (text, where)
                continue
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
        if var.startswith(env_name(ALIASES, "")):
            raise ConfigError(f"environment variable {var}: [aliases] come from the config file "
                              "only (a variable's name cannot spell a model name)")
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
                f"expected {ENV_PREFIX}<SECTION>_<KEY> for a key of "
                f"{', '.join(f'[{s}]' for s in SECTIONS)} or an [upstream.NAME] in the config "
                f"file, or {ADMIN_KEY_ENV}")


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


def _check_tls(raw: Raw, values: Mapping[str, Any], scheme: str) -> None:
    """ca_file must load as PEM CA certificates; ca_file and tls_verify go with an https url
    only (with http they would silently do nothing)."""
    if values["ca_file"]:
        where = f'{raw["ca_file"][1]} = "{values["ca_file"]}"'
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=values["ca_file"])
        except ssl.SSLError as exc:  # before OSError: it is one
            raise ConfigError(f"{where}: holds no PEM CA certificate ({exc.reason})") from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read the CA file: {exc}") from None
    if scheme != "https":
        for key in TLS_KEYS:
            text, where = raw.get(key, ("", ""))
            if text.strip():
                raise ConfigError(f'{where} = "{text.strip()}": only for an https:// url; '
                                  f'url is {values["url"]}')


def _check_models(raw: Raw, globs: Sequence[str]) -> None:
    """Each of ``models``' globs must be a name a model could have."""
    for glob in globs:
        problem = name_problem(glob)
        if problem is not None:
            text, where = raw["models"]
            raise ConfigError(f'{where} = "{_redact(text.strip())}": the glob {glob!r} {problem}')


def _build_upstream(section: str, raw: Raw, env: Mapping[str, str]) -> UpstreamConfig:
    values = _parse_section(section, raw)
    parts = urlsplit(values["url"])
    _check_tls(raw, values, parts.scheme)
    _check_models(raw, values["models"])
    return UpstreamConfig(name=section[len(UPSTREAM) + 1:], scheme=parts.scheme,
                          host=parts.hostname or "", port=parts.port or DEFAULT_PORTS[parts.scheme],
                          base_path=parts.path, api_key=_api_key(raw, values, env),
                          max_model_bytes=round(values["max_model_gb"] * GB) or None,
                          **_fields(section, values))


def _build_aliases(raw: Raw) -> Aliases:
    """``[aliases]``: each NAME a model name standing for TARGET, the real model's name.
    No chains: a TARGET that is itself an alias is refused, so a name resolves in one step."""
    names: dict[str, str] = {}  # canonical name -> the key, for the messages
    for key, (_, where) in raw.items():
        other = names.setdefault(canonical_model(key), key)
        if other != key:
            raise ConfigError(f"{where}: the same alias as [aliases] {other} (a name without a "
                              "tag is name:latest, and case does not count)")
    pairs = []
    for key, (text, where) in raw.items():
        target = text.strip()
        if not target:
            raise ConfigError(f"{where}: no target; write NAME = MODEL, e.g. "
                              "gpt-4o-mini = llama3.2:latest")
        for what, name in (("the alias name", key), ("the target", target)):
            problem = name_problem(name)
            if problem is not None:
                raise ConfigError(f"{where}: {what} {problem}")
        if canonical_model(target) == canonical_model(key):
            raise ConfigError(f'{where} = "{target}": an alias cannot stand for itself')
        if canonical_model(target) in names:
            raise ConfigError(f'{where} = "{target}": the target is itself an alias ([aliases] '
                              f"{names[canonical_model(target)]}); aliases do not chain: name "
                              "the model")
        pairs.append((key, target))
    return Aliases(pairs)


def load_config(path: str | None = None, *, env: Mapping[str, str] | None = None,
                listen: str | None = None, upstream_urls: Sequence[str] = ()) -> Config:
    """The effective config: file (``path``, else ``./ollama-proxy.ini`` if present),
    then ``env`` (default ``os.environ``), then ``listen`` and ``upstream_urls``.

    Raises ``ConfigError`` naming file, section, key, value and what is allowed."""
    env = os.environ if env is None else env
    source, file_sections = _read_file(path)
    aliases = _build_aliases(file_sections.pop(ALIASES, {}))
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
        aliases=aliases,
        routing=RoutingSettings(**_fields("routing", _parse_section("routing", sections["routing"]))),
        metrics=MetricsConfig(**_fields("metrics", _parse_section("metrics", sections["metrics"]))),
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
                                    ("limits", config.limits), ("routing", config.routing),
                                    ("metrics", config.metrics)]
    named += [(f"{UPSTREAM}.{u.name}", u) for u in config.upstreams]
    for section, obj in named:
        values = out[section] = {}
        for row in rows(section):
            if row.name in TLS_KEYS and isinstance(obj, UpstreamConfig) and obj.scheme != "https":
                continue  # not to be set with http
            if row.field is not None:
                values[row.name] = _show(row, getattr(obj, row.field))
            elif row.name == "max_model_gb":
                values[row.name] = f"{(obj.max_model_bytes or 0) / GB:.15g}"
            elif row.name == "listen":
                values["listen"] = host_port(obj.host, obj.port)
            elif row.name == "api_key_env":
                values["api_key"] = "(set)" if obj.api_key else "(not set)"
    if config.aliases:
        out[ALIASES] = dict(config.aliases.pairs)
    return out


def describe(config: Config) -> str:
    """The effective settings, ini-like, for ``check-config``."""
    lines = [f"# config file: {config.source or 'none (built-in defaults)'}"]
    for section, values in settings(config).items():
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {value}".rstrip() for key, value in values.items()]
    return "\n".join(lines) + "\n"
