"""The admin use-cases, written once for both callers: the admin API (which runs
them in the store's threads) and the offline CLI (which runs them on its own
connection). Both only parse what they are given, call these and render.

Every rule on what an admin may write or ask lives here: user names, roles,
limits, key expiry, report times and groupings. A value that breaks one is a
``BadRequest`` naming the field (the API answers 400, the CLI exits 1);
``accounts`` and ``reports`` then get values known to be valid. The views are
the JSON payloads both print.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from ..access import keys
from ..access.limits import LIMIT_NAMES, QUOTA_PERIODS, weight_problem
from ..errors import BadRequest
from ..isotime import parse_time
from . import accounts, reports
from .accounts import DEFAULT_ROLE, KeyInfo, User

ROLES = (DEFAULT_ROLE, "admin")
USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens")
NO_USAGE = dict.fromkeys(USAGE_FIELDS, 0)  # a user with no ledger rows yet

_NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")


# --- validation ---------------------------------------------------------------

def valid_name(name: object) -> str:
    """``name`` if it is a valid user name, else BadRequest."""
    if not isinstance(name, str):
        raise BadRequest('"name" is required and must be a string')
    if not _NAME_RE.fullmatch(name):
        raise BadRequest('"name" must be 1 to 64 characters among A-Z a-z 0-9 . _ @ -')
    return name


def valid_role(role: object) -> str:
    """``role`` if it is a known role, else BadRequest."""
    if role not in ROLES:
        raise BadRequest('"role" must be ' + " or ".join(f'"{r}"' for r in ROLES))
    return str(role)


def valid_time(value: object, field: str) -> float:
    """An ISO 8601 date or time as Unix seconds, else BadRequest naming ``field``."""
    try:
        return parse_time(value, field)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def validate_limits(obj: object, field: str = "limits") -> dict[str, Any]:
    """A limits object as stored: checked, whole floats as ints (``weight`` a float),
    ``expires_at`` in whole Unix seconds; ``null`` values are kept (= the default)."""
    if not isinstance(obj, dict):
        raise BadRequest(f'"{field}" must be a JSON object')
    result: dict[str, Any] = {}
    for name, value in obj.items():
        where = f"{field}.{name}"
        if name not in LIMIT_NAMES:
            raise BadRequest(f'unknown limit "{where}"; allowed: {", ".join(LIMIT_NAMES)}')
        if value is None:
            result[name] = None
        elif name == "quota_period":
            if value not in QUOTA_PERIODS:
                raise BadRequest(f'"{where}" must be "total", "month" or null')
            result[name] = value
        elif name == "allowed_models":
            if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
                raise BadRequest(f'"{where}" must be a list of non-empty model globs, or null')
            result[name] = list(value)
        elif name == "expires_at":
            result[name] = math.floor(valid_time(value, where))  # the API shows whole seconds
        elif name == "weight":
            problem = weight_problem(value)
            if problem is not None or not isinstance(value, (int, float)):
                raise BadRequest(f'"{where}" {problem}, or null')
            result[name] = float(value)
        else:
            result[name] = _whole_number(value, where)
    return result


def _whole_number(value: object, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f'"{where}" must be a whole number >= 0, or null')
    return value


# --- changes ------------------------------------------------------------------

def create_user(conn: sqlite3.Connection, secret: bytes, name: object, role: object = DEFAULT_ROLE,
                limits: object = None, *, actor: str) -> tuple[User, str]:
    """A new user and its first key, in full (shown this once)."""
    return accounts.create_user(conn, secret, valid_name(name), valid_role(role),
                                validate_limits({} if limits is None else limits), actor=actor)


def update_user(conn: sqlite3.Connection, name: str, *, limits: object = None,
                suspended: object = None, role: object = None, actor: str) -> User:
    """Change what is given (None: unchanged); a limit set to null falls back to the default."""
    if suspended is not None and not isinstance(suspended, bool):
        raise BadRequest('"suspended" must be true or false')
    return accounts.update_user(
        conn, name, limits=None if limits is None else validate_limits(limits),
        suspended=suspended, role=None if role is None else valid_role(role), actor=actor)


def create_key(conn: sqlite3.Connection, secret: bytes, user: str, *, expires_at: object = None,
               actor: str) -> tuple[str, str]:
    """A new key for ``user`` (ISO 8601 expiry, or None for never): (the key in full,
    shown this once; its prefix)."""
    expiry = None if expires_at is None else valid_time(expires_at, "expires_at")
    return accounts.create_key(conn, secret, user, expires_at=expiry, actor=actor)


def revoke_key(conn: sqlite3.Connection, prefix: str, *, actor: str) -> str:
    """Stop a key at once; returns its prefix. A whole key pasted instead of its
    prefix is revoked by its prefix, so that no answer ever echoes it."""
    if keys.looks_like_key(prefix):
        prefix = keys.key_prefix(prefix)
    accounts.revoke_key(conn, prefix, actor=actor)
    return prefix


# --- reports and views --------------------------------------------------------

def usage(conn: sqlite3.Connection, *, user: str | None, model: str | None,
          since: str | None, until: str | None, group_by: str) -> list[dict[str, Any]]:
    """Usage totals over ``[since, until)``, ISO 8601 (None or empty: unbounded), per
    one of ``reports.GROUPS``."""
    start = valid_time(since, "since") if since else None
    end = valid_time(until, "until") if until else None
    if group_by not in reports.GROUPS:
        raise BadRequest(f'"group_by" must be one of: {", ".join(reports.GROUPS)}')
    return reports.usage(conn, user=user, model=model, since=start, until=end,
                         group_by=group_by)


# Each view is the whole payload, read on one connection (the API's reports store, so
# that the usage in it never holds up an account change; the CLI's own).

def _with_usage(user: User, totals: Mapping[str, Mapping[str, int]],
                keys: Sequence[KeyInfo] | None = None) -> dict[str, Any]:
    out = user.to_json()
    out["usage"] = {**NO_USAGE, **totals.get(user.name, {})}
    if keys is not None:
        out["keys"] = [k.to_json() for k in keys]
    return out


def users_view(conn: sqlite3.Connection) -> dict[str, Any]:
    """Every user with its usage (``GET /admin/api/users``, ``users list``)."""
    totals = reports.user_totals(conn)
    return {"users": [_with_usage(u, totals) for u in accounts.list_users(conn)]}


def user_view(conn: sqlite3.Connection, name: str) -> dict[str, Any]:
    """A user with its usage and keys (``GET /admin/api/users/{name}``, ``users show``)."""
    user = accounts.get_user(conn, name)
    return _with_usage(user, reports.user_totals(conn, user.name),
                       accounts.list_keys(conn, user.name))


def changed_user_view(conn: sqlite3.Connection, user: User) -> dict[str, Any]:
    """A user as a change left it, with its usage (``PATCH``; suspend, resume, limits)."""
    return _with_usage(user, reports.user_totals(conn, user.name))


def new_user_view(user: User, key: str) -> dict[str, Any]:
    """A new user with its first key in full, the one time it is shown."""
    return {**user.to_json(), "key": key}


def new_key_view(key: str, prefix: str) -> dict[str, Any]:
    """A new key in full, the one time it is shown, and its prefix."""
    return {"key": key, "prefix": prefix}
