"""isotime.py: ISO 8601 times to and from Unix seconds (UTC), as tables."""

from __future__ import annotations

import calendar

import pytest

from ollama_proxy.isotime import iso, parse_time

BAD_TIME = ValueError  # isotime speaks no HTTP: callers add the status


def utc(*ymdhms: int) -> float:
    return float(calendar.timegm((*ymdhms, 0, 0, 0)))


@pytest.mark.parametrize(("text", "seconds"), [
    ("2026-11-27", utc(2026, 11, 27, 0, 0, 0)),
    ("2026-11-27T07:14", utc(2026, 11, 27, 7, 14, 0)),
    ("2026-11-27T07:14:39", utc(2026, 11, 27, 7, 14, 39)),
    ("2026-11-27T07:14:39Z", utc(2026, 11, 27, 7, 14, 39)),
    ("2026-11-27t07:14:39z", utc(2026, 11, 27, 7, 14, 39)),
    ("2026-11-27 07:14:39", utc(2026, 11, 27, 7, 14, 39)),
    ("  2026-11-27T07:14:39Z\n", utc(2026, 11, 27, 7, 14, 39)),
    ("2026-11-27T07:14:39.25Z", utc(2026, 11, 27, 7, 14, 39) + 0.25),
    ("2026-11-27T07:14:39,5", utc(2026, 11, 27, 7, 14, 39) + 0.5),
    ("2026-11-27T07:14:39.1234567891Z", utc(2026, 11, 27, 7, 14, 39) + 0.123456),
    ("2026-11-27T09:14:39+02:00", utc(2026, 11, 27, 7, 14, 39)),
    ("2026-11-27T02:14:39-0500", utc(2026, 11, 27, 7, 14, 39)),
    ("2026-11-27T00:30+01:00", utc(2026, 11, 26, 23, 30, 0)),
    ("1970-01-01T00:00:00Z", 0.0),
    ("2024-02-29", utc(2024, 2, 29, 0, 0, 0)),
])
def test_parse_time(text, seconds):
    """Dates and date-times; naive is UTC, offsets are honoured, fractions to microseconds."""
    assert parse_time(text, "since") == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("text", [
    "", "tomorrow", "2026-11", "2026/11/27", "27-11-2026", "2026-11-27T07", "2026-13-01",
    "2026-02-30", "2025-02-29", "2026-11-27T24:00:00Z", "2026-11-27T07:60", "2026-11-27T07:14:61",
    "2026-11-27T07:14:39+25:00", "2026-11-27T07:14:39 UTC", "２０２６-11-27", None, 1764227679,
    ["2026-11-27"],
])
def test_parse_time_refuses_what_is_not_a_time(text):
    """Anything else is refused with a message naming the field and the form wanted."""
    with pytest.raises(BAD_TIME) as info:
        parse_time(text, "expires_at")
    assert str(info.value) == ('"expires_at" must be an ISO 8601 date or time, '
                               "like 2026-11-27 or 2026-11-27T07:14:39Z")


@pytest.mark.parametrize(("seconds", "text"), [
    (None, None),
    (0, "1970-01-01T00:00:00Z"),
    (utc(2026, 11, 27, 7, 14, 39), "2026-11-27T07:14:39Z"),
    (utc(2026, 11, 27, 7, 14, 39) + 0.999, "2026-11-27T07:14:39Z"),  # whole seconds, not rounded
])
def test_iso(seconds, text):
    """Unix seconds as ISO 8601 UTC, to the second; None stays None."""
    assert iso(seconds) == text


@pytest.mark.parametrize("seconds", [0.0, utc(2026, 11, 27, 7, 14, 39),
                                     utc(2099, 12, 31, 23, 59, 59)])
def test_iso_reads_back(seconds):
    """What iso writes, parse_time reads as the same second."""
    assert parse_time(iso(seconds), "t") == seconds


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01", "2026-11-27T07", "20261127",
                                  "2026-11-27T07:14+25:00", "２０２６-11-27", 1700000000, None])
def test_parse_time_errors_name_the_field(text):
    """Anything else is a ValueError naming the field (each caller says what it means)."""
    with pytest.raises(ValueError, match='"until" must be an ISO 8601'):
        parse_time(text, "until")


def test_iso_of_none_is_none():
    """No time stays no time."""
    assert iso(None) is None
