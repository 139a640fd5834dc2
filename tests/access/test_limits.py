"""Limit arithmetic: windows, quotas, caps, decisions, rebuild (sync; time passed in)."""

from __future__ import annotations

import calendar
import json
from dataclasses import dataclass

import pytest

from ollama_proxy.access.counters import LimitStore, UserCounters, rebuild
from ollama_proxy.access.limits import Limits
from ollama_proxy.access.windows import Quota, Window, format_reset, month_key, next_month_start
from ollama_proxy.api.models import filter_listing, filter_models, model_allowed

T = 1_700_000_040.0  # a minute boundary (divisible by 60)
assert T % 60 == 0


def utc(*ymdhms: int) -> float:
    return float(calendar.timegm((*ymdhms, 0, 0, 0)))


@dataclass
class Row:
    time: float
    user: str | None
    prompt_tokens: int
    completion_tokens: int
    outcome: str = "ok"


# -- Limits ------------------------------------------------------------------------


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
])
def test_merged_rejects_bad_values(overrides):
    """Unknown names and bad values raise ValueError naming the problem."""
    with pytest.raises(ValueError):
        Limits.merged(Limits(), overrides)


# -- Window ------------------------------------------------------------------------


@pytest.mark.parametrize(("at", "used"), [
    (T, 1), (T + 0.999, 1), (T + 59.999, 1), (T + 60.0, 1), (T + 60.999, 1), (T + 61.0, 0),
])
def test_minute_window_forgets_one_window_after_its_bucket_ends(at, used):
    """An event in second [T, T+1) counts until T+61: any 60 s span holds it or not."""
    w = Window(60, 1)
    w.add(T + 0.5, 1)
    assert w.used(at) == used


@pytest.mark.parametrize(("at", "used"), [
    (T + 86_400 - 1, 1), (T + 86_400 + 59, 1), (T + 86_400 + 60, 0),
])
def test_day_window_uses_minute_buckets(at, used):
    """The day window forgets an event one day after the end of its minute."""
    w = Window(86_400, 60)
    w.add(T + 30, 1)
    assert w.used(at) == used


def test_no_double_burst_at_a_minute_boundary():
    """Trying every 0.25 s for 5 minutes: no 60 s span ever admits more than the limit."""
    uc = UserCounters()
    limits = Limits(requests_per_minute=60)
    admitted = []
    t = T - 0.5
    while t < T + 300:
        d, res = uc.admit(limits, t, None)
        if d.allowed:
            uc.settle(res, t, 0, 0)
            admitted.append(t)
        t += 0.25
    for i, start in enumerate(admitted):
        in_span = [a for a in admitted[i:] if a < start + 60]
        assert len(in_span) <= 60
    assert len(admitted) >= 60 * 4  # and it still lets the rate through


def test_burst_then_boundary_is_refused():
    """60 requests just before a minute boundary; the next minute gives none at once."""
    uc = UserCounters()
    limits = Limits(requests_per_minute=60)
    for _ in range(60):
        assert uc.admit(limits, T - 0.5, None)[0].allowed
    d = uc.check(limits, T + 0.01, None)
    assert (d.allowed, d.status, d.code, d.limit) == (False, 429, "rate_limit_exceeded",
                                                      "requests_per_minute")
    assert d.retry_after_s == 60  # frees at T - 1 + 61 = T + 60 -> ceil(59.99)
    assert uc.check(limits, T + 60, None).allowed


@pytest.mark.parametrize(("events", "now", "amount", "limit", "expected"), [
    ([], T, 1, 2, 0),                                  # fits now
    ([(T, 1), (T + 10.5, 1)], T + 20, 1, 2, 41),       # T's bucket frees at T+61
    ([(T, 1), (T + 10.5, 1)], T + 20, 2, 2, 51),       # need both: T+10's frees at T+71
    ([(T, 1)], T + 60.9, 1, 1, 1),                     # 0.1 s left -> at least 1
    ([(T, 5)], T + 1, 3, 2, None),                     # more than the limit: never
    ([(T, 5)], T + 1, 1, 0, None),                     # limit 0: never
    ([(T, 3), (T + 30, 3)], T + 40, 2, 6, 21),         # need 2: the oldest 3 free at T+61
])
def test_seconds_until(events, now, amount, limit, expected):
    """Retry-After: whole seconds (ceil, >= 1) until `amount` more fits."""
    w = Window(60, 1)
    for at, n in events:
        w.add(at, n)
    assert w.seconds_until(now, amount, limit) == expected


def test_remove_settles_in_the_reserved_bucket():
    """Settling later adjusts the bucket of the reservation, which expires on its own schedule."""
    w = Window(60, 1)
    w.add(T, 100)
    w.add(T + 30, 7)
    w.remove(T + 30, 80, T)
    assert w.used(T + 30) == 27
    assert w.used(T + 61) == 7  # the settled 20 left with T's bucket
    w.remove(T + 200, 5, T)  # its bucket is gone: nothing to do
    assert w.used(T + 200) == 0


def test_window_memory_is_bounded():
    """Only the buckets inside the window are kept."""
    w = Window(60, 1)
    for i in range(10_000):
        w.add(T + i * 0.5, 1)
    assert len(w._order) <= 61
    assert w.used(T + 5000) == 120  # buckets T+4940 .. T+4999, two each


# -- quota ---------------------------------------------------------------------------


@pytest.mark.parametrize(("now", "key", "next_start"), [
    (utc(2025, 1, 31, 23, 59, 59), "2025-01", utc(2025, 2, 1, 0, 0, 0)),
    (utc(2025, 2, 1, 0, 0, 0), "2025-02", utc(2025, 3, 1, 0, 0, 0)),
    (utc(2024, 12, 15, 12, 0, 0), "2024-12", utc(2025, 1, 1, 0, 0, 0)),
])
def test_month_key(now, key, next_start):
    """UTC calendar months, December rolls into January."""
    assert month_key(now) == key
    assert next_month_start(now) == next_start


def test_month_quota_rolls_over_and_total_never_resets():
    """Jan 31 23:59:59 exhausted; Feb 1 00:00:00 a month quota is fresh, a total one is not."""
    jan = utc(2025, 1, 31, 23, 59, 59)
    feb = utc(2025, 2, 1, 0, 0, 0)
    for period, allowed_in_feb in (("month", True), ("total", False)):
        limits = Limits(token_quota=100, quota_period=period)
        uc = UserCounters()
        d, res = uc.admit(limits, jan, "m")
        assert d.cap == 100
        uc.settle(res, jan, 40, 60)
        d = uc.check(limits, jan, "m")
        assert (d.allowed, d.code, d.retry_after_s) == (False, "insufficient_quota", None)
        assert "token_quota" in d.message
        assert uc.check(limits, feb, "m").allowed is allowed_in_feb
        assert uc.check(limits, feb + 400 * 86_400, "m").allowed is allowed_in_feb


def test_january_reservation_settled_in_february_leaves_february_alone():
    """A settle crossing the month changes the total only, like the ledger row (time = start)."""
    q = Quota()
    jan, feb = utc(2025, 1, 31, 23, 59, 59), utc(2025, 2, 1, 0, 0, 5)
    q.reserve(jan, 100)
    q.settle(feb, -70, jan)
    assert (q.used(feb, "month"), q.used(feb, "total")) == (0, 30)


# -- reserve, settle, caps -----------------------------------------------------------


def test_thirty_concurrent_reservations_never_overshoot_the_quota():
    """30 requests in flight at once against a 1000-token quota: the sum of caps fits."""
    limits = Limits(token_quota=1000, max_tokens_per_request=100)
    uc = UserCounters()
    held = []
    refused = []
    for i in range(30):
        d, res = uc.admit(limits, T + i * 0.01, "llama3.2", prompt_estimate=20)
        (held if d.allowed else refused).append((d, res))
    total = sum(20 + d.cap for d, _ in held)
    assert total <= 1000
    assert all(d.cap >= 1 for d, _ in held)
    # what is held in flight may come back: retry soon, not "never"
    assert refused and all(d.code == "rate_limit_exceeded" and d.retry_after_s == 1
                           and "in flight" in d.message for d, _ in refused)
    for d, res in held:  # everyone uses all it was allowed
        uc.settle(res, T + 5, 20, d.cap)
    assert uc.quota.used(T + 5, "total") <= 1000 and uc.held == 0
    d = uc.check(limits, T + 6, "llama3.2", prompt_estimate=20)
    assert (d.code, d.retry_after_s) == ("insufficient_quota", None)


def test_quota_held_in_flight_comes_back_when_settled_lower():
    """A refusal while reservations hold the quota is retryable; a lower settle frees it."""
    limits = Limits(token_quota=100)
    uc = UserCounters()
    d, res = uc.admit(limits, T, "m", prompt_estimate=10)
    assert d.cap == 90 and uc.held == 100
    d = uc.check(limits, T, "m", prompt_estimate=10)
    assert (d.allowed, d.retry_after_s, d.limit) == (False, 1, "token_quota")
    uc.settle(res, T + 1, 10, 5)
    assert uc.held == 0
    assert uc.check(limits, T + 1, "m", prompt_estimate=10).cap == 75


@pytest.mark.parametrize(("limits", "used", "requested", "prompt", "cap"), [
    (Limits(), 0, None, 0, None),                                    # nothing applies
    (Limits(), 0, 50, 0, 50),                                        # the client's own cap
    (Limits(max_tokens_per_request=200), 0, None, 0, 200),           # injected
    (Limits(max_tokens_per_request=200), 0, 500, 0, 200),            # clamped
    (Limits(max_tokens_per_request=200), 0, 100, 0, 100),            # smaller is kept
    (Limits(max_tokens_per_request=200, tokens_per_minute=1000), 900, None, 0, 100),
    (Limits(max_tokens_per_request=200, tokens_per_minute=1000), 900, None, 30, 70),
    (Limits(tokens_per_day=1000, token_quota=500), 100, None, 0, 400),  # tightest budget
    (Limits(max_tokens_per_request=200), 0, -1, 0, 200),             # num_predict -1 = none
    (Limits(max_tokens_per_request=200), 0, 0, 0, 200),              # 0 = none too (Ollama)
    (Limits(), 0, 0, 0, None),
])
def test_cap_is_min_of_per_request_and_budget_left(limits, used, requested, prompt, cap):
    """cap = min(requested, max_tokens_per_request, budget left - prompt estimate)."""
    uc = UserCounters()
    if used:
        uc.settle(uc.reserve(Limits(), T - 1, None), T - 1, used, 0)
    d = uc.check(limits, T, "m", requested, prompt_estimate=prompt)
    assert d.allowed and d.cap == cap
    assert d.reserve_tokens == prompt + (cap or 0)


@pytest.mark.parametrize(("name", "code"), [
    ("requests_per_minute", "insufficient_quota"),
    ("requests_per_day", "insufficient_quota"),
    ("tokens_per_minute", "insufficient_quota"),
    ("tokens_per_day", "insufficient_quota"),
    ("token_quota", "insufficient_quota"),
    ("max_concurrent", "insufficient_quota"),
    ("max_tokens_per_request", "insufficient_quota"),
])
def test_zero_means_none_allowed(name, code):
    """Any limit at 0 refuses the first request with 429, no Retry-After, naming it."""
    d = UserCounters().check(Limits(**{name: 0}), T, "m")
    assert (d.allowed, d.status, d.code, d.retry_after_s, d.limit) == (False, 429, code, None,
                                                                         name)
    assert name in d.message


def test_zero_models_and_zero_expiry():
    """allowed_models [] allows no model; expires_at 0 expired long ago."""
    assert UserCounters().check(Limits(allowed_models=()), T, "m").code == "model_not_allowed"
    assert UserCounters().check(Limits(expires_at=0), T, "m").code == "user_expired"


def test_none_is_unlimited():
    """Default limits admit anything, without a cap or headers."""
    uc = UserCounters()
    for i in range(2000):
        d, _ = uc.admit(Limits(), T + i / 100, "any", prompt_estimate=10_000)
        assert d.allowed and d.cap is None and d.headers == ()


def test_token_rate_limit_retry_after():
    """tokens_per_minute used up: 429 rate_limited with the wait for the oldest bucket."""
    limits = Limits(tokens_per_minute=100)
    uc = UserCounters()
    d, res = uc.admit(limits, T, "m")
    assert d.cap == 100
    uc.settle(res, T + 2, 30, 70)
    d = uc.check(limits, T + 30, "m")
    assert (d.allowed, d.code, d.retry_after_s) == (False, "rate_limit_exceeded", 31)
    assert "tokens_per_minute" in d.message
    assert uc.check(limits, T + 61, "m").allowed


@pytest.mark.parametrize("name", ["tokens_per_minute", "tokens_per_day"])
def test_window_held_in_flight_is_retryable_at_once(name):
    """Without max_tokens_per_request one request holds a window's whole budget: a second
    one meanwhile waits for that request to settle (Retry-After 1), not for the window to
    slide (a day); a hold that cannot make room keeps the window's wait."""
    limits = Limits(**{name: 1000})
    uc = UserCounters()
    d, res = uc.admit(limits, T, "m", prompt_estimate=10)
    assert d.cap == 990 and uc.held == 1000
    d = uc.check(limits, T + 1, "m", prompt_estimate=10)
    assert (d.allowed, d.code, d.retry_after_s, d.limit) == (
        False, "rate_limit_exceeded", 1, name)
    assert "held by requests in flight" in d.message
    uc.settle(res, T + 2, 12, 30)
    d, res = uc.admit(limits, T + 2, "m", prompt_estimate=10)
    assert d.allowed and d.cap == 1000 - 42 - 10
    uc.settle(res, T + 3, 10, d.cap)  # used it all: nothing in flight can help now
    d = uc.check(limits, T + 4, "m", prompt_estimate=10)
    assert d.retry_after_s == (57 if name == "tokens_per_minute" else 86_400 + 56)
    assert "held" not in d.message


def test_request_larger_than_the_limit_is_never_retried():
    """A prompt estimate above tokens_per_minute can never fit: no Retry-After."""
    d = UserCounters().check(Limits(tokens_per_minute=100), T, "m", prompt_estimate=500)
    assert (d.allowed, d.code, d.retry_after_s) == (False, "rate_limit_exceeded", None)


def test_longest_wait_wins():
    """Blocked by both windows, Retry-After is the longer wait."""
    limits = Limits(requests_per_minute=1, requests_per_day=1)
    uc = UserCounters()
    uc.admit(limits, T, None)
    d = uc.check(limits, T + 10, None)
    assert d.retry_after_s == 86_400 + 60 - 10 and "requests_per_day" in d.message


def test_embeddings_are_charged_their_prompt():
    """completion=False: no cap, reserve the prompt estimate, settle the real prompt."""
    limits = Limits(tokens_per_minute=100, max_tokens_per_request=10)
    uc = UserCounters()
    d, res = uc.admit(limits, T, "all-minilm", prompt_estimate=30, completion=False)
    assert d.allowed and d.cap is None and res.tokens == 30
    uc.settle(res, T + 1, 25, 0)
    assert uc.tpm.used(T + 1) == 25


def test_settle_twice_does_nothing():
    """A second settle (e.g. from a finally block) is ignored."""
    uc = UserCounters()
    _, res = uc.admit(Limits(max_concurrent=1), T, "m", 100)
    uc.settle(res, T, 5, 5)
    uc.settle(res, T, 500, 500)
    assert (uc.tpm.used(T), uc.in_flight) == (10, 0)


def test_max_concurrent():
    """The third request while two are in flight gets 429 rate_limit_exceeded, Retry-After 1."""
    limits = Limits(max_concurrent=2)
    uc = UserCounters()
    r1 = uc.admit(limits, T, "m")[1]
    uc.admit(limits, T, "m")
    d = uc.check(limits, T, "m")
    assert (d.allowed, d.status, d.code, d.retry_after_s, d.limit) == (
        False, 429, "rate_limit_exceeded", 1, "max_concurrent")
    uc.settle(r1, T + 1, 1, 1)
    assert uc.check(limits, T + 1, "m").allowed


def test_expired_user_is_forbidden():
    """At or after expires_at: 403 user_expired (before that: allowed)."""
    limits = Limits(expires_at=T)
    assert UserCounters().check(limits, T - 0.001, "m").allowed
    d = UserCounters().check(limits, T, "m")
    assert (d.allowed, d.status, d.code) == (False, 403, "user_expired")


def test_clock_going_backwards_does_not_corrupt():
    """A wall clock stepping back is treated as standing still."""
    uc = UserCounters()
    limits = Limits(requests_per_minute=2)
    _, res = uc.admit(limits, T + 10, "m")
    uc.admit(limits, T + 5, "m")
    uc.settle(res, T, 1, 1)
    assert uc.rpm.used(T + 10) == 2 and uc.tpm.used(T + 10) == 2
    assert uc.check(limits, T + 3, "m").retry_after_s == 61


# -- models ------------------------------------------------------------------------


@pytest.mark.parametrize(("globs", "model", "ok"), [
    (None, "anything", True),
    ((), "llama3.2", False),
    (("llama3.2",), "llama3.2", True),
    (("llama3.2",), "llama3.2:latest", True),
    (("llama3.2:latest",), "llama3.2", True),
    (("llama3.2",), "llama3.2:1b", False),
    (("LLaMA3.2",), "llama3.2:LATEST", True),
    (("llama3.2",), "registry.ollama.ai/library/llama3.2:latest", True),
    (("registry.ollama.ai/library/llama3.2",), "llama3.2", True),
    (("llama*",), "llama3.2:1b", True),
    (("llama3.2:*",), "llama3.2", True),
    (("qwen*", "mistral"), "llama3.2", False),
    (("*",), "hf.co/user/model:q4", True),
    (("myhost:5000/m",), "myhost:5000/m", True),
])
def test_model_allowed(globs, model, ok):
    """Globs are case-insensitive; :latest is implied; the registry prefix is ignored."""
    assert model_allowed(globs, model) is ok


def test_model_not_allowed_is_forbidden_and_tags_are_filtered():
    """403 model_not_allowed names the model; listings keep only allowed models."""
    d = UserCounters().check(Limits(allowed_models=("llama*",)), T, "qwen2.5")
    assert (d.allowed, d.status, d.code) == (False, 403, "model_not_allowed")
    assert "qwen2.5" in d.message
    assert filter_models(("llama*",), ["llama3.2:latest", "qwen2.5:7b"]) == ["llama3.2:latest"]
    assert filter_models(None, ["a", "b"]) == ["a", "b"]


@pytest.mark.parametrize(("body", "kept"), [
    ({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"},
                 {"name": "qwen2.5:7b", "model": "qwen2.5:7b"}]}, ["llama3.2:latest"]),
    ({"object": "list", "data": [{"id": "qwen2.5:7b"}, {"id": "llama3.2:1b"}]}, ["llama3.2:1b"]),
    ({"models": [{"model": "llama3.2"}, "junk", {"name": 7}]}, ["llama3.2"]),
])
def test_filter_listing_keeps_allowed_models(body, kept):
    """/api/tags, /api/ps and /v1/models replies lose the models the globs do not allow."""
    got = json.loads(filter_listing(("llama*",), json.dumps(body).encode()))
    entries = got.get("models", got.get("data"))
    assert [e.get("name") or e.get("model") or e.get("id") for e in entries] == kept
    assert got.get("object") == body.get("object")


def test_filter_listing_returns_the_same_bytes_when_nothing_goes():
    """Nothing filtered or not a listing: the backend's bytes, not a re-serialisation."""
    for raw in (b'{"models": [{"name": "llama3.2"}]}', b"not json", b"[1]", b'{"a": 1}'):
        assert filter_listing(("llama*",), raw) is raw


# -- headers -------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (-3, "0s"), (0.02, "20ms"), (0.0001, "1ms"), (1, "1s"), (1.2, "2s"),
    (59, "59s"), (60, "1m0s"), (360, "6m0s"), (3723, "1h2m3s"), (86_460, "24h1m0s"),
])
def test_format_reset(seconds, text):
    """Reset durations as OpenAI writes them."""
    assert format_reset(seconds) == text


def test_headers_show_the_tightest_limits_after_this_request():
    """Remaining counts this request and its reservation; reset is when all usage expires."""
    limits = Limits(requests_per_minute=10, requests_per_day=1000, tokens_per_minute=1000,
                    tokens_per_day=100_000, max_tokens_per_request=100)
    uc = UserCounters()
    _, res = uc.admit(limits, T, "m", prompt_estimate=20)
    uc.settle(res, T + 1, 20, 30)
    d = uc.check(limits, T + 30.5, "m", prompt_estimate=20)
    assert dict(d.headers) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "8",
        "x-ratelimit-reset-requests": "1m1s",  # what this request adds frees at T+91
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": str(1000 - 50 - 120),
        "x-ratelimit-reset-tokens": "1m1s",
    }


def test_headers_on_refusal_and_quota_tightest():
    """Refused: the state as is; a month quota resets at the month's end, a total never."""
    now = utc(2025, 3, 31, 23, 54, 0)
    uc = UserCounters()
    uc.settle(uc.reserve(Limits(), now - 5, None), now - 5, 10, 90)
    d = uc.check(Limits(token_quota=100, quota_period="month", tokens_per_day=10_000), now, "m")
    assert not d.allowed
    assert dict(d.headers) == {"x-ratelimit-limit-tokens": "100",
                               "x-ratelimit-remaining-tokens": "0",
                               "x-ratelimit-reset-tokens": "6m0s"}
    d = uc.check(Limits(token_quota=100), now, "m")
    assert dict(d.headers) == {"x-ratelimit-limit-tokens": "100",
                               "x-ratelimit-remaining-tokens": "0"}


def test_remaining_for_v1_me():
    """What is left of each limit; None where unlimited."""
    uc = UserCounters()
    limits = Limits(requests_per_minute=5, token_quota=100, max_concurrent=3)
    uc.admit(limits, T, "m", 10)
    assert uc.remaining(limits, T) == {
        "requests_per_minute": 4, "requests_per_day": None, "tokens_per_minute": None,
        "tokens_per_day": None, "token_quota": 90, "max_concurrent": 2}


# -- rebuild ---------------------------------------------------------------------------


def _simulate():
    """Live traffic over two days for three users, and the ledger rows it writes."""
    start = utc(2025, 1, 31, 0, 0, 0)
    live = LimitStore()
    rows = []
    limits = Limits(tokens_per_minute=5000, max_tokens_per_request=300)
    for i in range(3000):
        user = ("ann", "bob", "cyd")[i % 3]
        t = start + i * 57.3  # ~2 days
        uc = live.get(user)
        d, res = uc.admit(limits, t, "m", prompt_estimate=40)
        if not d.allowed:
            rows.append(Row(t, user, 0, 0, "refused"))
            continue
        prompt, completion = 35 + i % 11, (i * 7) % (d.cap + 1)
        uc.settle(res, t + 3.7, prompt, completion)
        rows.append(Row(t, user, prompt, completion))
    rows.append(Row(start, None, 99, 99))  # no user: not counted
    return live, rows, limits, start + 3000 * 57.3


def test_rebuild_equals_counting_live():
    """A restart rebuilds the same windows and quotas from the ledger rows."""
    live, rows, limits, now = _simulate()
    rebuilt = rebuild(list(reversed(rows)), now)
    assert set(rebuilt) == {"ann", "bob", "cyd"}
    for user, uc in live.users.items():
        assert rebuilt[user].snapshot(now) == uc.snapshot(now)
        assert rebuilt[user].snapshot(now)["tokens_total"] > 0
        for dt in (0, 20, 61, 3600, 86_400):
            assert (rebuilt[user].check(limits, now + dt, "m", prompt_estimate=40)
                    == uc.check(limits, now + dt, "m", prompt_estimate=40))


def test_rebuild_with_all_time_totals():
    """Given all-time totals, rows feed only the windows and the month."""
    now = utc(2025, 2, 10, 0, 0, 0)
    rows = [Row(now - 30, "ann", 10, 20), Row(utc(2025, 1, 20, 0, 0, 0), "ann", 1, 1)]
    got = rebuild(rows, now, totals={"ann": 5000, "old": 7})
    assert got["ann"].snapshot(now) == {
        "requests_minute": 1, "requests_day": 1, "tokens_minute": 30, "tokens_day": 30,
        "tokens_total": 5000, "tokens_month": 30, "in_flight": 0}
    assert got["old"].quota.used(now, "total") == 7


def test_rebuild_with_month_totals_and_a_day_of_rows():
    """Rows from the last day feed the windows; ``months`` sets this month's quota use,
    also when the day reaches back into the previous month."""
    now = utc(2025, 3, 1, 0, 10, 0)
    rows = [Row(now - 60 * 60, "ann", 10, 20), Row(now - 30, "ann", 1, 2)]
    got = rebuild(rows, now, totals={"ann": 900}, months={"ann": 3, "bob": 40})
    assert got["ann"].snapshot(now) == {
        "requests_minute": 1, "requests_day": 2, "tokens_minute": 3, "tokens_day": 33,
        "tokens_total": 900, "tokens_month": 3, "in_flight": 0}
    assert got["bob"].quota.used(now, "month") == 40
    assert got["bob"].quota.used(utc(2025, 4, 1, 0, 0, 0), "month") == 0



def test_settle_into_an_empty_older_bucket():
    """A zero reservation settled after later traffic lands in its own (older) bucket."""
    uc = UserCounters()
    res = uc.reserve(Limits(), T, None)  # unknown prompt, no cap: holds 0 tokens
    uc.admit(Limits(), T + 5, "m", 10)
    uc.settle(res, T + 10, 7, 3)
    assert uc.tpm.used(T + 10) == 20
    assert uc.tpm.used(T + 61) == 10  # T's bucket expired first
    assert list(uc.tpm._order) == [int(T) + 5]
