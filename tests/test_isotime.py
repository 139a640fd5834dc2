"""ISO 8601 to Unix seconds and back: the forms accepted, and a ValueError naming the field."""

from __future__ import annotations

import pytest

from ollama_proxy.isotime import iso, parse_time


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-27", "2026-11-27T00:00:00Z"),
    ("2026-11-27T07:14:39Z", "2026-11-27T07:14:39Z"),
    ("2026-11-27T07:14:39", "2026-11-27T07:14:39Z"),
    ("2026-11-27T07:14:39.5z", "2026-11-27T07:14:39Z"),
    ("2026-11-27T09:14:39+02:00", "2026-11-27T07:14:39Z"),
    ("2026-11-27 07:14", "2026-11-27T07:14:00Z"),
    ("2026-11-27T07:14:39.123456789-0130", "2026-11-27T08:44:39Z"),
])
def test_parse_time_and_iso(text, expected):
    """ISO 8601 dates and times, naive meaning UTC, come back as UTC Z."""
    assert iso(parse_time(text, "since")) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01", "2026-11-27T07", "20261127",
                                  "2026-11-27T07:14+25:00", "２０２６-11-27", 1700000000, None])
def test_parse_time_errors_name_the_field(text):
    """Anything else is a ValueError naming the field (each caller says what it means)."""
    with pytest.raises(ValueError, match='"until" must be an ISO 8601'):
        parse_time(text, "until")


def test_iso_of_none_is_none():
    """No time stays no time."""
    assert iso(None) is None
