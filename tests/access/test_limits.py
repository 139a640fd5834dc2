"""access/limits.py: one user's limits as a value, the defaults merged with the user's
overrides and checked."""

from __future__ import annotations

import calendar

import pytest

from ollama_proxy.access.limits import Limits


def utc(*ymdhms: int) -> float:
    return float(calendar.timegm((*ymdhms, 0, 0, 0)))


def test_merged_null_falls_back_to_default():
    """An override set to None keeps the default; others replace it."""
    defaults = Limits(requests_per_minute=10, token_quota=1000, quota_period="month")
    got = Limits.merged(defaults, {"requests_per_minute": None, "token_quota": 5,
                                   "allowed_models": ["llama*"]})
    assert got == Limits(requests_per_minute=10, token_quota=5, quota_period="month",
                         allowed_models=("llama*",))
    assert Limits.merged(defaults, {}) is defaults
    assert got.to_dict()["allowed_models"] == ["llama*"]


def test_merged_takes_the_stored_form_and_to_dict_shows_it():
    """expires_at is stored as Unix seconds: merged takes it as is, to_dict shows ISO 8601."""
    stored = {"expires_at": utc(2025, 2, 1, 0, 0, 0), "allowed_models": ["a*"]}
    got = Limits.merged(Limits(), stored)
    assert got.expires_at == utc(2025, 2, 1, 0, 0, 0) and got.unbounded  # no count applies
    assert {k: got.to_dict()[k] for k in stored} == {"expires_at": "2025-02-01T00:00:00Z",
                                                     "allowed_models": ["a*"]}
    assert Limits().unbounded and not Limits(max_concurrent=3).unbounded


@pytest.mark.parametrize("overrides", [
    {"requests_per_hour": 3},
    {"requests_per_minute": -1},
    {"requests_per_minute": 1.5},
    {"requests_per_minute": True},
    {"quota_period": "week"},
    {"allowed_models": "llama3.2"},
    {"expires_at": "2025-02-01T00:00:00Z"},  # the store keeps numbers
    {"weight": 0},
    {"weight": -1.0},
    {"weight": 1000.5},
    {"weight": True},
    {"weight": "2"},
    {"weight": float("nan")},
    {"weight": float("inf")},
])
def test_merged_rejects_bad_values(overrides):
    """Unknown names and bad values raise ValueError naming the problem."""
    with pytest.raises(ValueError):
        Limits.merged(Limits(), overrides)


@pytest.mark.parametrize(("expires_at", "now", "refused"), [
    (None, 1e12, False),  # never expires
    (1000.0, 999.999, False),
    (1000.0, 1000.0, True),  # at the instant it is expired
    (1000.0, 2000.0, True),
])
def test_expired_is_the_one_expiry_rule_and_answer(expires_at, now, refused):
    """From expires_at on, a 403 user_expired naming the limit; before, None."""
    error = Limits(expires_at=expires_at).expired(now)
    if not refused:
        assert error is None
    else:
        assert error is not None
        assert (error.status, error.code, error.message) == (
            403, "user_expired", "this user expired (expires_at)")


def test_weight_defaults_to_one_and_is_a_float_never_a_count():
    """weight: 1 by default, stored as given (an int from JSON too) and held as a float;
    a weight alone leaves the unbounded fast path (no count applies) untouched."""
    assert Limits().weight == 1.0
    got = Limits.merged(Limits(weight=0.5), {"weight": 3})
    assert got.weight == 3.0 and isinstance(got.weight, float) and got.unbounded
    assert Limits.merged(Limits(weight=0.5), {"weight": None}).weight == 0.5
    assert got.to_dict()["weight"] == 3.0
    assert Limits(weight=1000).weight == 1000.0
    assert not Limits(weight=2, max_concurrent=1).unbounded


def test_a_bad_weight_names_the_limit_and_the_range():
    """The message says what a weight may be."""
    with pytest.raises(ValueError, match=r"weight must be a number > 0 and <= 1000, not 0"):
        Limits(weight=0)
