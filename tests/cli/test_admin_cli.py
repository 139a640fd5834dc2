"""The offline admin CLI (``users``, ``keys``, ``usage``) on a temporary database file."""

from __future__ import annotations

import json
import pathlib
import re
import time
from dataclasses import dataclass
from typing import Any

import pytest

from ledger_rows import insert as insert_rows
from ollama_proxy.__main__ import main
from ollama_proxy.access.keys import key_prefix
from ollama_proxy.access.limits import LIMIT_NAMES
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.cli.admin import STORE_IT, actor
from ollama_proxy.errors import Conflict
from ollama_proxy.store import accounts, db

KEY_RE = re.compile(r"op-[A-Za-z0-9_-]{20,}")


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """Runs ``main`` on one database file and captures what it printed."""

    db: pathlib.Path
    capsys: pytest.CaptureFixture[str]

    def __call__(self, *argv: str) -> Result:
        code = main([*argv, "--database", str(self.db)])
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def json(self, *argv: str) -> Any:
        result = self(*argv, "--json")
        assert result.code == 0, result.err
        return json.loads(result.out)

    def create(self, name: str, *extra: str) -> str:
        """Create a user; its first key."""
        return str(self.json("users", "create", name, *extra)["key"])

    def files_bytes(self) -> bytes:
        """Every file beside the database (the database, its WAL, the secret)."""
        return b"".join(p.read_bytes() for p in self.db.parent.iterdir() if p.is_file())


@pytest.fixture
def cli(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path / "x.db", capsys)


def _failed(result: Result) -> str:
    """The one-line error of a failed command (exit 1, nothing on stdout)."""
    assert result.code == 1
    assert result.out == ""
    assert result.err.startswith("ollama-proxy: ") and result.err.count("\n") == 1
    return result.err


def _record(user: str | None, model: str, prompt: int, completion: int, *, status: int = 200,
            when: float | None = None, gpu_ms: int | None = None) -> RequestRecord:
    """``gpu_ms``: Ollama's timings (that much generating, a tenth of it loading)."""
    ns = None if gpu_ms is None else gpu_ms * 1_000_000
    return RequestRecord(
        total_ns=ns, load_ns=None if ns is None else ns // 10, eval_ns=ns,
        request_id=f"r{time.monotonic_ns()}", time=when or time.time(), endpoint="/api/chat",
        model=model, backend="default", status=status,
        outcome="ok" if status < 400 else "upstream_error", prompt_tokens=prompt,
        completion_tokens=completion, estimated=False, stream=True, duration_s=0.1, ttfb_s=0.01,
        client="127.0.0.1", user=user, key_prefix=None)


def _fill_ledger(cli: Cli, records: list[RequestRecord]) -> None:
    conn = db.connect(str(cli.db))
    try:
        insert_rows(conn, records)
    finally:
        conn.close()


# ---------------------------------------------------------------- users


def test_create_prints_the_key_once_with_a_warning(cli: Cli) -> None:
    """`users create` prints the user and its first key, and says it is shown once."""
    result = cli("users", "create", "alice")
    assert result.code == 0
    keys = KEY_RE.findall(result.out)
    assert len(keys) == 1
    assert "alice" in result.out and "role user" in result.out
    assert STORE_IT in result.out


def test_key_never_shown_again_nor_stored(cli: Cli) -> None:
    """After creation a key is in no output (show, list, keys list, revoke) and in no file."""
    key = cli.create("alice")
    key2 = cli.json("keys", "create", "alice")["key"]
    outputs = [cli(*argv) for argv in (
        ("users", "show", "alice"), ("users", "show", "alice", "--json"),
        ("users", "list"), ("users", "list", "--json"), ("keys", "list"),
        ("keys", "list", "alice", "--json"), ("users", "limits", "alice"), ("usage",),
        ("keys", "revoke", key2))]  # a whole key pasted to revoke: revoked, never echoed
    for result in outputs:
        assert result.code == 0
        assert key not in result.out + result.err and key2 not in result.out + result.err
    assert key_prefix(key) in outputs[0].out
    assert outputs[-1].out == f"revoked key {key_prefix(key2)}\n"
    revoked = {k["prefix"]: k["revoked"] for k in cli.json("keys", "list", "alice")["keys"]}
    assert revoked == {key_prefix(key): False, key_prefix(key2): True}
    stored = cli.files_bytes()
    for k in (key, key2):
        assert k.encode() not in stored
        assert k[len("op-"):].encode() not in stored


def test_create_json_shape(cli: Cli) -> None:
    """--json answers like POST /admin/api/users: name, role, limits, suspended, key."""
    body = cli.json("users", "create", "bob", "--role", "admin",
                    "--limit", "requests_per_minute=60", "--limit", "allowed_models=llama3*,qwen*")
    assert {"name", "role", "limits", "suspended", "key"} <= body.keys()
    assert (body["name"], body["role"], body["suspended"]) == ("bob", "admin", False)
    assert body["limits"]["requests_per_minute"] == 60
    assert body["limits"]["allowed_models"] == ["llama3*", "qwen*"]
    assert KEY_RE.fullmatch(body["key"])


def test_create_with_a_bad_limit_names_it(cli: Cli) -> None:
    """A bad --limit is refused with the limit's name, and creates nobody."""
    err = _failed(cli("users", "create", "bob", "--limit", "tokens_per_day=-5"))
    assert "tokens_per_day" in err
    assert cli.json("users", "list") == {"users": []}


def test_duplicate_user_is_refused_with_the_conflict_message(cli: Cli) -> None:
    """A second `users create` of a name exits 1 with the storage layer's 409 message."""
    cli.create("alice")
    err = _failed(cli("users", "create", "alice"))
    conn = db.connect(str(cli.db))
    try:
        with pytest.raises(Conflict) as exc:
            accounts.create_user(conn, b"s" * 32, "alice", actor="test")
    finally:
        conn.close()
    assert exc.value.status == 409
    assert err == f"ollama-proxy: {exc.value.message}\n"


def test_list_users_table_and_json(cli: Cli) -> None:
    """`users list`: a table with usage columns; --json is {"users": [... with usage]}."""
    assert cli("users", "list").out == "no users\n"
    cli.create("alice")
    cli.create("bob", "--role", "admin")
    table = cli("users", "list").out.splitlines()
    assert table[0].split() == ["name", "role", "suspended", "requests", "prompt_tokens",
                                "completion_tokens"]
    assert [row.split() for row in table[1:]] == [["alice", "user", "no", "0", "0", "0"],
                                                  ["bob", "admin", "no", "0", "0", "0"]]
    users = cli.json("users", "list")["users"]
    assert [u["name"] for u in users] == ["alice", "bob"]
    for user in users:
        assert {"name", "role", "limits", "suspended", "usage"} <= user.keys()
        assert user["usage"] == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


def test_show_user_with_keys(cli: Cli) -> None:
    """`users show`: the user, its usage, limits and a keys table; --json adds "keys"."""
    key = cli.create("alice")
    text = cli("users", "show", "alice").out
    assert "alice" in text and "requests_per_minute" in text and "default" in text
    assert key_prefix(key) in text
    body = cli.json("users", "show", "alice")
    assert {"name", "role", "limits", "suspended", "usage", "keys"} <= body.keys()
    assert len(body["keys"]) == 1
    assert {"prefix", "created_at", "last_used_at", "revoked"} <= body["keys"][0].keys()
    assert key.startswith(body["keys"][0]["prefix"])


def test_suspend_and_resume(cli: Cli) -> None:
    """suspend/resume flip "suspended" and say what they did."""
    cli.create("alice")
    assert cli("users", "suspend", "alice").out == "suspended user alice\n"
    assert cli.json("users", "show", "alice")["suspended"] is True
    assert "yes" in cli("users", "list").out.splitlines()[1].split()
    body = cli.json("users", "resume", "alice")
    assert body["suspended"] is False and "usage" in body
    assert cli("users", "resume", "alice").out == "resumed user alice\n"


def test_delete_asks_nothing_and_says_what_it_did(cli: Cli) -> None:
    """`users delete` deletes at once; the user is then unknown."""
    cli.create("alice")
    result = cli("users", "delete", "alice")
    assert result.code == 0 and result.out.startswith("deleted user alice")
    assert cli.json("users", "list") == {"users": []}
    _failed(cli("users", "show", "alice"))
    cli.create("bob")
    assert cli.json("users", "delete", "bob") == {"name": "bob", "deleted": True}


@pytest.mark.parametrize(("argv", "expected"), [
    (("usage", "--group-by", "day"), {"group_by": "day", "rows": []}),
    (("users", "delete", "alice"), {"name": "alice", "deleted": True}),
    (("keys", "revoke", "PREFIX"), {"prefix": "PREFIX", "revoked": True}),
])
def test_json_adds_to_the_api_only_what_the_module_says(
        cli: Cli, argv: tuple[str, ...], expected: dict[str, Any]) -> None:
    """usage names its grouping; delete and revoke, a 204 in the API, say what was done."""
    prefix = key_prefix(cli.create("alice"))
    swap = {"PREFIX": prefix}
    assert cli.json(*(swap.get(a, a) for a in argv)) == \
        {k: swap.get(v, v) if isinstance(v, str) else v for k, v in expected.items()}


@pytest.mark.parametrize("argv", [
    ("users", "show", "ghost"), ("users", "suspend", "ghost"), ("users", "resume", "ghost"),
    ("users", "delete", "ghost"), ("users", "limits", "ghost"),
    ("users", "limits", "ghost", "--set", "requests_per_minute=1"),
    ("keys", "create", "ghost"), ("keys", "list", "ghost"), ("keys", "revoke", "op-nothing"),
])
def test_unknown_user_or_key_exits_1(cli: Cli, argv: tuple[str, ...]) -> None:
    """Every command on an unknown user or key prints one error line and exits 1."""
    cli.create("alice")
    _failed(cli(*argv))


# ---------------------------------------------------------------- limits


def test_limits_print_set_and_unset(cli: Cli) -> None:
    """`users limits` prints every limit; --set merges typed values; --unset goes back to default."""
    cli.create("alice")
    text = cli("users", "limits", "alice").out
    for name in LIMIT_NAMES:
        assert re.search(rf"^{name}\s+default$", text, re.MULTILINE), name
    body = cli.json("users", "limits", "alice",
                    "--set", "requests_per_minute=60", "--set", "tokens_per_day=0",
                    "--set", "quota_period=month", "--set", "token_quota=100000",
                    "--set", "allowed_models=llama3*, qwen*", "--set", "expires_at=2031-01-02",
                    "--set", "weight=0.5")
    limits = body["limits"]
    assert limits["requests_per_minute"] == 60 and limits["tokens_per_day"] == 0
    assert limits["quota_period"] == "month" and limits["token_quota"] == 100000
    assert limits["allowed_models"] == ["llama3*", "qwen*"]
    assert limits["expires_at"] == "2031-01-02T00:00:00Z" and limits["weight"] == 0.5
    text = cli("users", "limits", "alice").out
    assert re.search(r"^weight\s+0.5$", text, re.MULTILINE)
    assert re.search(r"^requests_per_minute\s+60$", text, re.MULTILINE)
    assert re.search(r"^allowed_models\s+llama3\*,qwen\*$", text, re.MULTILINE)

    limits = cli.json("users", "limits", "alice", "--unset", "requests_per_minute",
                      "--set", "token_quota=null", "--set", "max_concurrent=2")["limits"]
    assert limits.get("requests_per_minute") is None and limits.get("token_quota") is None
    assert limits["max_concurrent"] == 2 and limits["tokens_per_day"] == 0  # merged
    assert limits["quota_period"] == "month"
    assert cli.json("users", "show", "alice")["limits"] == limits


def test_no_allowed_model_is_not_shown_blank(cli: Cli) -> None:
    """`--set allowed_models=` allows no model; the table says so rather than showing a
    blank, which reads like the ini's empty `allowed_models =` (every model)."""
    created = cli("users", "create", "alice", "--limit", "allowed_models=").out
    assert "allowed_models=(none)" in created
    assert cli.json("users", "limits", "alice")["limits"]["allowed_models"] == []
    text = cli("users", "limits", "alice").out
    assert re.search(r"^allowed_models\s+\(none\)$", text, re.MULTILINE)


@pytest.mark.parametrize(("assignment", "name"), [
    ("requests_per_minute=lots", "requests_per_minute"),
    ("max_concurrent=-1", "max_concurrent"),
    ("quota_period=weekly", "quota_period"),
    ("expires_at=someday", "expires_at"),
    ("weight=0", "limits.weight\" must be a number > 0 and <= 1000"),
    ("weight=nan", "limits.weight"),
    ("weight=heavy", "limits.weight"),
    ("no_such_limit=1", "no_such_limit"),
])
def test_bad_limit_value_names_the_limit(cli: Cli, assignment: str, name: str) -> None:
    """A bad value or an unknown limit exits 1 with the limit's name; nothing changes."""
    cli.create("alice", "--limit", "requests_per_minute=5")
    err = _failed(cli("users", "limits", "alice", "--set", assignment))
    assert name in err
    assert cli.json("users", "limits", "alice")["limits"]["requests_per_minute"] == 5


def test_limit_set_and_unset_together_is_refused(cli: Cli) -> None:
    """--set X and --unset X at once is an error naming X."""
    cli.create("alice")
    assert "max_concurrent" in _failed(cli("users", "limits", "alice", "--set", "max_concurrent=1",
                                           "--unset", "max_concurrent"))


def test_assignment_without_equals_is_a_usage_error(cli: Cli) -> None:
    """`--set NAME` without `=VALUE` is refused by the parser (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        cli("users", "limits", "alice", "--set", "requests_per_minute")
    assert exc.value.code == 2


# ---------------------------------------------------------------- keys


def test_keys_create_list_revoke(cli: Cli) -> None:
    """keys create prints a key once; keys list shows prefixes; keys revoke marks it revoked."""
    first = cli.create("alice")
    cli.create("bob")
    result = cli("keys", "create", "alice", "--expires", "2031-01-02T03:04:05Z")
    assert result.code == 0 and STORE_IT in result.out
    (second,) = KEY_RE.findall(result.out)
    created = cli.json("keys", "create", "alice")
    assert set(created) == {"key", "prefix"} and created["key"].startswith(created["prefix"])

    listed = cli.json("keys", "list", "alice")["keys"]
    assert [k["user"] for k in listed] == ["alice"] * 3
    assert {k["prefix"] for k in listed} == {key_prefix(first), key_prefix(second), created["prefix"]}
    expiring = next(k for k in listed if second.startswith(k["prefix"]))
    assert expiring["expires_at"] == "2031-01-02T03:04:05Z"
    everyone = cli.json("keys", "list")["keys"]
    assert sorted(k["user"] for k in everyone) == ["alice", "alice", "alice", "bob"]
    table = cli("keys", "list").out.splitlines()
    assert table[0].split() == ["user", "prefix", "created_at", "last_used_at", "expires_at",
                                "revoked"]
    assert len(table) == 5

    assert cli("keys", "revoke", created["prefix"]).out == f"revoked key {created['prefix']}\n"
    revoked = {k["prefix"]: k["revoked"] for k in cli.json("users", "show", "alice")["keys"]}
    assert revoked[created["prefix"]] is True
    assert sum(revoked.values()) == 1


def test_keys_create_bad_expiry_names_it(cli: Cli) -> None:
    """A bad --expires exits 1 naming expires_at."""
    cli.create("alice")
    assert "expires_at" in _failed(cli("keys", "create", "alice", "--expires", "tomorrow-ish"))


def test_keys_list_empty(cli: Cli) -> None:
    """No users: no keys."""
    assert cli("keys", "list").out == "no keys\n"
    assert cli.json("keys", "list") == {"keys": []}


# ---------------------------------------------------------------- usage


def test_usage_on_an_empty_ledger(cli: Cli) -> None:
    """No rows: a plain line, and {"rows": []}."""
    assert cli("usage").out == "no usage\n"
    assert cli.json("usage")["rows"] == []
    assert cli.json("usage", "--group-by", "day", "--user", "alice")["rows"] == []


def test_usage_on_a_filled_ledger(cli: Cli) -> None:
    """Rows grouped by user, model, day; filters by user, model and time."""
    cli.create("alice")
    cli.create("bob")
    now = time.time()
    _fill_ledger(cli, [
        _record("alice", "llama3", 10, 20, when=now - 10, gpu_ms=1500),
        _record("alice", "qwen", 1, 2, when=now - 5, gpu_ms=250),
        _record("alice", "qwen", 3, 0, status=502, when=now - 4),
        _record("bob", "llama3", 100, 200, when=now - 3),
    ])
    rows = {r["key"]: r for r in cli.json("usage")["rows"]}
    assert rows["alice"] == {"key": "alice", "requests": 3, "prompt_tokens": 14,
                             "completion_tokens": 22, "errors": 1, "gpu_seconds": 1.75,
                             "load_seconds": 0.175}
    assert rows["bob"] == {"key": "bob", "requests": 1, "prompt_tokens": 100,
                           "completion_tokens": 200, "errors": 0, "gpu_seconds": None,
                           "load_seconds": None}
    by_model = {r["key"]: r["requests"] for r in cli.json("usage", "--group-by", "model")["rows"]}
    assert by_model == {"llama3": 2, "qwen": 2}
    only = cli.json("usage", "--user", "alice", "--model", "qwen", "--group-by", "model")["rows"]
    assert [(r["key"], r["requests"], r["errors"]) for r in only] == [("qwen", 2, 1)]
    day = cli.json("usage", "--group-by", "day")["rows"]
    assert sum(r["requests"] for r in day) == 4
    assert cli.json("usage", "--since", "2999-01-01T00:00:00Z")["rows"] == []
    assert cli.json("usage", "--until", "2000-01-01T00:00:00Z")["rows"] == []

    table = cli("usage").out.splitlines()
    assert table[0].split() == ["user", "requests", "prompt_tokens", "completion_tokens", "errors",
                                "gpu_seconds", "load_seconds"]
    assert table[1:] == [  # bob's backend reported no GPU time: "-", not 0
        "alice         3             14                 22       1         1.75         0.175",
        "bob           1            100                200       0            -             -",
        "total         4            114                222       1         1.75         0.175"]
    assert cli("usage", "--group-by", "hour").out.splitlines()[0].split()[0] == "hour"
    users = {u["name"]: u["usage"] for u in cli.json("users", "list")["users"]}
    assert users["alice"] == {"requests": 3, "prompt_tokens": 14, "completion_tokens": 22}


def test_usage_bad_time_names_the_parameter(cli: Cli) -> None:
    """A bad --since exits 1 naming since."""
    assert "since" in _failed(cli("usage", "--since", "last week"))


# ---------------------------------------------------------------- config, audit, help


def test_database_from_the_config_file(tmp_path: pathlib.Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Without --database, the config's [server] database is the file used."""
    ini = tmp_path / "proxy.ini"
    ini.write_text(f"[server]\ndatabase = {tmp_path / 'from-config.db'}\n")
    assert main(["users", "create", "carol", "--config", str(ini)]) == 0
    assert (tmp_path / "from-config.db").exists()
    capsys.readouterr()
    assert main(["users", "list", "--json", "--config", str(ini)]) == 0
    assert [u["name"] for u in json.loads(capsys.readouterr().out)["users"]] == ["carol"]


def test_config_error_exits_2(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing or bad config file exits 2 with a config error, as every command does."""
    assert main(["users", "list", "--config", str(tmp_path / "missing.ini")]) == 2
    assert "config error" in capsys.readouterr().err
    bad = tmp_path / "bad.ini"
    bad.write_text("[server]\nno_such_key = 1\n")
    assert main(["usage", "--config", str(bad)]) == 2


def test_audit_log_records_the_cli_actor(cli: Cli) -> None:
    """Changes made by the CLI are in the audit log as cli:<unix user>, without secrets."""
    key = cli.create("alice")
    cli("users", "suspend", "alice")
    conn = db.connect(str(cli.db))
    try:
        entries = accounts.audit_log(conn, 100)
    finally:
        conn.close()
    assert actor().startswith("cli:")
    text = json.dumps(entries, default=str)
    assert actor() in text
    assert key not in text


HELP = [
    ("users",), ("users", "create"), ("users", "list"), ("users", "show"), ("users", "suspend"),
    ("users", "resume"), ("users", "delete"), ("users", "limits"),
    ("keys",), ("keys", "create"), ("keys", "list"), ("keys", "revoke"), ("usage",),
]


@pytest.mark.parametrize("argv", HELP)
def test_help_on_every_command(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    """--help exits 0 and prints the command's usage."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ollama-proxy {' '.join(argv)}")
