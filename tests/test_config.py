"""ollama_proxy.config: ini + environment + CLI -> frozen dataclasses; every key in the
shipped example, overridable by OLLAMA_PROXY_<SECTION>_<KEY>, errors naming where."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trustme

from ollama_proxy.access.limits import Limits
from ollama_proxy.config import (
    DEFAULT_CONFIG_FILE,
    GB,
    Config,
    MetricsConfig,
    RoutingSettings,
    ServerConfig,
    UpstreamConfig,
    describe,
    load_config,
    settings,
)
from ollama_proxy.config_schema import SCHEMA, UPSTREAM, Key, rows
from ollama_proxy.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-upstream-secret-4711"


def write(tmp_path: Path, text: str, name: str = "proxy.ini") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None, **kw: object) -> Config:
    return load_config(write(tmp_path, text), env=env or {}, **kw)  # type: ignore[arg-type]


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env, **kw)
    return info.value.message


def defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.chdir(tmp_path)  # no ./ollama-proxy.ini here
    return load_config(env={})


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No file: the documented defaults and one upstream `default` at 127.0.0.1:11434."""
    config = defaults(tmp_path, monkeypatch)
    assert config.source is None
    assert config.server == ServerConfig(
        host="127.0.0.1", port=8080, max_body_bytes=64 * 1024 * 1024, max_header_bytes=64 * 1024,
        header_timeout_s=30.0, keepalive_timeout_s=75.0, drain_s=30.0, database="ollama-proxy.db",
        ledger_wait=True, body_timeout_s=60.0, send_timeout_s=60.0,
        max_response_bytes=32 * 1024 * 1024, max_connections=None, max_connections_per_ip=256,
        allow=(), deny=(), trusted_proxies=())
    assert config.log.level == "info"
    assert config.upstreams == (UpstreamConfig(
        name="default", url="http://127.0.0.1:11434", scheme="http", host="127.0.0.1", port=11434,
        base_path="", ca_file=None, tls_verify=True, kind="ollama", api_key=None,
        max_connections=1024, connect_timeout_s=5.0, first_byte_timeout_s=600.0,
        chunk_gap_timeout_s=300.0, tokenize="auto", models=(), priority=0, slots=0,
        max_model_bytes=None),)
    assert config.routing == RoutingSettings(
        refresh_s=30.0, health_interval_s=5.0, queue_timeout_s=60.0, max_queue=256,
        max_queued_per_user=16, eject_after_failures=3, eject_s=30.0, fair_queue=True)
    assert config.limits.weight == 1.0


def test_routing_dataclass_defaults_are_the_schema_defaults() -> None:
    """RoutingSettings() (a Config built without [routing]) holds the schema's defaults."""
    for row in rows("routing"):
        assert row.field is not None
        assert getattr(RoutingSettings(), row.field) == row.parse(row.default), row.name


def test_metrics_dataclass_defaults_are_the_schema_defaults() -> None:
    """MetricsConfig() (a Config built without [metrics]) holds the schema's defaults."""
    for row in rows("metrics"):
        assert row.field is not None
        assert getattr(MetricsConfig(), row.field) == row.parse(row.default), row.name


def test_config_is_frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Config objects are immutable."""
    config = defaults(tmp_path, monkeypatch)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]


def test_default_file_in_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """path=None reads ./ollama-proxy.ini when it exists and records it as source."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "[server]\nlisten = 127.0.0.1:9999\n", DEFAULT_CONFIG_FILE)
    config = load_config(env={})
    assert (config.source, config.server.port) == (DEFAULT_CONFIG_FILE, 9999)


def test_explicit_missing_file_is_error(tmp_path: Path) -> None:
    """An explicit path that does not exist is an error naming it."""
    missing = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError, match="nope.ini: config file not found"):
        load_config(missing, env={})


def test_shipped_example_equals_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped ollama-proxy.ini gives the defaults (its upstream is named `local`)."""
    expected = defaults(tmp_path, monkeypatch)
    shipped = load_config(str(REPO / DEFAULT_CONFIG_FILE), env={})
    assert shipped.server == expected.server and shipped.log == expected.log
    assert shipped.limits == expected.limits == Limits()
    assert shipped.routing == expected.routing == RoutingSettings()
    assert shipped.metrics == expected.metrics == MetricsConfig()
    assert [dataclasses.replace(u, name="default") for u in shipped.upstreams] == list(expected.upstreams)
    assert [u.name for u in shipped.upstreams] == ["local"]


@pytest.mark.parametrize("row", SCHEMA, ids=lambda row: f"{row.section}.{row.name}")
def test_shipped_example_documents_every_key(row: Key) -> None:
    """Each schema row's help text and default appear in the shipped example, verbatim."""
    text = (REPO / DEFAULT_CONFIG_FILE).read_text()
    comment = "\n".join("# " + line for line in row.help.splitlines())
    setting = f"{row.name} = {row.default}".rstrip()
    assert f"{comment}\n# {setting}\n" in text or f"{comment}\n{setting}\n" in text


@pytest.mark.parametrize("row", SCHEMA, ids=lambda row: f"{row.section}.{row.name}")
def test_every_default_parses(row: Key) -> None:
    """Every default in the table is itself a valid value."""
    row.parse(row.default)


# (section, key, bad value, part of the allowed-values text); one row at least per key.
BAD_VALUES = [
    ("server", "listen", "8080", "expected HOST:PORT"),
    ("server", "listen", "::1:8080", "[::1]:8080"),
    ("server", "listen", "[nothost]:8080", "expected HOST:PORT"),
    ("server", "listen", "127.0.0.1:65536", "port 0..65535"),
    ("server", "max_body_mb", "lots", "expected a whole number >= 1"),
    ("server", "max_body_mb", "0", "expected a whole number >= 1"),
    ("server", "max_body_mb", "1.5", "expected a whole number >= 1"),
    ("server", "max_header_kb", "-1", "expected a whole number >= 1"),
    ("server", "header_timeout_s", "0", "expected a number of seconds > 0"),
    ("server", "header_timeout_s", "nan", "expected a number of seconds > 0"),
    ("server", "keepalive_timeout_s", "soon", "expected a number of seconds > 0"),
    ("server", "drain_s", "-0.5", "expected a number of seconds >= 0"),
    ("server", "drain_s", "inf", "expected a number of seconds >= 0"),
    ("server", "database", "", "expected a file path"),
    ("server", "ledger_wait", "maybe", "expected true or false"),
    ("server", "body_timeout_s", "0", "expected a number of seconds > 0"),
    ("server", "send_timeout_s", "-1", "expected a number of seconds > 0"),
    ("server", "max_response_mb", "0", "expected a whole number >= 1"),
    ("server", "max_connections", "0", "or nothing for automatic"),
    ("server", "max_connections_per_ip", "many", "expected a whole number >= 1"),
    ("server", "allow", "10.0.0.0/33", "'10.0.0.0/33' is not one"),
    ("server", "deny", "example.com", "expected IP addresses or CIDR blocks"),
    ("server", "trusted_proxies", "10.0.0.1;10.0.0.2", "is not one"),
    ("log", "level", "verbose", "expected one of: debug, info, warning, error"),
    ("log", "access", "", "expected stdout, stderr, off or a file path"),
    ("limits", "requests_per_minute", "-1", "expected a whole number >= 0"),
    ("limits", "requests_per_day", "ten", "expected a whole number >= 0"),
    ("limits", "tokens_per_minute", "1.5", "expected a whole number >= 0"),
    ("limits", "tokens_per_day", "1e6", "or nothing for unlimited"),
    ("limits", "token_quota", "lots", "expected a whole number >= 0"),
    ("limits", "quota_period", "week", "expected one of: total, month"),
    ("limits", "max_concurrent", "-2", "expected a whole number >= 0"),
    ("limits", "max_tokens_per_request", "none", "expected a whole number >= 0"),
    ("limits", "allowed_models", '"llama3.2"', "expected model globs"),
    ("limits", "allowed_models", "llama3.2;qwen", "'llama3.2;qwen' is not one"),
    ("limits", "expires_at", "tomorrow", "expected an ISO 8601 date or time"),
    ("limits", "expires_at", "2026-02-30", "expected an ISO 8601 date or time"),
    ("limits", "weight", "0", "expected a number > 0 and <= 1000"),
    ("limits", "weight", "1001", "expected a number > 0 and <= 1000"),
    ("limits", "weight", "nan", "expected a number > 0 and <= 1000"),
    ("limits", "weight", "heavy", "expected a number > 0"),
    ("routing", "refresh_s", "0", "expected a number of seconds > 0"),
    ("routing", "health_interval_s", "-1", "expected a number of seconds > 0"),
    ("routing", "queue_timeout_s", "forever", "expected a number of seconds > 0"),
    ("routing", "max_queue", "0", "expected a whole number >= 1"),
    ("routing", "max_queued_per_user", "1.5", "expected a whole number >= 1"),
    ("routing", "eject_after_failures", "0", "expected a whole number >= 1"),
    ("routing", "eject_s", "inf", "expected a number of seconds > 0"),
    ("routing", "fair_queue", "yes", "expected true or false"),
    ("metrics", "allow", "localhost", "expected IP addresses or CIDR blocks"),
    ("metrics", "per_user", "no", "expected true or false"),
    ("upstream.gpu-1", "url", "ftp://gpu1", "expected http://HOST[:PORT][/PATH]"),
    ("upstream.gpu-1", "url", "http://", "expected http://HOST"),
    ("upstream.gpu-1", "url", "gpu1:11434", "expected http://HOST"),
    ("upstream.gpu-1", "url", "http://gpu1:0", "expected http://HOST"),
    ("upstream.gpu-1", "url", "http://gpu1:99999", "expected http://HOST"),
    ("upstream.gpu-1", "url", "http://gpu1/?a=1", "without query"),
    ("upstream.gpu-1", "url", "http://gpu1/#top", "without query, fragment"),
    ("upstream.gpu-1", "url", "http://[::1/", "expected http://HOST"),
    ("upstream.gpu-1", "url", "https://", "or https://HOST[:PORT][/PATH]"),
    ("upstream.gpu-1", "ca_file", "/nonexistent/ca.pem", "cannot read the CA file: [Errno 2]"),
    ("upstream.gpu-1", "ca_file", "/", "cannot read the CA file"),
    ("upstream.gpu-1", "tls_verify", "maybe", "expected true or false"),
    ("upstream.gpu-1", "kind", "vllm", "expected one of: ollama, openai"),
    ("upstream.gpu-1", "models", "llama\x01x", r"the glob 'llama\x01x' holds a control character"),
    ("upstream.gpu-1", "priority", "1.5", "expected a whole number, e.g. -1, 0 or 10"),
    ("upstream.gpu-1", "priority", "high", "expected a whole number"),
    ("upstream.gpu-1", "slots", "-1", "expected a whole number >= 0"),
    ("upstream.gpu-1", "max_model_gb", "-8", "expected a number of GB >= 0 (0: no limit)"),
    ("upstream.gpu-1", "max_model_gb", "70B", "expected a number of GB >= 0"),
    ("upstream.gpu-1", "tokenize", "yes", "expected one of: auto, off"),
    ("upstream.gpu-1", "api_key_env", "MY-KEY", "name of an environment variable"),
    ("upstream.gpu-1", "api_key_file", "/nonexistent/key", "cannot read the key file"),
    ("upstream.gpu-1", "max_connections", "0", "expected a whole number >= 1"),
    ("upstream.gpu-1", "connect_timeout_s", "0", "expected a number of seconds > 0"),
    ("upstream.gpu-1", "first_byte_timeout_s", "x", "expected a number of seconds > 0"),
    ("upstream.gpu-1", "chunk_gap_timeout_s", "-3", "expected a number of seconds > 0"),
]


def test_bad_value_table_covers_every_key() -> None:
    """Adding a schema row without a bad-value test row fails here."""
    covered = {(UPSTREAM if s.startswith(UPSTREAM) else s, k) for s, k, _, _ in BAD_VALUES}
    assert covered == {(row.section, row.name) for row in SCHEMA}


def shown(value: str) -> str:
    """A value as messages echo it: control characters as \\xNN."""
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in value)


@pytest.mark.parametrize("section,key,bad,allowed", BAD_VALUES)
def test_bad_value_names_file_section_key_value(tmp_path: Path, section: str, key: str,
                                                bad: str, allowed: str) -> None:
    """A bad value's error names file, section, key, the value and what is allowed."""
    message = error_of(tmp_path, f"[{section}]\n{key} = {bad}\n")
    assert message.startswith(f'{tmp_path / "proxy.ini"}: [{section}] {key} = "{shown(bad)}": ')
    assert allowed in message


@pytest.mark.parametrize("section,key,bad,allowed", BAD_VALUES[:3] + BAD_VALUES[-4:])
def test_bad_env_value_names_the_variable(tmp_path: Path, section: str, key: str,
                                          bad: str, allowed: str) -> None:
    """A bad value from the environment names the variable instead of file and section."""
    var = f"OLLAMA_PROXY_{section.upper().replace('.', '_').replace('-', '_')}_{key.upper()}"
    message = error_of(tmp_path, "[upstream.gpu-1]\n", env={var: bad})
    assert message.startswith(f'environment variable {var} = "{shown(bad)}": ')
    assert allowed in message


@pytest.mark.parametrize("text,expected", [
    ("[server]\nlisten_port = 1\n",
     "[server] listen_port: unknown key (did you mean listen?); allowed: listen,"),
    ("[upstream.a]\nweight = 1\n",
     "[upstream.a] weight: unknown key; allowed: url, ca_file, tls_verify, kind, models,"),
    ("[routing]\nslots = 1\n", "[routing] slots: unknown key; allowed: refresh_s,"),
    ("[servr]\n",
     "[servr]: unknown section; allowed: [server], [log], [limits], [routing], [metrics], [upstream.NAME], "
     "[aliases] (did you mean server?)"),
    ("[routng]\n", "(did you mean routing?)"),
    ("[upstream]\n", "[upstream]: unknown section"),
    ("[upstream.GPU]\n", "[upstream.GPU]: an upstream NAME may only hold lowercase letters, digits, _ and -"),
    ("[upstream.a.b]\n", "[upstream.a.b]: an upstream NAME may only hold"),
    ("[DEFAULT]\nlevel = info\n[log]\n", "[DEFAULT]: not supported"),
    ("[server]\nlisten = 1.2.3.4:1\nlisten = 1.2.3.4:2\n", "line 3: [server] listen is set twice"),
    ("[log]\n[log]\n", "line 2: [log] appears twice"),
    ("listen = 1.2.3.4:1\n", "line 1: a setting before the first [section] header"),
    ("[server]\nthis is not a setting\n", "line 2: expected KEY = VALUE"),
    ("[upstream.gpu-1]\n[upstream.gpu_1]\n", "[upstream.gpu-1] and [upstream.gpu_1] both map to"),
])
def test_structural_errors(tmp_path: Path, text: str, expected: str) -> None:
    """Unknown sections/keys, bad upstream names, DEFAULT keys and parse errors name the file."""
    message = error_of(tmp_path, text)
    assert message.startswith(str(tmp_path / "proxy.ini"))
    assert expected in message


def test_keys_are_case_insensitive(tmp_path: Path) -> None:
    """Keys are case-insensitive, as configparser makes them; values keep their case."""
    config = load(tmp_path, "[server]\nMAX_BODY_MB = 2\nDatabase = /srv/Proxy.db\n")
    assert (config.server.max_body_bytes, config.server.database) == (2 * 1024 * 1024, "/srv/Proxy.db")


def test_units_in_names(tmp_path: Path) -> None:
    """MiB/KiB in the ini become bytes; seconds accept fractions; level is lower-cased."""
    config = load(tmp_path, "[server]\nmax_body_mb = 3\nmax_header_kb = 8\nheader_timeout_s = 0.5\n"
                            "drain_s = 0\n[log]\nlevel = DEBUG\n")
    assert (config.server.max_body_bytes, config.server.max_header_bytes) == (3 << 20, 8 << 10)
    assert (config.server.header_timeout_s, config.server.drain_s, config.log.level) == (0.5, 0.0, "debug")


@pytest.mark.parametrize("listen,host,port", [
    ("0.0.0.0:0", "0.0.0.0", 0),
    ("localhost:8080", "localhost", 8080),
    ("[::1]:8080", "::1", 8080),
    ("[::]:65535", "::", 65535),
])
def test_listen(tmp_path: Path, listen: str, host: str, port: int) -> None:
    """listen is HOST:PORT, IPv6 in brackets (host without brackets), port 0..65535."""
    config = load(tmp_path, f"[server]\nlisten = {listen}\n")
    assert (config.server.host, config.server.port) == (host, port)


@pytest.mark.parametrize("url,normal,host,port,base_path", [
    ("http://127.0.0.1:11434", "http://127.0.0.1:11434", "127.0.0.1", 11434, ""),
    ("http://127.0.0.1:11434/", "http://127.0.0.1:11434", "127.0.0.1", 11434, ""),
    ("HTTP://GPU1", "http://gpu1", "gpu1", 80, ""),
    ("http://gpu1:80/ollama/", "http://gpu1/ollama", "gpu1", 80, "/ollama"),
    ("http://[::1]:8000/v/x", "http://[::1]:8000/v/x", "::1", 8000, "/v/x"),
    ("https://gpu1", "https://gpu1", "gpu1", 443, ""),
    ("HTTPS://gpu1:443/ollama/", "https://gpu1/ollama", "gpu1", 443, "/ollama"),
    ("https://gpu1:80", "https://gpu1:80", "gpu1", 80, ""),
])
def test_upstream_url(tmp_path: Path, url: str, normal: str, host: str, port: int, base_path: str) -> None:
    """The url is normalised (no trailing slash, default port dropped) and split into
    scheme/host/port/path."""
    (up,) = load(tmp_path, f"[upstream.a]\nurl = {url}\n").upstreams
    assert (up.url, up.host, up.port, up.base_path) == (normal, host, port, base_path)
    assert up.scheme == normal.split(":")[0]


def test_https_upstream_with_a_private_ca(tmp_path: Path) -> None:
    """ca_file (a PEM of CA certificates) and tls_verify are read, from the file or the
    environment; tls_verify defaults to true."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (up,) = load(tmp_path, f"[upstream.a]\nurl = https://gpu1\nca_file = {tmp_path / 'ca.pem'}\n").upstreams
    assert (up.scheme, up.ca_file, up.tls_verify) == ("https", str(tmp_path / "ca.pem"), True)
    (up,) = load(tmp_path, "[upstream.a]\nurl = https://gpu1\n",
                 env={"OLLAMA_PROXY_UPSTREAM_A_TLS_VERIFY": "false"}).upstreams
    assert (up.ca_file, up.tls_verify) == (None, False)


def test_a_ca_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    """A readable ca_file without a PEM certificate is an error saying so."""
    write(tmp_path, "not a certificate\n", "ca.pem")
    message = error_of(tmp_path, f"[upstream.a]\nurl = https://gpu1\nca_file = {tmp_path / 'ca.pem'}\n")
    assert message.endswith('[upstream.a] ca_file = "' + str(tmp_path / "ca.pem") +
                            '": holds no PEM CA certificate (NO_CERTIFICATE_OR_CRL_FOUND)')


@pytest.mark.parametrize("setting", ["ca_file = {ca}", "tls_verify = false", "tls_verify = true"])
def test_tls_keys_on_an_http_url_are_refused(tmp_path: Path, setting: str) -> None:
    """ca_file or tls_verify with an http url would do nothing: an error, not silence."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    setting = setting.format(ca=tmp_path / "ca.pem")
    key, _, value = setting.partition(" = ")
    message = error_of(tmp_path, f"[upstream.a]\nurl = http://gpu1:11434\n{setting}\n")
    assert message.endswith(f'[upstream.a] {key} = "{value}": only for an https:// url; '
                            f'url is http://gpu1:11434')


def test_url_userinfo_is_refused_and_not_echoed(tmp_path: Path) -> None:
    """user:password in an upstream url is refused, and the password is not in the message."""
    message = error_of(tmp_path, "[upstream.a]\nurl = http://bob:hunter2@gpu1:11434\n")
    assert "hunter2" not in message and "user:password" in message


def test_upstreams_keep_file_order(tmp_path: Path) -> None:
    """Upstreams come in file order with their own settings."""
    config = load(tmp_path, "[upstream.zeta]\nurl = http://z:1\nkind = openai\n"
                            "[upstream.alpha]\nurl = http://a:2\nmax_connections = 3\n")
    assert [(u.name, u.kind, u.max_connections) for u in config.upstreams] == [
        ("zeta", "openai", 1024), ("alpha", "ollama", 3)]


def test_env_overrides(tmp_path: Path) -> None:
    """OLLAMA_PROXY_<SECTION>_<KEY> overrides the file; '.' and '-' in the section become '_'."""
    config = load(tmp_path, "[server]\nlisten = 127.0.0.1:1\n[upstream.gpu-1]\nurl = http://a:1\n", env={
        "OLLAMA_PROXY_SERVER_LISTEN": "0.0.0.0:2",
        "OLLAMA_PROXY_LOG_LEVEL": "warning",
        "OLLAMA_PROXY_UPSTREAM_GPU_1_URL": " http://b:2 ",
        "OLLAMA_PROXY_UPSTREAM_GPU_1_CHUNK_GAP_TIMEOUT_S": "7",
        "UNRELATED": "x",
    })
    assert (config.server.host, config.server.port, config.log.level) == ("0.0.0.0", 2, "warning")
    assert [(u.url, u.chunk_gap_timeout_s) for u in config.upstreams] == [("http://b:2", 7.0)]


def test_env_overrides_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no file, env sets [server], [log] and the implicit [upstream.default]."""
    monkeypatch.chdir(tmp_path)
    config = load_config(env={"OLLAMA_PROXY_SERVER_MAX_BODY_MB": "1",
                              "OLLAMA_PROXY_UPSTREAM_DEFAULT_URL": "http://gpu:11434"})
    assert config.server.max_body_bytes == 1 << 20
    assert [(u.name, u.url) for u in config.upstreams] == [("default", "http://gpu:11434")]


@pytest.mark.parametrize("var", [
    "OLLAMA_PROXY_SERVER_LISTN",
    "OLLAMA_PROXY_UPSTREAM_OTHER_URL",   # no [upstream.other] in the file
    "OLLAMA_PROXY_UPSTREAM_A_API_KEY",   # secrets are not a key
    "OLLAMA_PROXY_LIMITS_REQUESTS_PER_HOUR",  # not a limit name
])
def test_unknown_env_var_is_error(tmp_path: Path, var: str) -> None:
    """An OLLAMA_PROXY_ variable matching no section+key is an error naming it."""
    message = error_of(tmp_path, "[upstream.a]\n", env={var: "1"})
    assert message.startswith(f"environment variable {var}: matches no setting")


def test_unknown_env_var_suggests_close_name(tmp_path: Path) -> None:
    """The unknown-variable error suggests the closest real name."""
    message = error_of(tmp_path, "", env={"OLLAMA_PROXY_SERVER_LISTN": "x"})
    assert "did you mean OLLAMA_PROXY_SERVER_LISTEN?" in message


def test_admin_key_and_referenced_vars_are_not_errors(tmp_path: Path) -> None:
    """OLLAMA_PROXY_ADMIN_KEY and a variable named by api_key_env are never unknown."""
    config = load(tmp_path, "[upstream.a]\napi_key_env = OLLAMA_PROXY_SECRET_A\n", env={
        "OLLAMA_PROXY_ADMIN_KEY": "admin-secret", "OLLAMA_PROXY_SECRET_A": SECRET})
    assert config.upstreams[0].api_key == SECRET


def test_cli_listen_beats_env(tmp_path: Path) -> None:
    """--listen overrides the file and the environment."""
    config = load(tmp_path, "[server]\nlisten = 127.0.0.1:1\n",
                  env={"OLLAMA_PROXY_SERVER_LISTEN": "127.0.0.1:2"}, listen="[::1]:3")
    assert (config.server.host, config.server.port) == ("::1", 3)


def test_bad_cli_listen_names_the_flag(tmp_path: Path) -> None:
    """A bad --listen is reported as such."""
    assert error_of(tmp_path, "", listen="nope").startswith('--listen = "nope": expected HOST:PORT')


def test_cli_upstreams_replace_file_upstreams(tmp_path: Path) -> None:
    """--upstream replaces every [upstream.NAME] with default, default2, ... at default settings."""
    config = load(tmp_path, "[upstream.a]\nurl = http://a:1\nkind = openai\n",
                  env={"OLLAMA_PROXY_UPSTREAM_A_URL": "http://ignored:1",
                       "OLLAMA_PROXY_UPSTREAM_DEFAULT2_MAX_CONNECTIONS": "2",
                       "OLLAMA_PROXY_UPSTREAM_DEFAULT_URL": "http://loses-to-cli:1"},
                  upstream_urls=["http://x:1", "http://y:2/p/", "http://z:3"])
    assert [(u.name, u.url, u.kind, u.max_connections) for u in config.upstreams] == [
        ("default", "http://x:1", "ollama", 1024), ("default2", "http://y:2/p", "ollama", 2),
        ("default3", "http://z:3", "ollama", 1024)]


def test_cli_upstreams_keep_file_key_vars_known(tmp_path: Path) -> None:
    """A variable named by a replaced upstream's api_key_env is still not an unknown variable."""
    config = load(tmp_path, "[upstream.a]\napi_key_env = OLLAMA_PROXY_KEY_A\n",
                  env={"OLLAMA_PROXY_KEY_A": SECRET}, upstream_urls=["http://x:1"])
    assert [(u.name, u.api_key) for u in config.upstreams] == [("default", None)]


def test_bad_cli_upstream_names_the_flag(tmp_path: Path) -> None:
    """A bad --upstream URL is reported as such."""
    message = error_of(tmp_path, "", upstream_urls=["ftp://x"])
    assert message.startswith('--upstream = "ftp://x": expected http://HOST[:PORT][/PATH]')


def test_api_key_from_env(tmp_path: Path) -> None:
    """api_key_env names the variable that holds the upstream key."""
    (up,) = load(tmp_path, "[upstream.a]\napi_key_env = VLLM_KEY\n", env={"VLLM_KEY": SECRET}).upstreams
    assert up.api_key == SECRET


def test_api_key_from_file(tmp_path: Path) -> None:
    """api_key_file names a file whose stripped content is the upstream key."""
    key_file = tmp_path / "key"
    key_file.write_text(f"  {SECRET}\n")
    (up,) = load(tmp_path, f"[upstream.a]\napi_key_file = {key_file}\n").upstreams
    assert up.api_key == SECRET


@pytest.mark.parametrize("text,env,expected", [
    ("[upstream.a]\napi_key = sk-x\n", {}, "[upstream.a] api_key: secrets never go in the config file; "
                                           "set api_key_env"),
    ("[upstream.a]\napi_key_env = K\napi_key_file = /k\n", {"K": "x"}, "api_key_env is set too"),
    ("[upstream.a]\napi_key_env = K\n", {}, '[upstream.a] api_key_env = "K": the environment variable '
                                            "is not set or empty"),
    ("[upstream.a]\napi_key_env = K\n", {"K": "  "}, "is not set or empty"),
    ("[upstream.a]\napi_key_env = K\n", {"K": "a b"}, "the key holds spaces"),
])
def test_api_key_errors(tmp_path: Path, text: str, env: dict[str, str], expected: str) -> None:
    """api_key in the ini, both sources, an unset variable or a bad key are errors."""
    message = error_of(tmp_path, text, env=env)
    assert expected in message and "sk-x" not in message


def test_api_key_file_empty_is_error(tmp_path: Path) -> None:
    """An empty key file is an error, not a silent no-key."""
    (tmp_path / "key").write_text("\n")
    assert "the key file is empty" in error_of(tmp_path, f"[upstream.a]\napi_key_file = {tmp_path / 'key'}\n")


def test_describe_shows_settings_never_secrets(tmp_path: Path) -> None:
    """describe() lists every effective key and shows the upstream key only as (set)."""
    config = load(tmp_path, "[server]\nlisten = [::1]:9000\n[upstream.a]\napi_key_env = K\n"
                            "[upstream.b]\nurl = https://gpu1\n", env={"K": SECRET})
    text = describe(config)
    assert SECRET not in text
    assert "listen = [::1]:9000" in text and "max_body_mb = 64" in text and "header_timeout_s = 30" in text
    assert "[upstream.a]" in text and "api_key = (set)" in text and "api_key = (not set)" in text
    for row in SCHEMA:
        if row.name not in ("api_key_env", "api_key_file"):
            assert f"\n{row.name} =" in text


def test_describe_round_trips(tmp_path: Path) -> None:
    """describe()'s output, minus the api_key lines, loads back to the same config."""
    config = load(tmp_path, "[server]\nmax_body_mb = 5\ndrain_s = 2.5\n[upstream.a]\nurl = http://x:1/p\n"
                            "[upstream.b]\nurl = https://y\ntls_verify = false\n")
    text = "\n".join(line for line in describe(config).splitlines() if not line.startswith("api_key"))
    again = load(tmp_path, text)
    assert (again.server, again.log, again.upstreams) == (config.server, config.log, config.upstreams)
    assert "ca_file" not in settings(config)["upstream.a"]  # an http url takes no TLS keys


def test_limits_section(tmp_path: Path) -> None:
    """[limits] fills the users' default Limits: empty = unlimited, globs split on commas
    and spaces, ISO 8601 expiry; the environment overrides it; describe round-trips it."""
    config = load(tmp_path, "[limits]\ntokens_per_day = 5000\nrequests_per_minute = 0\n"
                            "allowed_models = llama3.2, qwen*  mistral:7b\nquota_period = MONTH\n"
                            "token_quota =\nexpires_at = 2026-12-31T18:00:00+01:00\n",
                  env={"OLLAMA_PROXY_LIMITS_MAX_CONCURRENT": "3"})
    assert config.limits == Limits(
        tokens_per_day=5000, requests_per_minute=0, quota_period="month", max_concurrent=3,
        allowed_models=("llama3.2", "qwen*", "mistral:7b"), expires_at=1798736400.0)
    text = describe(config)
    assert "\nallowed_models = llama3.2, qwen*, mistral:7b\n" in text
    assert "\nexpires_at = 2026-12-31T17:00:00Z\n" in text and "\ntoken_quota =\n" in text
    text = "\n".join(line for line in text.splitlines() if not line.startswith("api_key"))
    assert load(tmp_path, text).limits == config.limits


def test_aliases_section(tmp_path: Path) -> None:
    """[aliases] NAME = TARGET lines in file order, names compared canonically (a name
    with a colon works: only = separates); describe round-trips them."""
    config = load(tmp_path, "[aliases]\ngpt-4o-mini = llama3.2:latest\n"
                            "fast:v1 = qwen2.5:0.5b\nembedder = nomic-embed-text\n")
    assert config.aliases.pairs == (("gpt-4o-mini", "llama3.2:latest"), ("fast:v1", "qwen2.5:0.5b"),
                                    ("embedder", "nomic-embed-text"))
    assert config.aliases.target("GPT-4o-mini:latest") == "llama3.2:latest"
    assert config.aliases.target("llama3.2") is None
    text = describe(config)
    assert "\n[aliases]\ngpt-4o-mini = llama3.2:latest\nfast:v1 = qwen2.5:0.5b\n" in text
    text = "\n".join(line for line in text.splitlines() if not line.startswith("api_key"))
    assert load(tmp_path, text).aliases == config.aliases


def test_no_aliases_by_default(tmp_path: Path) -> None:
    config = load(tmp_path, "[aliases]\n")
    assert not config.aliases and "[aliases]" not in describe(config)


@pytest.mark.parametrize(("lines", "expected"), [
    ("gpt =\n", "[aliases] gpt: no target; write NAME = MODEL"),
    ("gpt = llama3.2\ngpt:latest = qwen\n",
     "[aliases] gpt:latest: the same alias as [aliases] gpt (a name without a tag is name:latest"),
    ("llama3.2 = llama3.2:latest\n", '[aliases] llama3.2 = "llama3.2:latest": an alias cannot stand '
                                     "for itself"),
    ("gpt = fast\nfast = llama3.2\n", '[aliases] gpt = "fast": the target is itself an alias '
                                      "([aliases] fast); aliases do not chain"),
    ("gpt = fast:latest\nfast = llama3.2\n", "the target is itself an alias ([aliases] fast)"),
    ("gpt = llama\x7f3\n", "[aliases] gpt: the target holds a control character"),
    ("gp\x01t = llama3\n", ": the alias name holds a control character"),
    ("gpt = " + "m" * 1025 + "\n", "[aliases] gpt: the target is longer than 1024 characters"),
])
def test_bad_aliases_are_refused_precisely(tmp_path: Path, lines: str, expected: str) -> None:
    """An empty target, one alias twice, an alias of itself, a chain, a name no model can
    have: each an error naming the file, the section and the alias."""
    message = error_of(tmp_path, "[aliases]\n" + lines)
    assert message.startswith(str(tmp_path / "proxy.ini")) and expected in message


def test_aliases_come_from_the_file_only(tmp_path: Path) -> None:
    """The environment cannot spell a model name: an OLLAMA_PROXY_ALIASES_ variable says so."""
    message = error_of(tmp_path, "[aliases]\ngpt = llama3.2\n",
                       env={"OLLAMA_PROXY_ALIASES_GPT": "qwen"})
    assert message == ("environment variable OLLAMA_PROXY_ALIASES_GPT: [aliases] come from the "
                       "config file only (a variable's name cannot spell a model name)")


def test_routing_section(tmp_path: Path) -> None:
    """[routing] fills Config.routing; the environment overrides it as OLLAMA_PROXY_ROUTING_*;
    settings() and describe() show it, and describe's text loads back to the same values."""
    config = load(tmp_path, "[routing]\nrefresh_s = 2.5\nmax_queue = 10\nfair_queue = FALSE\n",
                  env={"OLLAMA_PROXY_ROUTING_QUEUE_TIMEOUT_S": "7",
                       "OLLAMA_PROXY_ROUTING_MAX_QUEUED_PER_USER": "2",
                       "OLLAMA_PROXY_ROUTING_EJECT_S": "0.5"})
    assert config.routing == RoutingSettings(refresh_s=2.5, max_queue=10, fair_queue=False,
                                           queue_timeout_s=7.0, max_queued_per_user=2, eject_s=0.5)
    assert settings(config)["routing"] == {
        "refresh_s": "2.5", "health_interval_s": "5", "queue_timeout_s": "7", "max_queue": "10",
        "max_queued_per_user": "2", "eject_after_failures": "3", "eject_s": "0.5",
        "fair_queue": "False"}
    text = "\n".join(line for line in describe(config).splitlines() if not line.startswith("api_key"))
    assert "\n[routing]\nrefresh_s = 2.5\n" in text
    assert load(tmp_path, text).routing == config.routing


def test_a_config_built_without_routing_has_the_defaults(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Config(...) without routing= still builds, with [routing]'s defaults."""
    config = defaults(tmp_path, monkeypatch)
    again = Config(server=config.server, log=config.log, limits=config.limits,
                   upstreams=config.upstreams, source=None)
    assert again.routing == config.routing == RoutingSettings()


def test_upstream_routing_keys(tmp_path: Path) -> None:
    """models (globs split on commas and spaces), priority (may be negative), slots and
    max_model_gb (GB of 10^9 bytes; 0: no limit) per backend; the environment sets them
    too, and describe() writes them back to the same values."""
    config = load(tmp_path, "[upstream.big]\nurl = http://big:11434\nmodels = llama3*, qwen2.5:7b"
                            "  mistral\npriority = -1\nslots = 4\nmax_model_gb = 7.5\n"
                            "[upstream.old]\nurl = http://old:11434\npriority = 10\n",
                  env={"OLLAMA_PROXY_UPSTREAM_OLD_SLOTS": "1",
                       "OLLAMA_PROXY_UPSTREAM_OLD_MAX_MODEL_GB": "0.000000001"})
    big, old = config.upstreams
    assert (big.models, big.priority, big.slots, big.max_model_bytes) == (
        ("llama3*", "qwen2.5:7b", "mistral"), -1, 4, 7_500_000_000)
    assert (old.models, old.priority, old.slots, old.max_model_bytes) == ((), 10, 1, 1)
    assert GB == 1_000_000_000
    shown = settings(config)
    assert {k: shown["upstream.big"][k] for k in ("models", "priority", "slots", "max_model_gb")} == {
        "models": "llama3*, qwen2.5:7b, mistral", "priority": "-1", "slots": "4",
        "max_model_gb": "7.5"}
    assert (shown["upstream.old"]["models"], shown["upstream.old"]["max_model_gb"]) == ("", "1e-09")
    text = "\n".join(line for line in describe(config).splitlines() if not line.startswith("api_key"))
    assert load(tmp_path, text).upstreams == config.upstreams


def test_max_model_gb_zero_is_no_limit(tmp_path: Path) -> None:
    """max_model_gb = 0 (the default) is no limit: max_model_bytes None; describe writes 0."""
    config = load(tmp_path, "[upstream.a]\nmax_model_gb = 0.0\n")
    assert config.upstreams[0].max_model_bytes is None
    assert settings(config)["upstream.a"]["max_model_gb"] == "0"


def test_a_models_glob_too_long_for_a_model_name_is_refused(tmp_path: Path) -> None:
    """Each glob of models is judged as a model name: one longer than any can be is refused."""
    long = "m" * 2000
    message = error_of(tmp_path, f"[upstream.a]\nmodels = llama3*, {long}\n")
    assert message.startswith(f'{tmp_path / "proxy.ini"}: [upstream.a] models = "llama3*, ')
    assert "is longer than" in message


def test_weight_limit_in_the_limits_section(tmp_path: Path) -> None:
    """[limits] weight is every user's default share of the slots; fractions are fine; it
    is no count, so a user with only a weight still takes the unbounded fast path."""
    config = load(tmp_path, "[limits]\nweight = 0.25\n")
    assert config.limits == Limits(weight=0.25) and config.limits.unbounded
    assert settings(config)["limits"]["weight"] == "0.25"
    env = load(tmp_path, "", env={"OLLAMA_PROXY_LIMITS_WEIGHT": "1000"})
    assert env.limits.weight == 1000.0


@pytest.mark.parametrize("text", [
    "[upstream.a]\nurl = http://127.0.0.1:1\nmodels = llama\x01x\x1b[31mRED\n",
    "[aliases]\ng\x1b[2Jpt = llama3.2\n",
])
def test_a_control_character_from_the_file_is_echoed_escaped(tmp_path, text):
    """A message quoting the file never carries its control characters (an escape
    sequence would act on the reader's terminal): they are written as \\xNN."""
    ini = tmp_path / "bad.ini"
    ini.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(ini), env={})
    assert "\\x1b[" in err.value.message
    assert not any(ord(c) < 32 or ord(c) == 127 for c in err.value.message)
