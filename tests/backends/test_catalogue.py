"""backends/catalogue.py: one backend's models (globs or learned, sizes, loaded set) and
the merged list replies of several backends."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ollama_proxy.api.models import canonical_model, filter_listing, name_problem
from ollama_proxy.backends.catalogue import (
    MAX_MODELS,
    Catalogue,
    ModelInfo,
    merged_openai_models,
    merged_tags,
)

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
GB = 10**9


def tags(*entries: object) -> bytes:
    return json.dumps({"models": list(entries)}).encode()


def tag(name: str, size: object = None) -> dict[str, object]:
    """An /api/tags entry as Ollama (and the simulator) writes it."""
    entry: dict[str, object] = {"name": name, "model": name, "digest": "ab" * 32}
    if size is not None:
        entry["size"] = size
    return entry


def openai(*ids: str, **extra: object) -> bytes:
    return json.dumps({"object": "list", "data": [{"id": i, "object": "model"} for i in ids],
                       **extra}).encode()


def ollama(globs: tuple[str, ...] | None = None, cap: int | None = None) -> Catalogue:
    return Catalogue(kind="ollama", globs=globs, max_model_bytes=cap)


def learned(body: bytes, cap: int | None = None) -> Catalogue:
    cat = ollama(cap=cap)
    cat.learn_tags(body, 1.0)
    return cat


# -- learning -----------------------------------------------------------------------------


SIM_TAGS = tags(
    {"name": "llama3.2:latest", "model": "llama3.2:latest", "modified_at": "2026-08-01T09:50:12Z",
     "size": 2_019_393_189, "digest": "a80c", "details": {"family": "llama"},
     "capabilities": ["completion", "tools"]},
    {"name": "qwen3:4b", "model": "qwen3:4b", "size": 2_497_293_918},
)


@pytest.mark.parametrize(("body", "expected"), [
    (SIM_TAGS, {"llama3.2:latest": ModelInfo("llama3.2:latest", 2_019_393_189),
                "qwen3:4b": ModelInfo("qwen3:4b", 2_497_293_918)}),
    (tags(), {}),
    (b'{"models":null}', {}),  # Go's nil slice
    (tags({"model": "only-model:1b", "size": 5}), {"only-model:1b": ModelInfo("only-model:1b", 5)}),
    (tags({"name": 7, "model": "m"}), {"m:latest": ModelInfo("m", None)}),
    (tags("x", 3, None, [], {}, {"name": ""}, {"name": "  "}, {"name": "a\nb"},
          {"name": "x" * 2000}, tag("kept")), {"kept:latest": ModelInfo("kept", None)}),
    (tags(tag("Llama3.2", 1), tag("llama3.2:latest", 2), tag("registry.ollama.ai/library/llama3.2", 3)),
     {"llama3.2:latest": ModelInfo("Llama3.2", 1)}),  # first spelling wins
    (tags(tag("a", True), tag("b", -1), tag("c", 1.5), tag("d", "9"), tag("e", 0)),
     {"a:latest": ModelInfo("a", None), "b:latest": ModelInfo("b", None),
      "c:latest": ModelInfo("c", None), "d:latest": ModelInfo("d", None),
      "e:latest": ModelInfo("e", 0)}),
])
def test_learn_tags(body, expected):
    """/api/tags: entries by canonical name with their sizes; nameless entries skipped,
    bad sizes unknown, the first spelling of a model kept."""
    cat = ollama()
    cat.learn_tags(body, 42.0)
    assert cat.learned == expected
    assert cat.learned_at == 42.0


@pytest.mark.parametrize(("body", "expected"), [
    (openai("meta-llama/Llama-3.1-8B-Instruct"),
     {"meta-llama/llama-3.1-8b-instruct:latest": ModelInfo("meta-llama/Llama-3.1-8B-Instruct", None)}),
    # llama-server: a "models" key beside "data"; only "data" is read
    (openai("gemma", models=[{"name": "other", "model": "other"}]),
     {"gemma:latest": ModelInfo("gemma", None)}),
    (b'{"object":"list","data":null}\n', {}),  # Ollama's /v1/models with no model
    (json.dumps({"data": [{"id": "m", "size": 5}, {"name": "no-id"}]}).encode(),
     {"m:latest": ModelInfo("m", None)}),  # openai lists carry no size
])
def test_learn_openai(body, expected):
    """/v1/models: ids by canonical name, sizes unknown."""
    cat = Catalogue(kind="openai", globs=None, max_model_bytes=None)
    cat.learn_openai(body, 3.0)
    assert cat.learned == expected
    assert cat.learned_at == 3.0


@pytest.mark.parametrize(("body", "loaded"), [
    (tags(tag("llama3.2:latest", 5)), {"llama3.2:latest"}),
    (tags({"model": "Qwen3:4B"}), {"qwen3:4b"}),
    (tags({"name": "a"}, {"model": "b"}, {"size": 1}), {"a:latest", "b:latest"}),
    (tags(), set()),
    (b'{"models":null}', set()),
])
def test_learn_ps(body, loaded):
    """/api/ps: the loaded set, named by "name" or "model"."""
    cat = ollama()
    cat.learn_ps(body)
    assert cat.loaded == loaded
    assert cat.learned_at is None  # the loaded set is not the list


BAD_BODIES = [
    b"", b"not json", b"\xff\xfe", b"[]", b"null", b'"models"', b"{}", b'{"models":{}}',
    b'{"models":"llama3.2"}', b'{"data":[{"id":"m"}]}', b"[" * 100_000, b'{"models":[' * 5000,
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_a_bad_tags_body_keeps_the_old_list(body):
    """A reply that is no model list raises ValueError; the list and its time stay."""
    cat = learned(tags(tag("old", 1)))
    with pytest.raises(ValueError, match="not a model list"):
        cat.learn_tags(body, 2.0)
    assert cat.learned == {"old:latest": ModelInfo("old", 1)}
    assert cat.learned_at == 1.0


@pytest.mark.parametrize("body", [*BAD_BODIES[:-4], b'{"data":{}}', b'{"models":[{"name":"m"}]}'])
def test_a_bad_openai_body_keeps_the_old_list(body):
    """The same for /v1/models."""
    cat = Catalogue(kind="openai", globs=None, max_model_bytes=None)
    cat.learn_openai(openai("old"), 1.0)
    with pytest.raises(ValueError, match="not a model list"):
        cat.learn_openai(body, 2.0)
    assert set(cat.learned) == {"old:latest"}
    assert cat.learned_at == 1.0


@pytest.mark.parametrize("body", BAD_BODIES)
def test_a_bad_ps_body_keeps_the_loaded_set(body):
    """The same for /api/ps."""
    cat = ollama()
    cat.learn_ps(tags(tag("warm")))
    with pytest.raises(ValueError, match="not a model list"):
        cat.learn_ps(body)
    assert cat.loaded == {"warm:latest"}


def test_the_learned_list_is_bounded():
    """MAX_MODELS distinct models are learned; one more refuses the reply, old list kept."""
    cat = learned(tags(*(tag(f"m{i}") for i in range(MAX_MODELS))))
    assert len(cat.learned) == MAX_MODELS
    with pytest.raises(ValueError, match=f"more than {MAX_MODELS}"):
        cat.learn_tags(tags(*(tag(f"n{i}") for i in range(MAX_MODELS + 1))), 2.0)
    assert "m0:latest" in cat.learned and "n0:latest" not in cat.learned
    with pytest.raises(ValueError, match=f"more than {MAX_MODELS}"):
        cat.learn_ps(tags(*(tag(f"n{i}") for i in range(MAX_MODELS + 1))))
    # duplicates do not count towards the bound
    cat.learn_tags(tags(*(tag("same") for _ in range(MAX_MODELS + 5))), 3.0)
    assert list(cat.learned) == ["same:latest"]


# -- serving ------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "ok"), [
    ("llama3.2", True),
    ("llama3.2:latest", True),
    ("LLAMA3.2:Latest", True),
    ("registry.ollama.ai/library/llama3.2:latest", True),
    ("qwen3:4b", True),
    ("qwen3", False),  # qwen3:latest is another model
    ("llama3.2:1b", False),
    ("mistral", False),
])
def test_serves_the_learned_list_by_canonical_name(model, ok):
    """Without globs the learned list decides; names compare as Ollama compares them."""
    assert learned(SIM_TAGS).serves(model) is ok


def test_serves_nothing_before_learning():
    """A backend without globs that has listed nothing serves nothing."""
    assert not ollama().serves("llama3.2")
    assert ollama().models() == []


@pytest.mark.parametrize(("globs", "model", "ok"), [
    (("llama*",), "llama3.2:1b", True),
    (("llama*",), "qwen3:4b", False),
    (("llama3.2",), "llama3.2:latest", True),
    (("qwen3:*", "mistral"), "Mistral", True),
    ((), "anything-listed", True),  # empty globs: learned
    ((), "not-listed", False),
])
def test_configured_globs_decide_over_the_list(globs, model, ok):
    """Configured globs say what the backend serves, listed or not."""
    cat = ollama(globs)
    cat.learn_tags(tags(tag("anything-listed"), tag("qwen3:4b")), 1.0)
    assert cat.serves(model) is ok


@pytest.mark.parametrize(("cap", "model", "ok", "over"), [
    (None, "big", True, False),  # no cap
    (3 * GB, "big", False, True),  # known, too big
    (5 * GB, "big", True, False),  # exactly the cap fits
    (4 * GB, "small", True, False),
    (1, "unsized", True, False),  # unknown size fits
    (1, "Big:latest", False, True),  # the size is found by canonical name
    (0, "zero", True, False),
])
def test_max_model_bytes(cap, model, ok, over):
    """A model fits when its size is unknown or at most max_model_bytes."""
    cat = learned(tags(tag("big", 5 * GB), tag("small", GB), tag("unsized"), tag("zero", 0)), cap)
    assert cat.serves(model) is ok
    assert cat.knows_size_over_cap(model) is over


def test_globs_and_the_cap_together():
    """With globs the learned sizes still apply; an unlisted model matching a glob fits."""
    cat = ollama(("*",), cap=GB)
    cat.learn_tags(tags(tag("big", 2 * GB)), 1.0)
    assert not cat.serves("big")
    assert cat.serves("unlisted")
    assert cat.size("big") == 2 * GB and cat.size("unlisted") is None


def test_warm_is_the_loaded_set_for_ollama():
    """An Ollama backend is warm for what /api/ps lists, by canonical name."""
    cat = ollama()
    assert not cat.warm("llama3.2")
    cat.learn_ps(tags(tag("llama3.2:latest")))
    assert cat.warm("llama3.2") and cat.warm("LLAMA3.2:latest")
    assert not cat.warm("qwen3:4b")
    cat.learn_ps(b'{"models":[]}')
    assert not cat.warm("llama3.2")


def test_warm_is_always_true_for_openai():
    """An OpenAI-compatible server does not say what is loaded: always warm."""
    cat = Catalogue(kind="openai", globs=None, max_model_bytes=None)
    assert cat.warm("anything")


def test_models_lists_what_is_served_in_order():
    """models(): the learned names as spelled, in the backend's order, minus what the
    globs or the cap exclude."""
    cat = ollama(("q*", "llama*"), cap=3 * GB)
    cat.learn_tags(tags(tag("qwen3:4b", GB), tag("Llama3.2", GB), tag("mistral"), tag("qwq", 9 * GB)), 1.0)
    assert cat.models() == ["qwen3:4b", "Llama3.2"]


def test_an_unknown_kind_is_refused():
    """kind is "ollama" or "openai"; anything else is a programming error."""
    with pytest.raises(ValueError, match="kind"):
        Catalogue(kind="vllm", globs=None, max_model_bytes=None)


# -- merging ------------------------------------------------------------------------------


def test_merged_tags_dedupes_by_canonical_name_first_wins():
    """One entry per model, the first backend's entry kept as written, in first-seen order."""
    a = tags(tag("llama3.2:latest", 1), tag("qwen3:4b", 2))
    b = tags(tag("LLAMA3.2", 99), tag("mistral:7b", 3), tag("qwen3:4b", 98))
    merged = json.loads(merged_tags([a, b]))
    assert merged == {"models": [tag("llama3.2:latest", 1), tag("qwen3:4b", 2), tag("mistral:7b", 3)]}


def test_merged_tags_skips_what_does_not_parse():
    """A body that is no list is skipped; nameless entries too; null lists are empty."""
    merged = json.loads(merged_tags([b"oops", b'{"models":null}', tags(3, {"size": 1}, tag("m")),
                                     b'{"error":"down"}']))
    assert merged == {"models": [tag("m")]}


def test_merged_ps_reads_name_or_model():
    """/api/ps entries are named by "name" or "model"; the shape stays {"models": [...]}."""
    a = tags({"model": "a:1", "size_vram": 5})
    b = tags({"name": "A:1"}, {"name": "b"})
    assert json.loads(merged_tags([a, b])) == {"models": [{"model": "a:1", "size_vram": 5}, {"name": "b"}]}


def test_merged_openai_models_dedupes_by_id():
    """/v1/models: one entry per id (canonically), llama-server's "models" key dropped."""
    a = openai("llama3.2:latest", "gpt-oss:20b", models=[{"name": "x"}])
    b = b'{"object":"list","data":null}'
    c = openai("llama3.2", "Mistral")
    assert json.loads(merged_openai_models([a, b, c])) == {
        "object": "list",
        "data": [{"id": "llama3.2:latest", "object": "model"}, {"id": "gpt-oss:20b", "object": "model"},
                 {"id": "Mistral", "object": "model"}],
    }


@pytest.mark.parametrize("merge", [merged_tags, merged_openai_models])
def test_a_merge_of_nothing_parseable_raises(merge):
    """ValueError only when no body parses (none at all counts)."""
    with pytest.raises(ValueError, match="no model list parsed"):
        merge([b"", b"[]", b'{"error":"x"}', b"[" * 100_000])
    with pytest.raises(ValueError, match="no model list parsed"):
        merge([])


def test_merges_are_compact_and_keep_unicode():
    """Compact separators, non-ASCII kept as UTF-8; a lone surrogate falls back to escapes."""
    assert merged_tags([tags(tag("modèle"))]).startswith('{"models":[{"name":"modèle"'.encode())
    body = b'{"models":[{"name":"m","note":"\\udc00 \xc3\xa8"}]}'
    out = merged_tags([body])
    assert b"\\udc00" in out and b"\\u00e8" in out
    assert json.loads(out) == json.loads(body)


def test_merged_bytes_feed_filter_listing():
    """The merged replies keep the shapes filter_listing reads."""
    tags_body = merged_tags([tags(tag("llama3.2"), tag("qwen3:4b"))])
    assert json.loads(filter_listing(("qwen*",), tags_body)) == {"models": [tag("qwen3:4b")]}
    v1_body = merged_openai_models([openai("llama3.2", "qwen3:4b")])
    assert [m["id"] for m in json.loads(filter_listing(("llama*",), v1_body))["data"]] == ["llama3.2"]


# -- arbitrary input ----------------------------------------------------------------------

KEYS = st.sampled_from(["models", "data", "name", "model", "id", "size", "x"]) | st.text(max_size=4)
NAMES = st.sampled_from(["llama3.2", "LLAMA3.2:latest", "qwen3:4b", "", " ", "a\x00", "m"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | NAMES | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=30,
)


@PROPERTY
@given(JSON)
def test_learning_arbitrary_json_succeeds_or_raises_value_error(doc):
    """Any JSON either teaches a list of well-formed entries or raises ValueError,
    leaving what was known."""
    body = json.dumps(doc).encode()
    learners = (("ollama", lambda c: c.learn_tags(body, 2.0)),
                ("openai", lambda c: c.learn_openai(body, 2.0)),
                ("ollama", lambda c: c.learn_ps(body)))
    for kind, learn in learners:
        cat = Catalogue(kind=kind, globs=None, max_model_bytes=GB)
        cat.learn_tags(tags(tag("old", 1)), 1.0)
        cat.learn_ps(tags(tag("old")))
        before = (dict(cat.learned), cat.loaded, cat.learned_at)
        try:
            learn(cat)
        except ValueError:
            assert (cat.learned, cat.loaded, cat.learned_at) == before
            continue
        for key, info in cat.learned.items():
            assert isinstance(info.name, str) and info.name.strip()
            assert info.size is None or (type(info.size) is int and info.size >= 0)
            assert cat.serves(info.name) is (info.size is None or info.size <= GB), key
        assert all(isinstance(name, str) for name in cat.loaded)


def usable(name: object) -> bool:
    return isinstance(name, str) and bool(name.strip()) and name_problem(name) is None


@PROPERTY
@given(st.lists(JSON.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=20), max_size=4))
def test_merging_arbitrary_bodies_succeeds_or_raises_value_error(bodies):
    """Any bodies merge into a list reply of unique names, or raise ValueError."""
    for merge, key, field in ((merged_tags, "models", "name"),
                              (merged_openai_models, "data", "id")):
        try:
            out = merge(bodies)
        except ValueError:
            continue
        entries = json.loads(out)[key]
        assert isinstance(entries, list) and all(isinstance(e, dict) for e in entries)
        names = [next(e[f] for f in (field, "model") if usable(e.get(f))) for e in entries]
        assert len({canonical_model(n) for n in names}) == len(names)


def test_a_merge_shows_of_each_backend_only_what_it_is_sent():
    """``keep[i]`` (backend i's globs and size cap) filters body i; a model one backend
    may not serve is shown when another may."""
    a = json.dumps({"models": [{"name": "llama3.2:latest"}, {"name": "big:70b"}]}).encode()
    b = json.dumps({"models": [{"name": "big:70b"}, {"name": "qwen3:4b"}]}).encode()
    small = Catalogue(kind="ollama", globs=("llama*",), max_model_bytes=None)
    anything = Catalogue(kind="ollama", globs=("*",), max_model_bytes=None)
    names = [m["name"] for m in json.loads(merged_tags([a, b], [small.serves, anything.serves]))
             ["models"]]
    assert names == ["llama3.2:latest", "big:70b", "qwen3:4b"]
    only_small = [m["name"] for m in json.loads(merged_tags([a], [small.serves]))["models"]]
    assert only_small == ["llama3.2:latest"]
    openai = json.dumps({"data": [{"id": "qwen-a"}, {"id": "llama-b"}]}).encode()
    kept = json.loads(merged_openai_models([openai], [small.serves]))["data"]
    assert [m["id"] for m in kept] == ["llama-b"]
