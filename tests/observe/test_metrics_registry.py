"""The metrics registry and its text rendering, read back with prometheus_client's parser."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ollama_proxy.api.record import Outcome, RequestRecord
from ollama_proxy.observe.metrics import (
    REJECTION_REASONS,
    TTFT_BUCKETS,
    Counter,
    GatewayMetrics,
    Gauge,
    Histogram,
    endpoint_label,
    escape_label,
    format_value,
)
from prom_text import samples


def parse(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}



def record(**changes: object) -> RequestRecord:
    base = RequestRecord(
        request_id="r1", time=time.time(), endpoint="/api/chat", model="llama3.2:latest",
        backend="gpu1", status=200, outcome=Outcome.OK, prompt_tokens=10, completion_tokens=21,
        estimated=False, stream=True, duration_s=1.5, ttfb_s=0.2, client="127.0.0.1",
        user="alice", key_prefix="op-x", metered=True, queued_s=0.25)
    return dataclasses.replace(base, **changes)


def test_label_values_are_escaped_and_read_back_the_same():
    nasty = 'a "quoted" back\\slash\nnew line'
    assert escape_label(nasty) == 'a \\"quoted\\" back\\\\slash\\nnew line'
    counter = Counter("x_total", "help with \\ and\nnewline", ("who",))
    counter.inc((nasty,), 2)
    text = "\n".join(counter.render()) + "\n"
    assert samples(text, "x_total") == {(("who", nasty),): 2.0}
    assert "\\n" in text.splitlines()[0]  # the help's newline escaped: still one line


def test_values_render_as_integers_when_whole():
    assert [format_value(v) for v in (3, 3.0, 0.25, float("inf"), 1e20)] == [
        "3", "3", "0.25", "+Inf", "1e+20"]


def test_a_histogram_counts_each_value_in_its_bucket_and_renders_them_cumulated():
    histogram = Histogram("h_seconds", "h", ("m",), buckets=(0.1, 1.0, 10.0))
    for value in (0.05, 0.1, 0.5, 5.0, 50.0):
        histogram.observe(("a",), value)
    text = "\n".join(histogram.render()) + "\n"
    buckets = {dict(k)["le"]: v for k, v in samples(text, "h_seconds_bucket").items()}
    assert buckets == {"0.1": 2, "1": 3, "10": 4, "+Inf": 5}  # le: a bound counts in its bucket
    assert samples(text, "h_seconds_count") == {(("m", "a"),): 5}
    assert samples(text, "h_seconds_sum") == {(("m", "a"),): pytest.approx(55.65)}
    assert parse(text)["h_seconds"].type == "histogram"


def test_buckets_must_increase():
    with pytest.raises(ValueError):
        Histogram("h", "h", buckets=(1.0, 0.5))


def test_a_gauge_set_whole_forgets_what_is_gone():
    gauge = Gauge("g", "g", ("backend",))
    gauge.set_all({("a",): 1, ("b",): 0})
    gauge.set_all({("b",): 1})
    assert samples("\n".join(gauge.render()) + "\n", "g") == {(("backend", "b"),): 1}


def test_a_record_feeds_every_per_request_metric():
    metrics = GatewayMetrics(version="9.9", backends=lambda: [("gpu1", True, 3, 2),
                                                              ("gpu2", False, 0, 0)])
    metrics.observe(record(prompt_eval_ns=2_000_000_000, eval_ns=500_000_000), None, 0.5)
    metrics.observe(record(status=429, outcome=Outcome.REFUSED, backend=None, prompt_tokens=0,
                           completion_tokens=0, stream=False, duration_s=0.001, queued_s=0.0),
                    "rate_limit", None)
    metrics.observe(None, "unauthorized")
    metrics.ledger_committed(0.002)
    text = metrics.render().decode()
    families = parse(text)
    assert samples(text, "ollama_proxy_requests_total") == {
        (("backend", "gpu1"), ("code", "200"), ("endpoint", "/api/chat"),
         ("model", "llama3.2:latest"), ("user", "alice")): 1,
        (("backend", ""), ("code", "429"), ("endpoint", "/api/chat"),
         ("model", ""), ("user", "alice")): 1}
    assert samples(text, "ollama_proxy_tokens_total") == {
        (("model", "llama3.2:latest"), ("type", "prompt"), ("user", "alice")): 10,
        (("model", "llama3.2:latest"), ("type", "completion"), ("user", "alice")): 21}
    assert {k: v for k, v in samples(text, "ollama_proxy_rejections_total").items() if v} == {
        (("reason", "rate_limit"),): 1, (("reason", "unauthorized"),): 1}
    assert samples(text, "ollama_proxy_gpu_seconds_total") == {
        (("backend", "gpu1"), ("model", "llama3.2:latest"), ("user", "alice")): 2.5}
    ttft = samples(text, "ollama_proxy_time_to_first_token_seconds_count")
    assert ttft == {(("backend", "gpu1"), ("model", "llama3.2:latest")): 1}
    # (1.5 - 0.5) s for the 20 tokens after the first
    assert samples(text, "ollama_proxy_time_per_output_token_seconds_sum") == {
        (("backend", "gpu1"), ("model", "llama3.2:latest")): pytest.approx(0.05)}
    assert samples(text, "ollama_proxy_queue_wait_seconds_count") == {
        (("backend", "gpu1"),): 1, (("backend", ""),): 1}
    assert samples(text, "ollama_proxy_request_duration_seconds_count") == {
        (("endpoint", "/api/chat"), ("model", "llama3.2:latest")): 1,
        (("endpoint", "/api/chat"), ("model", "")): 1}
    assert samples(text, "ollama_proxy_ledger_commit_seconds_count") == {(): 1}
    assert samples(text, "ollama_proxy_queue_depth") == {(("backend", "gpu1"),): 2,
                                                         (("backend", "gpu2"),): 0}
    assert samples(text, "ollama_proxy_in_flight_requests") == {(("backend", "gpu1"),): 3,
                                                                (("backend", "gpu2"),): 0}
    assert samples(text, "ollama_proxy_backend_up") == {(("backend", "gpu1"),): 1,
                                                        (("backend", "gpu2"),): 0}
    (build,) = samples(text, "ollama_proxy_build_info")
    assert dict(build)["version"] == "9.9"
    for name, kind in [("process_cpu_seconds", "counter"),
                       ("process_resident_memory_bytes", "gauge"),
                       ("process_start_time_seconds", "gauge")]:
        assert families[name].type == kind
    assert 0 < families["process_start_time_seconds"].samples[0].value <= time.time()
    if os.path.isdir("/proc/self/fd"):
        assert families["process_open_fds"].samples[0].value > 0
        assert families["process_resident_memory_bytes"].samples[0].value > 1_000_000


def test_per_user_false_drops_the_user_label():
    metrics = GatewayMetrics(per_user=False)
    metrics.observe(record(prompt_eval_ns=1_000_000_000), None, 0.5)
    text = metrics.render().decode()
    for name in ("ollama_proxy_requests_total", "ollama_proxy_tokens_total",
                 "ollama_proxy_gpu_seconds_total"):
        assert all("user" not in dict(labels) for labels in samples(text, name)), name
    assert "alice" not in text


def test_no_time_per_token_without_two_tokens_or_for_a_failed_stream():
    metrics = GatewayMetrics()
    metrics.observe(record(completion_tokens=1), None, 0.5)
    metrics.observe(record(outcome=Outcome.UPSTREAM_ERROR), None, 0.5)
    metrics.observe(record(stream=False), None, None)  # no first frame: no TTFT either
    text = metrics.render().decode()
    assert samples(text, "ollama_proxy_time_per_output_token_seconds_count") == {}
    assert sum(samples(text, "ollama_proxy_time_to_first_token_seconds_count").values()) == 2


def test_labels_never_take_any_value_a_client_sends():
    """Paths naming a model or a blob count under their prefix; the model of a request
    no backend answered, or that its backend did not know (404), is not a label."""
    assert [endpoint_label(p) for p in ("/api/chat", "/v1/models/any:thing",
                                        "/api/blobs/sha256:ab", "/nowhere")] == [
        "/api/chat", "/v1/models/*", "/api/blobs/*", "other"]
    metrics = GatewayMetrics()
    metrics.observe(record(endpoint="/v1/models/x1", model="x1", status=404), None, None)
    metrics.observe(record(model="x2", backend=None, status=403, outcome=Outcome.REFUSED),
                    "forbidden", None)
    text = metrics.render().decode()
    assert {dict(k)["model"] for k in samples(text, "ollama_proxy_requests_total")} == {""}
    assert "x1" not in text and "x2" not in text


def test_every_reason_is_a_series_from_the_start():
    """A rate() over a counter needs its series before the first event: each reason is 0."""
    text = GatewayMetrics().render().decode()
    assert samples(text, "ollama_proxy_rejections_total") == {
        (("reason", r),): 0.0 for r in REJECTION_REASONS}


def test_the_documented_reasons_and_buckets():
    assert set(REJECTION_REASONS) == {"unauthorized", "forbidden", "rate_limit", "quota",
                                      "concurrency", "queue_timeout", "queue_full",
                                      "too_large", "bad_request"}
    assert (TTFT_BUCKETS[0], TTFT_BUCKETS[-1]) == (0.005, 120.0)
