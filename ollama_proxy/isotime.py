"""ISO 8601 times as the API and the config write them, to and from Unix
seconds (UTC). Pure; shared by the admin use-cases, the config and the limits.
A bad time is a ``ValueError``: each caller says what it means where it is
(a 400 in the admin API, a config error in the config)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

# YYYY-MM-DD, optionally [T ]HH:MM[:SS[.fraction]] and Z or ±HH[:]MM.
_TIME_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})"
                      r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?"
                      r"(Z|z|[+-]\d{2}:?\d{2})?)?", re.ASCII)


def iso(ts: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC (``2026-11-27T07:14:39Z``), None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: object, field: str) -> float:
    """An ISO 8601 date or date-time as unix seconds; naive means UTC. Anything else is
    a ``ValueError`` that names ``field``.

    Parsed by one pattern rather than ``fromisoformat``, whose accepted forms
    differ between Python 3.10 and 3.11.
    """
    match = _TIME_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise _bad_time(field)
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        tz = timezone.utc
        if zone and zone not in ("Z", "z"):
            offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[-2:]))
            tz = timezone(-offset if zone[0] == "-" else offset)
        moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                          int(second or 0), int((fraction or "0")[:6].ljust(6, "0")), tz)
    except ValueError:
        raise _bad_time(field) from None
    return moment.timestamp()


def _bad_time(field: str) -> ValueError:
    return ValueError(f'"{field}" must be an ISO 8601 date or time, '
                      f"like 2026-11-27 or 2026-11-27T07:14:39Z")
