"""Offline administration on the database file: ``users``, ``keys``, ``usage``.

The same use-cases as the HTTP admin API (``store.admin_ops``, where their rules are),
run directly on the file named by ``[server] database`` (or ``--database``), so the box's
operator needs no running server and no admin key. A key is printed once, by the
command that creates it.

``--json`` prints the payload the text is made from, as the admin API answers (the
views of ``admin_ops``), but for three: ``usage`` adds its ``group_by`` (the text's
first column); ``users delete`` and ``keys revoke``, which the API answers 204 with no
body, print ``{"name": …, "deleted": true}`` and ``{"prefix": …, "revoked": true}``;
``keys list``, which the API has not, lists keys with their user.

Every command is a pair: ``compute`` does the work and returns the JSON payload,
``render`` turns that payload into text, so both outputs always tell the same thing.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..access.limits import LIMIT_NAMES
from ..config import load_config
from ..errors import BadRequest, ProxyError, StoreError
from ..store import accounts, admin_ops, db, reports
from ..store.accounts import DEFAULT_ROLE, get_user
from ..store.admin_ops import ROLES, USAGE_FIELDS

Payload = dict[str, Any]

STORE_IT = "Store this key now: it is not shown again."


@dataclass(frozen=True)
class Context:
    """What a command works with: an open database, its path, and who acts."""

    conn: sqlite3.Connection
    database: str
    actor: str

    def secret(self) -> bytes:
        return accounts.server_secret(self.conn, self.database)


Compute = Callable[[Context, argparse.Namespace], Payload]
Render = Callable[[Payload], str]


def actor() -> str:
    """``cli:<unix user name>``, as the audit log records it."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError, ImportError):  # no LOGNAME/USER, no passwd entry (bare uid)
        name = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"cli:{name}"


def database_path(args: argparse.Namespace) -> str:
    """``--database``, else ``[server] database`` of the config (a ``ConfigError`` exits 2)."""
    if args.database:
        return str(args.database)
    return load_config(args.config).server.database


def _run(compute: Compute, render: Render) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        path = database_path(args)  # a ConfigError goes to main(): exit 2, as for every command
        try:
            conn = db.connect(path)
            try:
                payload = compute(Context(conn, path, actor()), args)
            finally:
                conn.close()
        except (ProxyError, StoreError) as exc:  # 400, 404, 409 alike; a newer file
            return _fail(exc.message)
        except sqlite3.Error as exc:  # e.g. not a database, locked for too long
            return _fail(f"{path}: {exc}")
        print(json.dumps(payload, indent=2) if args.json else render(payload))
        return 0

    return run


def _fail(message: str) -> int:
    print(f"ollama-proxy: {message}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------- text rendering


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):  # allowed_models: empty is no model, not every one
        return ",".join(str(v) for v in value) or "(none)"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, numbers right-aligned (``-`` for None, in line with them)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [any(r[i] is not None for r in rows) and all(
        r[i] is None or isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
        for r in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), *(line(r) for r in cells)])


def _pairs(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in pairs)


def _limits_text(limits: dict[str, Any] | None) -> str:
    """Every limit name with its value, or ``default`` when the user has none of its own."""
    limits = limits or {}
    return _pairs([(name, "default" if limits.get(name) is None else limits[name])
                   for name in LIMIT_NAMES])


def _user_text(user: Payload) -> str:
    return _pairs([(k, user.get(k)) for k in ("name", "role", "suspended", "created_at")])


KEY_COLUMNS = ("prefix", "created_at", "last_used_at", "expires_at", "revoked")


# ---------------------------------------------------------------- limit values


def assignment(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` from the command line (argparse ``type``)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def limit_value(name: str, text: str) -> Any:
    """A limit's value as the JSON API would carry it; ``validate_limits`` judges it.

    ``null`` clears it; whole numbers become ints, other numbers (a ``weight`` of 0.5)
    floats; ``allowed_models`` is a comma-separated list of globs (empty: none allowed);
    anything else (``total``, ``month``, an ISO date) stays text."""
    if text == "null":
        return None
    if name == "allowed_models":
        return [glob.strip() for glob in text.split(",") if glob.strip()]
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def limit_values(assignments: Sequence[tuple[str, str]] | None,
                 unset: Sequence[str] | None = None) -> dict[str, Any]:
    """A limits object from ``--set``/``--limit`` and ``--unset``, for the store's
    ``validate_limits`` (whose errors name the limit)."""
    raw = {name: limit_value(name, text) for name, text in assignments or ()}
    for name in unset or ():
        if name in raw:
            raise BadRequest(f'"limits.{name}": both --set and --unset')
        raw[name] = None
    return raw


# ---------------------------------------------------------------- users


def users_create(ctx: Context, args: argparse.Namespace) -> Payload:
    user, key = admin_ops.create_user(ctx.conn, ctx.secret(), args.name, args.role,
                                      limit_values(args.limit), actor=ctx.actor)
    return admin_ops.new_user_view(user, key)


def render_created_user(p: Payload) -> str:
    own = {k: v for k, v in (p.get("limits") or {}).items() if v is not None}
    limits = ", ".join(f"{k}={_cell(v)}" for k, v in own.items()) or "defaults"
    return (f"created user {p['name']} (role {p['role']}, limits: {limits})\n"
            f"key: {p['key']}\n{STORE_IT}")


def users_list(ctx: Context, args: argparse.Namespace) -> Payload:
    return admin_ops.users_view(ctx.conn)


def render_users(p: Payload) -> str:
    if not p["users"]:
        return "no users"
    return table(("name", "role", "suspended", *USAGE_FIELDS),
                 [(u["name"], u["role"], u["suspended"], *(u["usage"][c] for c in USAGE_FIELDS))
                  for u in p["users"]])


def users_show(ctx: Context, args: argparse.Namespace) -> Payload:
    return admin_ops.user_view(ctx.conn, args.name)


def render_user(p: Payload) -> str:
    keys = (table(KEY_COLUMNS, [[k.get(c) for c in KEY_COLUMNS] for k in p["keys"]])
            if p["keys"] else "no keys")
    usage = _pairs([(c, p["usage"][c]) for c in USAGE_FIELDS])
    return (f"{_user_text(p)}\n\nusage:\n{usage}\n\nlimits:\n{_limits_text(p.get('limits'))}"
            f"\n\nkeys:\n{keys}")


def _set_suspended(suspended: bool) -> Compute:
    def compute(ctx: Context, args: argparse.Namespace) -> Payload:
        user = admin_ops.update_user(ctx.conn, args.name, suspended=suspended, actor=ctx.actor)
        return admin_ops.changed_user_view(ctx.conn, user)

    return compute


def _done(verb: str) -> Render:
    return lambda p: f"{verb} user {p['name']}"


def users_delete(ctx: Context, args: argparse.Namespace) -> Payload:
    accounts.delete_user(ctx.conn, args.name, actor=ctx.actor)
    return {"name": args.name, "deleted": True}


def users_limits(ctx: Context, args: argparse.Namespace) -> Payload:
    if not args.set and not args.unset:
        user = get_user(ctx.conn, args.name)
    else:
        user = admin_ops.update_user(ctx.conn, args.name,
                                     limits=limit_values(args.set, args.unset), actor=ctx.actor)
    return admin_ops.changed_user_view(ctx.conn, user)


def render_limits(p: Payload) -> str:
    return f"limits of {p['name']} (default = the server-wide default):\n" \
           + _limits_text(p.get("limits"))


# ---------------------------------------------------------------- keys


def keys_create(ctx: Context, args: argparse.Namespace) -> Payload:
    key, prefix = admin_ops.create_key(ctx.conn, ctx.secret(), args.user,
                                       expires_at=args.expires or None, actor=ctx.actor)
    return admin_ops.new_key_view(key, prefix)


def render_created_key(p: Payload) -> str:
    return f"created key {p['prefix']}\nkey: {p['key']}\n{STORE_IT}"


def keys_list(ctx: Context, args: argparse.Namespace) -> Payload:
    names = [get_user(ctx.conn, args.user).name] if args.user else \
        [u.name for u in accounts.list_users(ctx.conn)]
    return {"keys": [{"user": name, **k.to_json()} for name in names
                     for k in accounts.list_keys(ctx.conn, name)]}


def render_keys(p: Payload) -> str:
    columns = ("user", *KEY_COLUMNS)
    return table(columns, [[k.get(c) for c in columns] for k in p["keys"]]) if p["keys"] \
        else "no keys"


def keys_revoke(ctx: Context, args: argparse.Namespace) -> Payload:
    prefix = admin_ops.revoke_key(ctx.conn, args.prefix, actor=ctx.actor)
    return {"prefix": prefix, "revoked": True}


# ---------------------------------------------------------------- usage


def usage(ctx: Context, args: argparse.Namespace) -> Payload:
    rows = admin_ops.usage(ctx.conn, user=args.user, model=args.model, since=args.since,
                           until=args.until, group_by=args.group_by)
    return {"group_by": args.group_by, "rows": rows}


def _sum_known(values: list[Any]) -> Any:
    """The sum of the values that are known (GPU time is None where no backend said);
    None when none is."""
    known = [v for v in values if v is not None]
    return round(sum(known), 6) if known else None


def render_usage(p: Payload) -> str:
    rows = p["rows"]
    if not rows:
        return "no usage"
    columns = ("requests", "prompt_tokens", "completion_tokens", "errors", "gpu_seconds",
               "load_seconds")
    total = ["total", *(_sum_known([r[c] for r in rows]) for c in columns)]
    return table((p["group_by"], *columns), [[r["key"], *(r[c] for c in columns)] for r in rows]
                 + ([total] if len(rows) > 1 else []))


# ---------------------------------------------------------------- parser


def _common(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--config", metavar="FILE",
                     help="ini file whose [server] database is used (default: ./ollama-proxy.ini)")
    cmd.add_argument("--database", metavar="PATH", help="SQLite file; overrides the config's")
    cmd.add_argument("--json", action="store_true",
                     help="print JSON (the admin API's shapes, where it has the call) "
                          "instead of text")


def add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``users``, ``keys`` and ``usage`` on the top-level subcommands."""

    def group(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        parser = sub.add_parser(name, help=help_text, description=help_text)
        return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)

    def add(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
            help_text: str, compute: Compute, render: Render) -> argparse.ArgumentParser:
        cmd = parent.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(func=_run(compute, render))
        _common(cmd)
        return cmd

    limit_help = ("set a limit, named as in [limits] (repeatable): requests_per_minute=60, "
                  "quota_period=month, allowed_models=llama3*,qwen*, expires_at=2025-12-31, "
                  "weight=2, ...; "
                  "VALUE null = the default, 0 = none allowed (allowed_models= : no model)")

    users = group("users", "manage users on the database file (offline)")
    cmd = add(users, "create", "create a user and its first key (the key is shown once)",
              users_create, render_created_user)
    cmd.add_argument("name", metavar="NAME")
    cmd.add_argument("--role", choices=ROLES, default=DEFAULT_ROLE,
                     help=f"default: {DEFAULT_ROLE}")
    cmd.add_argument("--limit", metavar="NAME=VALUE", type=assignment, action="append",
                     help=limit_help)
    add(users, "list", "list users with their usage", users_list, render_users)
    cmd = add(users, "show", "show a user, its usage, limits and keys", users_show, render_user)
    cmd.add_argument("name", metavar="NAME")
    for name, done, suspended, help_text in (
            ("suspend", "suspended", True,
             "suspend a user: its keys are refused (403) until resumed"),
            ("resume", "resumed", False, "resume a suspended user")):
        cmd = add(users, name, help_text, _set_suspended(suspended), _done(done))
        cmd.add_argument("name", metavar="NAME")
    cmd = add(users, "delete", "delete a user: its keys stop working; its ledger rows are kept "
              "(asks nothing)", users_delete,
              lambda p: f"deleted user {p['name']} (its keys no longer work; its usage stays "
                        "in the ledger)")
    cmd.add_argument("name", metavar="NAME")
    cmd = add(users, "limits", "print a user's limits, or change them with --set/--unset",
              users_limits, render_limits)
    cmd.add_argument("name", metavar="NAME")
    cmd.add_argument("--set", metavar="NAME=VALUE", type=assignment, action="append",
                     help=limit_help)
    cmd.add_argument("--unset", metavar="NAME", action="append",
                     help="put this limit back to the default (repeatable)")

    keys = group("keys", "manage API keys on the database file (offline)")
    cmd = add(keys, "create", "create a key for a user (the key is shown once)",
              keys_create, render_created_key)
    cmd.add_argument("user", metavar="USER")
    cmd.add_argument("--expires", metavar="ISO", help="expiry time, ISO 8601 (default: never)")
    cmd = add(keys, "list", "list keys (prefixes only), of one user or all", keys_list, render_keys)
    cmd.add_argument("user", metavar="USER", nargs="?")
    cmd = add(keys, "revoke", "revoke a key by its prefix (or the whole key): it stops working "
              "at once",
              keys_revoke, lambda p: f"revoked key {p['prefix']}")
    cmd.add_argument("prefix", metavar="PREFIX")

    cmd = add(sub, "usage", "usage from the ledger, grouped (offline)", usage, render_usage)
    cmd.add_argument("--user", metavar="USER", help="only this user")
    cmd.add_argument("--model", metavar="MODEL", help="only this model")
    cmd.add_argument("--since", metavar="ISO", help="from this time on, ISO 8601")
    cmd.add_argument("--until", metavar="ISO", help="before this time, ISO 8601")
    cmd.add_argument("--group-by", choices=reports.GROUPS, default="user", help="default: user")
