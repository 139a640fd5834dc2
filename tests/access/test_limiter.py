"""The per-request limits step (access/limiter.py) driven directly, with trio's autojump clock
as its clock: windows, month rollover, caps sent upstream, refusals in each API
family's shape, settle, and the wait for a start's ledger backlog."""

from __future__ import annotations

import calendar
import dataclasses
import json
from typing import Any

import pytest
import trio
import trio.testing

from counter_counts import counts
from ollama_proxy.access.limiter import Limiter
from ollama_proxy.access.limits import Limits
from ollama_proxy.api.body_rules import apply_openai_rules, parse_body, wants_stream
from ollama_proxy.api.exchange import Exchange
from ollama_proxy.api.models import filter_listing
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.api.routes import PREFIX_ROUTES, ROUTES
from ollama_proxy.errors import ApiFamily, LimitError, render
from ollama_proxy.http.messages import Request
from ollama_proxy.store.accounts import KeyEntry


def utc(*ymdhms: int) -> float:
    return float(calendar.timegm((*ymdhms, 0, 0, 0)))


BASE = utc(2025, 1, 31, 23, 58, 0)  # two minutes before a month ends
EXPIRED = utc(2025, 1, 1, 0, 0, 0)  # an expires_at before BASE, as the store keeps it
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "x" * 40}]}  # ~10 tokens


def key(limits: dict[str, Any] | None = None, user: str = "ann", prefix: str = "op-ann") -> KeyEntry:
    return KeyEntry(prefix=prefix, hash=b"", user=user, role="user", suspended=False,
                    expires_at=None, user_limits=limits or {})


def exchange(path: str, body: dict[str, Any] | None = None, principal: KeyEntry | None = None,
             method: str = "POST") -> Exchange:
    """An exchange as the relay hands it to the steps (body parsed, OpenAI rules applied)."""
    raw = b"" if body is None else json.dumps(body).encode()
    route = ROUTES.get(path) or next(r for p, r in PREFIX_ROUTES if path.startswith(p))
    ex = Exchange(Request(method, path, path, "", [], raw, "127.0.0.1"), route, b"rid")
    ex.principal = principal or key()
    ex.body_obj = parse_body(route, raw)
    ex.stream = wants_stream(route, ex.body_obj)
    if ex.body_obj is not None:
        ex.body_dirty, ex.usage_injected = apply_openai_rules(route, ex.body_obj, ex.stream)
    return ex


def usage(ex: Exchange, prompt: int, completion: int) -> RequestRecord:
    return RequestRecord(request_id="rid", time=BASE, endpoint=ex.request.path, model=ex.model,
                       backend="b", status=200, outcome="ok", prompt_tokens=prompt,
                       completion_tokens=completion, estimated=False, stream=ex.stream,
                       duration_s=0.1, ttfb_s=0.05, client="127.0.0.1",
                       user=ex.principal.user if ex.principal else None)


def limiter(**defaults: Any) -> Limiter:
    return Limiter(Limits(**defaults), clock=lambda: BASE + trio.current_time())


async def refused(lim: Limiter, ex: Exchange) -> LimitError:
    with pytest.raises(LimitError) as info:
        await lim(ex)
    assert ex.reservation is None
    return info.value


def headers(err: LimitError) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in err.headers()}


# -- windows and quotas over (virtual) time ------------------------------------------


async def test_request_window_slides_with_the_clock(autojump_clock):
    """requests_per_minute=2: the third waits Retry-After seconds, then goes; never 3 in 60 s."""
    lim = limiter(requests_per_minute=2)
    admitted = []
    with trio.fail_after(600):
        while len(admitted) < 7:
            ex = exchange("/api/chat", CHAT)
            try:
                await lim(ex)
            except LimitError as err:
                refusal: LimitError | None = err
            else:
                refusal = None
            if refusal is not None:
                assert (refusal.status, refusal.code, refusal.openai_type) == (
                    429, "rate_limit_exceeded", "requests")
                assert refusal.retry_after_s is not None and 1 <= refusal.retry_after_s <= 61
                await trio.sleep(refusal.retry_after_s)
                continue
            admitted.append(trio.current_time())
            lim.settle(ex, usage(ex, 5, 5))
            await trio.sleep(0.5)
    for i, start in enumerate(admitted):
        assert len([t for t in admitted[i:] if t < start + 60]) <= 2


async def test_token_window_reserves_then_settles(autojump_clock):
    """tokens_per_minute=100: a request holds prompt estimate + cap; settling low frees the rest."""
    lim = limiter(tokens_per_minute=100)
    first = exchange("/api/chat", CHAT)
    await lim(first)
    assert first.body_obj["options"] == {"num_predict": 90} and first.body_dirty
    err = await refused(lim, exchange("/api/chat", CHAT))
    # held by the first, in flight: back when it settles, not when the window slides
    assert (err.code, err.openai_type, err.retry_after_s) == ("rate_limit_exceeded", "tokens", 1)
    assert headers(err)["x-ratelimit-remaining-tokens"] == "0"
    lim.settle(first, usage(first, 10, 20))
    second = exchange("/api/chat", CHAT)
    await lim(second)
    assert second.body_obj["options"] == {"num_predict": 60}
    await trio.sleep(61)
    lim.settle(second, usage(second, 10, 60))  # settled after its bucket left the window
    third = exchange("/api/chat", CHAT)
    await lim(third)
    assert third.body_obj["options"] == {"num_predict": 90}


async def test_month_quota_rolls_over_on_the_first(autojump_clock):
    """A used-up month quota: 429 insufficient_quota, no Retry-After, x-should-retry false;
    at 00:00 UTC on the 1st it is fresh (a total quota is not)."""
    month = Limiter(Limits(token_quota=50, quota_period="month"),
                    clock=lambda: BASE + trio.current_time())
    total = Limiter(Limits(token_quota=50), clock=lambda: BASE + trio.current_time())
    for lim in (month, total):
        ex = exchange("/api/chat", CHAT)
        await lim(ex)
        lim.settle(ex, usage(ex, 10, 40))
        err = await refused(lim, exchange("/api/chat", CHAT))
        assert (err.status, err.code, err.openai_type) == (429, "insufficient_quota",
                                                             "insufficient_quota")
        got = headers(err)
        assert got["x-should-retry"] == "false" and "retry-after" not in got
    assert headers(err)["x-ratelimit-remaining-tokens"] == "0"
    await trio.sleep(utc(2025, 2, 1, 0, 0, 0) - BASE - trio.current_time())
    ex = exchange("/api/chat", CHAT)
    await month(ex)
    assert ex.body_obj["options"]["num_predict"] == 40
    await refused(total, exchange("/api/chat", CHAT))


def settled(lim: Limiter, ex: Exchange, record: RequestRecord) -> None:
    """The relay's usage hooks as the gateway wires them: settle, then learn the overhead."""
    lim.settle(ex, record)
    lim.overheads.observe(ex, record)


async def test_reservations_learn_the_prompt_overhead_of_a_model():
    """The backend counts more prompt than the text (the chat template): after one exact
    count the next reservations of that model on that route hold the difference too, so
    requests at once stay within the quota; estimated counts teach nothing; a model
    counted at or below its text adds nothing."""
    lim = limiter(token_quota=300)
    hi = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}  # 1 token
    first = exchange("/api/chat", hi)
    await lim(first)
    assert first.body_obj["options"]["num_predict"] == 299
    settled(lim, first, usage(first, 21, 5))  # 20 tokens of template
    assert lim.store.get("ann").quota.total == 26
    burst = [exchange("/api/chat", {**hi, "model": "LLAMA3.2:latest",
                                    "options": {"num_predict": 9}}) for _ in range(20)]
    admitted = []
    for ex in burst:
        try:
            await lim(ex)
        except LimitError:
            continue
        assert ex.reservation is not None and ex.reservation.tokens == 21 + 9
        admitted.append(ex)
    assert len(admitted) == (300 - 26) // 30
    for ex in admitted:  # every one uses all it was allowed
        settled(lim, ex, usage(ex, 21, 9))
    assert lim.store.get("ann").quota.total <= 300
    lim.store.get("ann").quota.total = 0  # room for the rest
    other = exchange("/v1/chat/completions", {**hi, "max_tokens": 3})  # its own route
    await lim(other)
    assert other.reservation.tokens == 1 + 3
    settled(lim, other, usage(other, 1, 3))
    estimated = exchange("/api/chat", {**hi, "model": "qwen3", "options": {"num_predict": 3}})
    await lim(estimated)
    settled(lim, estimated, dataclasses.replace(usage(estimated, 50, 0), estimated=True))
    qwen = exchange("/api/chat", {**hi, "model": "qwen3", "options": {"num_predict": 1}})
    await lim(qwen)
    assert qwen.reservation.tokens == 1 + 1
    again = exchange("/api/chat", {**hi, "options": {"num_predict": 1}})
    await lim(again)
    assert again.reservation.tokens == 1 + 20 + 1
    settled(lim, again, usage(again, 1, 1))
    last = exchange("/api/chat", {**hi, "options": {"num_predict": 1}})
    await lim(last)
    assert last.reservation.tokens == 1 + 1


async def test_amend_moves_the_difference_into_the_reserved_bucket(autojump_clock):
    """Exact counts that come after settle change the windows and the quota where the
    request was counted: a minute later the minute window has forgotten it, the day
    window and the quota have not."""
    lim = limiter(tokens_per_minute=1000, tokens_per_day=1000, token_quota=1000)
    ex = exchange("/v1/chat/completions", {**CHAT, "max_tokens": 8, "stream": True})
    await lim(ex)
    record = dataclasses.replace(usage(ex, 13, 10), estimated=True)
    lim.settle(ex, record)
    counters = lim.store.get("ann")
    assert counts(counters, BASE + trio.current_time())["tokens_minute"] == 23
    lim.amend(ex, record, 40, 8)
    now = BASE + trio.current_time()
    assert (counts(counters, now)["tokens_minute"], counts(counters, now)["tokens_day"],
            counters.quota.total) == (48, 48, 48)
    await trio.sleep(61)
    lim.amend(ex, dataclasses.replace(record, prompt_tokens=40, completion_tokens=8), 41, 8)
    now = BASE + trio.current_time()
    assert (counts(counters, now)["tokens_minute"], counts(counters, now)["tokens_day"],
            counters.quota.total) == (0, 49, 49)
    assert counters.in_flight == 0
    keyless = exchange("/v1/chat/completions", CHAT)
    keyless.principal = None
    lim.amend(keyless, record, 40, 8)  # nothing reserved: nothing to correct


async def test_max_concurrent_comes_back_after_settle():
    """max_concurrent=1: a second request while one is in flight gets 429 Retry-After 1."""
    lim = limiter(max_concurrent=1)
    ex = exchange("/api/chat", CHAT)
    await lim(ex)
    err = await refused(lim, exchange("/api/chat", CHAT))
    assert (err.code, err.retry_after_s, headers(err)["retry-after"]) == (
        "rate_limit_exceeded", 1, "1")
    lim.settle(ex, usage(ex, 0, 0))
    lim.settle(ex, usage(ex, 0, 0))  # twice: no effect
    assert lim.store.get("ann").in_flight == 0
    await lim(exchange("/api/chat", CHAT))


# -- caps sent upstream ----------------------------------------------------------------


@pytest.mark.parametrize(("path", "extra", "sent", "dirty"), [
    ("/api/chat", {}, {"options": {"num_predict": 50}}, True),
    ("/api/generate", {"options": {"num_predict": 500, "temperature": 0}},
     {"options": {"num_predict": 50, "temperature": 0}}, True),
    ("/api/chat", {"options": {"num_predict": 20}}, {"options": {"num_predict": 20}}, False),
    ("/api/chat", {"options": {"num_predict": -1}}, {"options": {"num_predict": 50}}, True),
    ("/v1/chat/completions", {}, {"max_tokens": 50}, True),
    ("/v1/completions", {"max_tokens": 0}, {"max_tokens": 50}, True),
    ("/v1/chat/completions", {"max_tokens": 7}, {"max_tokens": 7}, False),
    ("/v1/chat/completions", {"max_completion_tokens": 500}, {"max_tokens": 50}, True),
    ("/v1/chat/completions", {"max_completion_tokens": 9, "max_tokens": 300},
     {"max_tokens": 9}, True),
], ids=["native-absent", "native-larger", "native-smaller", "native-unlimited", "v1-absent",
        "v1-zero", "v1-smaller", "v1-max-completion-tokens", "v1-both"])
async def test_cap_is_sent_when_absent_or_larger(path, extra, sent, dirty):
    """max_tokens_per_request=50 becomes num_predict / max_tokens unless the client asked less."""
    lim = limiter(max_tokens_per_request=50)
    body = {"model": "llama3.2", "prompt": "hi", **extra}
    ex = exchange(path, body)
    await lim(ex)
    assert {k: ex.body_obj[k] for k in sent} == sent
    assert "max_completion_tokens" not in ex.body_obj
    assert ex.body_dirty is dirty
    assert ex.reservation.cap == (sent["options"]["num_predict"] if "options" in sent
                                  else sent["max_tokens"])


@pytest.mark.parametrize("options", [{"num_predict": 30}, {"num_predict": 7.5},
                                     {"num_predict": "many"}, {"num_predict": 1e300}])
async def test_no_limits_leave_the_body_alone(options):
    """Without limits nothing is capped, re-serialised or added to the response, and the
    client's cap is the backend's to judge (Ollama takes 7.5 as 7), not a 400."""
    lim = limiter(allowed_models=("llama*",))
    ex = exchange("/api/chat", {**CHAT, "options": options})
    await lim(ex)
    assert not ex.body_dirty and ex.extra_headers is None and ex.reservation.tokens == 0


@pytest.mark.parametrize(("path", "body"), [
    ("/api/chat", {**CHAT, "options": {"num_predict": "many"}}),
    ("/api/chat", {**CHAT, "options": [1]}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": True}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2.5}),
    ("/api/generate", {**CHAT, "options": {"num_predict": float("inf")}}),
])
async def test_a_cap_that_is_not_a_number_is_400(path, body):
    """A cap the gateway cannot compare is refused before anything is counted."""
    lim = limiter(max_tokens_per_request=50)
    with pytest.raises(Exception) as info:
        await lim(exchange(path, body))
    assert getattr(info.value, "status", None) == 400
    assert counts(lim.store.get("ann"), BASE)["requests_minute"] == 0


async def test_embeddings_are_charged_their_prompt_without_a_cap():
    """Embeddings hold their prompt estimate; no cap is added to their body."""
    lim = limiter(tokens_per_minute=1000, max_tokens_per_request=5)
    ex = exchange("/api/embed", {"model": "all-minilm", "input": "y" * 400})
    await lim(ex)
    assert ex.reservation.tokens == 100 and not ex.body_dirty
    lim.settle(ex, usage(ex, 90, 0))
    assert counts(lim.store.get("ann"), BASE)["tokens_minute"] == 90


# -- refusals and routes that count nothing --------------------------------------------


@pytest.mark.parametrize(("limits", "path", "body", "status", "code", "kind"), [
    ({"expires_at": EXPIRED}, "/api/tags", None, 403, "user_expired", "permission_error"),
    ({"allowed_models": ["qwen*"]}, "/api/chat", CHAT, 403, "model_not_allowed",
     "permission_error"),
    ({"allowed_models": ["qwen*"]}, "/api/show", {"model": "llama3.2"}, 403,
     "model_not_allowed", "permission_error"),
    ({"allowed_models": ["qwen*"]}, "/v1/models/llama3.2", None, 404, "model_not_found",
     "invalid_request_error"),
    ({"expires_at": EXPIRED}, "/v1/models/llama3.2", None, 403, "user_expired",
     "permission_error"),
    ({"token_quota": 0}, "/v1/chat/completions", CHAT, 429, "insufficient_quota",
     "insufficient_quota"),
    ({"requests_per_day": 0}, "/v1/embeddings", {"model": "m", "input": "x"}, 429,
     "insufficient_quota", "insufficient_quota"),
])
async def test_refusals_in_the_api_familys_shape(limits, path, body, status, code, kind):
    """Expired and model refusals are 403 (404 for /v1/models/{id}), zero limits 429."""
    lim = limiter()
    method = "POST" if body is not None else "GET"
    err = await refused(lim, exchange(path, body, key(limits), method))
    assert (err.status, err.code) == (status, code)
    if path.startswith("/v1/"):
        shaped = json.loads(render(ApiFamily.OPENAI, err))["error"]
        assert (shaped["type"], shaped["code"]) == (kind, code)
    else:
        assert set(json.loads(render(ApiFamily.NATIVE, err))) == {"error"}


@pytest.mark.parametrize(("limits", "path", "body"), [
    ({"allowed_models": ["qwen*"]}, "/api/chat", CHAT),
    ({"allowed_models": ["qwen*"]}, "/v1/chat/completions", CHAT),
    ({"allowed_models": ["qwen*"]}, "/api/show", {"model": "llama3.2"}),
    ({"allowed_models": ["qwen*"]}, "/v1/models/llama3.2", None),
    ({"expires_at": EXPIRED}, "/api/embed", {"model": "m", "input": "x"}),
    ({"expires_at": EXPIRED}, "/api/tags", None),
])
async def test_forbidden_answers_carry_the_ratelimit_headers(limits, path, body):
    """A user with limits gets the x-ratelimit-* headers on a 403 (or the hidden model's
    404) too, with nothing counted; a user without counted limits gets none."""
    lim = limiter(requests_per_minute=5, tokens_per_day=1000)
    err = await refused(lim, exchange(path, body, key(limits), "POST" if body else "GET"))
    assert err.status in (403, 404)
    got = headers(err)
    assert (got["x-ratelimit-remaining-requests"], got["x-ratelimit-remaining-tokens"]) == (
        "5", "1000")
    err = await refused(limiter(), exchange(path, body, key(limits), "POST" if body else "GET"))
    assert not any(name.startswith("x-ratelimit") for name in headers(err))


async def test_listings_count_nothing_and_are_filtered():
    """Model lists are never refused by a rate limit; with allowed_models they are filtered."""
    lim = limiter(requests_per_minute=1)
    for _ in range(5):
        ex = exchange("/api/tags", None, method="GET")
        await lim(ex)
        assert ex.visible_models is None
        assert dict(ex.extra_headers)[b"x-ratelimit-remaining-requests"] == b"1"
    ex = exchange("/v1/models", None, key({"allowed_models": ["qwen*"]}), "GET")
    await lim(ex)
    reply = {"object": "list", "data": [{"id": "llama3.2:latest"}, {"id": "qwen2.5:7b"}]}
    assert ex.visible_models == ("qwen*",)
    assert json.loads(filter_listing(ex.visible_models, json.dumps(reply).encode()))["data"] == [
        {"id": "qwen2.5:7b"}]


async def test_model_management_is_not_a_use_of_the_model():
    """An admin pulling a model outside its allowed_models is not refused for it."""
    lim = limiter(allowed_models=("llama*",))
    await lim(exchange("/api/pull", {"model": "qwen2.5"}))


# -- effective limits -------------------------------------------------------------------


async def test_merged_limits_follow_the_overrides_object_and_the_defaults():
    """The merge is cached while the key index hands out the same overrides; an edit (a new
    dict) or new defaults are seen at once."""
    lim = limiter(tokens_per_day=1000)
    entry = key({"token_quota": 5})
    first = lim.limits_for(entry)
    assert first == Limits(tokens_per_day=1000, token_quota=5)
    assert lim.limits_for(entry) is first
    assert lim.limits_for(key({"token_quota": 6})).token_quota == 6
    lim.set_defaults(Limits(tokens_per_day=10))
    assert lim.limits_for(key({"token_quota": 6})).tokens_per_day == 10
    assert lim.remaining(key())["tokens_per_day"] == 10


async def test_quota_counted_requests_wait_for_the_backlog():
    """While a start's backlog is summed, a request a token quota counts waits; others go."""
    lim = limiter()
    summed = trio.Event()
    lim.quota_pending = summed.wait
    admitted: list[str] = []

    async def go(user: str, limits: dict[str, Any]) -> None:
        await lim(exchange("/api/chat", CHAT, key(limits, user=user, prefix=user)))
        admitted.append(user)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(go, "quota", {"token_quota": 1000})
            nursery.start_soon(go, "free", {"tokens_per_day": 1000})
            await trio.testing.wait_all_tasks_blocked()
            assert admitted == ["free"]
            lim.quota_pending = None
            summed.set()
    assert admitted == ["free", "quota"]


@pytest.mark.parametrize(("limits", "path", "body", "reason"), [
    ({"token_quota": 0}, "/api/chat", CHAT, "quota"),
    ({"requests_per_day": 0}, "/api/embed", {"model": "m", "input": "x"}, "quota"),
    ({"max_concurrent": 0}, "/api/chat", CHAT, "concurrency"),
    ({"allowed_models": ["qwen*"]}, "/api/chat", CHAT, "forbidden"),
    ({"allowed_models": ["qwen*"]}, "/v1/models/llama3.2", None, "forbidden"),
    ({"expires_at": EXPIRED}, "/api/tags", None, "forbidden"),
])
async def test_each_refusal_names_its_reason_for_the_metrics(limits, path, body, reason):
    err = await refused(limiter(), exchange(path, body, key(limits), "POST" if body else "GET"))
    assert err.reason == reason


async def test_a_full_window_and_a_busy_user_are_rate_limit_and_concurrency():
    lim = limiter(requests_per_minute=1, max_concurrent=1)
    first = exchange("/api/chat", CHAT)
    await lim(first)
    assert (await refused(lim, exchange("/api/chat", CHAT))).reason == "concurrency"
    lim.settle(first, usage(first, 1, 1))
    assert (await refused(lim, exchange("/api/chat", CHAT))).reason == "rate_limit"
