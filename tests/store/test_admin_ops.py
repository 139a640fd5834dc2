"""The admin use-cases the admin API and the offline CLI share: every rule on what an
admin may write (a 400 naming the field), revocation by prefix or whole key, report
times, and the views both print."""

from __future__ import annotations

import calendar
import json

import pytest

from ledger_rows import insert as insert_rows
from ollama_proxy.access import keys
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.errors import BadRequest, NotFound
from ollama_proxy.store import accounts, admin_ops, db


@pytest.fixture
def conn(tmp_path):
    connection = db.connect(str(tmp_path / "op.db"))
    yield connection
    connection.close()


@pytest.fixture
def secret(tmp_path):
    return keys.load_or_create_secret(str(tmp_path / "op.db"))


def utc(*ymdhms: int) -> int:
    return calendar.timegm((*ymdhms, 0, 0, 0))


def record(user: str, when: float, prompt: int, completion: int) -> RequestRecord:
    return RequestRecord(request_id=f"r{when}", time=when, endpoint="/api/chat", model="m",
                       backend="b", status=200, outcome="ok", prompt_tokens=prompt,
                       completion_tokens=completion, estimated=False, stream=True,
                       duration_s=0.1, ttfb_s=0.01, client="127.0.0.1", user=user,
                       key_prefix=None)


# ------------------------------------------------------------------ validation


BAD_CREATIONS = [  # (name, role, limits) → what the 400 says
    ("", "user", None, '"name" must be 1 to 64 characters'),
    ("a" * 65, "user", None, '"name" must be 1 to 64 characters'),
    ("has space", "user", None, '"name" must be 1 to 64 characters'),
    ("slash/", "user", None, '"name" must be 1 to 64 characters'),
    ("é", "user", None, '"name" must be 1 to 64 characters'),
    (7, "user", None, '"name" is required and must be a string'),
    (None, "user", None, '"name" is required and must be a string'),
    ("alice", "root", None, '"role" must be "user" or "admin"'),
    ("alice", None, None, '"role" must be "user" or "admin"'),
    ("alice", "user", [], '"limits" must be a JSON object'),
    ("alice", "user", 0, '"limits" must be a JSON object'),
    ("alice", "user", {"rpm": 1}, 'unknown limit "limits.rpm"; allowed: requests_per_minute'),
    ("alice", "user", {"requests_per_day": -1}, '"limits.requests_per_day" must be a whole number'),
    ("alice", "user", {"tokens_per_day": 1.5}, '"limits.tokens_per_day" must be a whole number'),
    ("alice", "user", {"max_concurrent": True}, '"limits.max_concurrent" must be a whole number'),
    ("alice", "user", {"token_quota": "100"}, '"limits.token_quota" must be a whole number'),
    ("alice", "user", {"quota_period": "week"},
     '"limits.quota_period" must be "total", "month" or null'),
    ("alice", "user", {"allowed_models": "llama3"}, '"limits.allowed_models" must be a list'),
    ("alice", "user", {"allowed_models": [""]}, '"limits.allowed_models" must be a list'),
    ("alice", "user", {"expires_at": "tomorrow"}, '"limits.expires_at" must be an ISO 8601'),
    ("alice", "user", {"expires_at": 1700000000}, '"limits.expires_at" must be an ISO 8601'),
    ("alice", "user", {"weight": 0}, '"limits.weight" must be a number > 0 and <= 1000, or null'),
    ("alice", "user", {"weight": -2.5}, '"limits.weight" must be a number > 0'),
    ("alice", "user", {"weight": 1000.001}, '"limits.weight" must be a number > 0 and <= 1000'),
    ("alice", "user", {"weight": True}, '"limits.weight" must be a number'),
    ("alice", "user", {"weight": "2"}, '"limits.weight" must be a number'),
    ("alice", "user", {"weight": [2]}, '"limits.weight" must be a number'),
]


@pytest.mark.parametrize(("name", "role", "limits", "message"), BAD_CREATIONS)
def test_a_bad_new_user_is_a_400_naming_the_field_and_nothing_is_made(
        conn, secret, name, role, limits, message):
    """Every rule on a new user is checked before anything is written."""
    with pytest.raises(BadRequest) as info:
        admin_ops.create_user(conn, secret, name, role, limits, actor="root")
    assert message in info.value.message
    assert accounts.list_users(conn) == [] and accounts.audit_log(conn) == []


@pytest.mark.parametrize(("change", "message"), [
    ({"suspended": "yes"}, '"suspended" must be true or false'),
    ({"role": "root"}, '"role" must be "user" or "admin"'),
    ({"limits": {"max_concurrent": 1.5}}, '"limits.max_concurrent" must be a whole number'),
    ({"limits": {"expires_at": "soon"}}, '"limits.expires_at" must be an ISO 8601'),
])
def test_a_bad_change_is_a_400_and_the_user_stays(conn, secret, change, message):
    """A user's change is checked whole before it is written."""
    admin_ops.create_user(conn, secret, "alice", limits={"max_concurrent": 2}, actor="root")
    with pytest.raises(BadRequest, match=message):
        admin_ops.update_user(conn, "alice", **change, actor="root")
    user = accounts.get_user(conn, "alice")
    assert (user.limits, user.suspended, user.role) == ({"max_concurrent": 2}, False, "user")


def test_limits_are_stored_normalised_and_shown_as_given():
    """Whole floats become ints, expiry whole Unix seconds (shown in ISO 8601), nulls stay."""
    stored = admin_ops.validate_limits({
        "tokens_per_minute": 1000.0, "max_tokens_per_request": 0, "quota_period": "month",
        "expires_at": "2026-11-27T08:14:39.75+01:00", "allowed_models": ["a", "b*"],
        "token_quota": None, "weight": 2,
    })
    assert stored == {"tokens_per_minute": 1000, "max_tokens_per_request": 0,
                      "quota_period": "month", "expires_at": utc(2026, 11, 27, 7, 14, 39),
                      "allowed_models": ["a", "b*"], "token_quota": None, "weight": 2.0}
    assert isinstance(stored["weight"], float)
    assert accounts.shown_limits(stored)["expires_at"] == "2026-11-27T07:14:39Z"


def test_weight_is_kept_in_the_users_limits_json(conn, secret):
    """weight needs no new column: the users row's limits JSON holds it; null brings the
    default back."""
    admin_ops.create_user(conn, secret, "alice", limits={"weight": 0.25}, actor="root")
    row = conn.execute("SELECT limits FROM users WHERE name = 'alice'").fetchone()
    assert json.loads(row[0]) == {"weight": 0.25}
    user = admin_ops.update_user(conn, "alice", limits={"weight": 4}, actor="root")
    assert user.to_json()["limits"] == {"weight": 4.0}
    user = admin_ops.update_user(conn, "alice", limits={"weight": None}, actor="root")
    assert user.limits == {}


def test_expiry_is_a_number_in_the_row_and_iso_in_every_answer(conn, secret):
    """The users row keeps expires_at in seconds; the user's JSON and the audit show ISO."""
    user, _ = admin_ops.create_user(conn, secret, "alice",
                                    limits={"expires_at": "2027-01-01"}, actor="root")
    row = conn.execute("SELECT limits FROM users WHERE name = 'alice'").fetchone()
    assert json.loads(row[0]) == {"expires_at": utc(2027, 1, 1, 0, 0, 0)}
    assert user.to_json()["limits"] == {"expires_at": "2027-01-01T00:00:00Z"}
    admin_ops.update_user(conn, "alice", limits={"expires_at": "2028-01-01"}, actor="root")
    details = [entry["detail"]["limits"] for entry in accounts.audit_log(conn)]
    assert details == [{"expires_at": "2028-01-01T00:00:00Z"},
                       {"expires_at": "2027-01-01T00:00:00Z"}]


@pytest.mark.parametrize(("expires_at", "expected"), [
    (None, None),
    ("2999-01-01", "2999-01-01T00:00:00Z"),
])
def test_a_key_expires_at_an_iso_time_or_never(conn, secret, expires_at, expected):
    """A new key's expiry is ISO 8601 text, or None for never."""
    admin_ops.create_user(conn, secret, "alice", actor="root")
    _, prefix = admin_ops.create_key(conn, secret, "alice", expires_at=expires_at, actor="root")
    shown = {k.prefix: k.to_json()["expires_at"] for k in accounts.list_keys(conn, "alice")}
    assert shown[prefix] == expected


@pytest.mark.parametrize("expires_at", ["soon", "", 32472144000])
def test_a_bad_key_expiry_is_a_400(conn, secret, expires_at):
    """Anything but ISO 8601 text (or None) is refused, naming expires_at."""
    admin_ops.create_user(conn, secret, "alice", actor="root")
    with pytest.raises(BadRequest, match='"expires_at" must be an ISO 8601'):
        admin_ops.create_key(conn, secret, "alice", expires_at=expires_at, actor="root")
    assert len(accounts.list_keys(conn, "alice")) == 1


# ------------------------------------------------------------------ revocation


def test_revoking_by_a_prefix_or_a_pasted_whole_key(conn, secret):
    """Both name the key by its prefix, which is what comes back; an unknown one is 404."""
    _, first = admin_ops.create_user(conn, secret, "alice", actor="root")
    _, second_prefix = admin_ops.create_key(conn, secret, "alice", actor="root")
    assert admin_ops.revoke_key(conn, second_prefix, actor="root") == second_prefix
    assert admin_ops.revoke_key(conn, first, actor="root") == keys.key_prefix(first)
    assert [k.revoked for k in accounts.list_keys(conn, "alice")] == [True, True]
    assert first not in json.dumps(accounts.audit_log(conn))
    with pytest.raises(NotFound, match="op-unknown"):
        admin_ops.revoke_key(conn, "op-unknown", actor="root")


# ------------------------------------------------------------------ reports


def test_usage_takes_iso_times_and_empty_means_unbounded(conn):
    """since is inclusive, until exclusive, both ISO 8601; None or "" leave it open."""
    insert_rows(conn, [record("ann", utc(2026, 11, 1, 0, 0, 0), 1, 2),
                       record("ann", utc(2026, 11, 2, 0, 0, 0), 10, 20)])

    def prompt_tokens(since, until):
        rows = admin_ops.usage(conn, user=None, model=None, since=since, until=until,
                               group_by="user")
        return [r["prompt_tokens"] for r in rows]

    assert prompt_tokens(None, None) == prompt_tokens("", "") == [11]
    assert prompt_tokens("2026-11-02", None) == [10]
    assert prompt_tokens(None, "2026-11-02T00:00:00Z") == [1]
    assert prompt_tokens("2026-11-03", None) == []


@pytest.mark.parametrize(("since", "until", "group_by", "field"), [
    ("yesterday", None, "user", '"since"'),
    (None, "2026-13-45", "user", '"until"'),
    (None, None, "week", '"group_by" must be one of: user, model, day, hour'),
    (None, None, "", '"group_by" must be one of'),
])
def test_bad_report_parameters_are_a_400_naming_them(conn, since, until, group_by, field):
    """A bad time or grouping says which parameter it was."""
    with pytest.raises(BadRequest, match=field):
        admin_ops.usage(conn, user=None, model=None, since=since, until=until,
                        group_by=group_by)


# ------------------------------------------------------------------ views


USER_FIELDS = ["name", "role", "limits", "suspended", "created_at"]


def test_user_view_shows_usage_and_keys(conn, secret):
    """A shown user: its fields, its usage (zeros before its first row), its keys."""
    _, key = admin_ops.create_user(conn, secret, "alice", actor="root")
    bare = admin_ops.user_view(conn, "alice")
    assert list(bare) == [*USER_FIELDS, "usage", "keys"]
    assert bare["usage"] == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    assert [k["prefix"] for k in bare["keys"]] == [keys.key_prefix(key)]
    insert_rows(conn, [record("alice", utc(2026, 11, 1, 0, 0, 0), 3, 4)])
    assert admin_ops.user_view(conn, "alice")["usage"] == {
        "requests": 1, "prompt_tokens": 3, "completion_tokens": 4}
    with pytest.raises(NotFound, match="bob"):
        admin_ops.user_view(conn, "bob")


@pytest.mark.parametrize(("change", "shown"), [
    ({"suspended": True}, {"suspended": True}),
    ({"role": "admin"}, {"role": "admin"}),
    ({"limits": {"max_concurrent": 2}}, {"limits": {"max_concurrent": 2}}),
    ({"limits": {"expires_at": "2027-01-01"}}, {"limits": {"expires_at": "2027-01-01T00:00:00Z"}}),
])
def test_changed_user_view_is_the_user_as_changed_with_usage_and_no_keys(
        conn, secret, change, shown):
    """The answer to a change: the user's fields as they are now, its usage, no keys."""
    admin_ops.create_user(conn, secret, "alice", actor="root")
    insert_rows(conn, [record("alice", utc(2026, 11, 1, 0, 0, 0), 3, 4)])
    view = admin_ops.changed_user_view(conn, admin_ops.update_user(conn, "alice", **change,
                                                                   actor="root"))
    assert list(view) == [*USER_FIELDS, "usage"]
    assert {k: view[k] for k in shown} == shown
    assert view["usage"] == {"requests": 1, "prompt_tokens": 3, "completion_tokens": 4}


def test_users_view_lists_every_user_with_usage(conn, secret):
    """The user list is one user with usage per user, by name, without keys."""
    assert admin_ops.users_view(conn) == {"users": []}
    for name in ("zed", "amy"):
        admin_ops.create_user(conn, secret, name, actor="root")
    insert_rows(conn, [record("zed", utc(2026, 11, 1, 0, 0, 0), 5, 6)])
    view = admin_ops.users_view(conn)
    assert [(u["name"], u["usage"]["requests"]) for u in view["users"]] == [("amy", 0),
                                                                           ("zed", 1)]
    assert all(list(u) == [*USER_FIELDS, "usage"] for u in view["users"])


def test_new_user_and_new_key_views_carry_the_key_in_full(conn, secret):
    """The one time a key is shown: after a new user's fields, or with its prefix."""
    user, first = admin_ops.create_user(conn, secret, "alice", limits={"token_quota": 9},
                                        actor="root")
    assert admin_ops.new_user_view(user, first) == {
        "name": "alice", "role": "user", "limits": {"token_quota": 9}, "suspended": False,
        "created_at": user.to_json()["created_at"], "key": first}
    key, prefix = admin_ops.create_key(conn, secret, "alice", actor="root")
    assert admin_ops.new_key_view(key, prefix) == {"key": key, "prefix": prefix}
    assert keys.key_prefix(key) == prefix
