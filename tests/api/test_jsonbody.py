"""The strict request-body decoder: Go's key folding as a table, every refusal,
and properties over generated bodies (it returns exactly ``json.loads``'s value
or refuses, and refuses exactly when Go would read two keys as one)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ollama_proxy.api.jsonbody import MAX_DEPTH, decode_object, go_fold
from ollama_proxy.errors import BadRequest

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Go's unicode.caseOrbit (tables.go, Unicode 15): the simple-case-folding classes of
# more than two runes, and the runes with case mappings but no folding (alone).
GO_ORBITS = [
    [0x4B, 0x6B, 0x212A], [0x53, 0x73, 0x17F], [0xB5, 0x39C, 0x3BC], [0xC5, 0xE5, 0x212B],
    [0xDF, 0x1E9E], [0x130], [0x131], [0x1C4, 0x1C5, 0x1C6], [0x1C7, 0x1C8, 0x1C9],
    [0x1CA, 0x1CB, 0x1CC], [0x1F1, 0x1F2, 0x1F3], [0x345, 0x399, 0x3B9, 0x1FBE],
    [0x392, 0x3B2, 0x3D0], [0x395, 0x3B5, 0x3F5], [0x398, 0x3B8, 0x3D1, 0x3F4],
    [0x39A, 0x3BA, 0x3F0], [0x3A0, 0x3C0, 0x3D6], [0x3A1, 0x3C1, 0x3F1], [0x3A3, 0x3C2, 0x3C3],
    [0x3A6, 0x3C6, 0x3D5], [0x3A9, 0x3C9, 0x2126], [0x412, 0x432, 0x1C80], [0x414, 0x434, 0x1C81],
    [0x41E, 0x43E, 0x1C82], [0x421, 0x441, 0x1C83], [0x422, 0x442, 0x1C84, 0x1C85],
    [0x42A, 0x44A, 0x1C86], [0x462, 0x463, 0x1C87], [0x1C88, 0xA64A, 0xA64B],
    [0x1E60, 0x1E61, 0x1E9B],
]


def refusal(raw: bytes) -> str:
    with pytest.raises(BadRequest) as info:
        decode_object(raw)
    assert info.value.status == 400
    return info.value.message


# -- Go's fold -------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "same"), [
    ("model", "Model", True),
    ("max_tokens", "MAX_TOKENS", True),
    ("max_tokens", "max_to\u212aen\u017f", True),  # KELVIN SIGN ~ k, LONG S ~ s
    ("k", "\u212a", True),
    ("s", "\u017f", True),
    ("\u00e5", "\u212b", True),  # ANGSTROM SIGN ~ å
    ("\u00b5", "\u03bc", True),  # MICRO SIGN ~ Greek mu
    ("\u03c3", "\u03c2", True),  # sigma ~ final sigma
    ("\u0399", "\u1fbe", True),  # GREEK PROSGEGRAMMENI ~ iota
    ("\u01c4", "\u01c5", True),  # DŽ ~ Dž (titlecase)
    ("\u0432", "\u1c80", True),  # Cyrillic ve ~ rounded ve
    ("\u00df", "\u1e9e", True),  # ß ~ ẞ (a simple folding, "S")
    ("\u1f88", "\u1f80", True),  # ᾈ ~ ᾀ ("S" too)
    ("\u13a0", "\uab70", True),  # Cherokee: upper before lower
    ("\U00010400", "\U00010428", True),  # Deseret, outside the BMP
    ("\u00e9", "\u00c9", True),
    ("x\udc00", "x\ufffd", True),  # a lone surrogate escape is U+FFFD to Go
    ("\u00df", "ss", False),  # full folding only: not to Go
    ("\ufb00", "ff", False),
    ("\u0130", "i", False),  # İ and ı have case mappings but no folding
    ("\u0131", "I", False),
    ("e", "\u00e9", False),
    ("model", "model ", False),
])
def test_go_fold_table(a, b, same):
    """Keys are one to Go exactly when their folds (Go's foldName) are equal."""
    assert (go_fold(a) == go_fold(b)) is same


def test_go_fold_spells_like_go():
    """ASCII folds to upper case; other runes to the smallest rune of their class."""
    assert go_fold("max_to\u212aen\u017f") == "MAX_TOKENS"
    assert go_fold("\u03bc") == "\u00b5"
    assert go_fold("\u1e9e") == "\u00df"


@pytest.mark.parametrize("orbit", GO_ORBITS, ids=lambda o: hex(o[0]))
def test_go_case_orbits_fold_to_their_smallest_rune(orbit):
    """Every rune of each of Go's special orbits folds to the orbit's smallest rune."""
    assert {go_fold(chr(r)) for r in orbit} == {go_fold(chr(min(orbit)))}
    smallest = chr(min(orbit))
    assert go_fold(smallest) == (smallest.upper() if smallest.isascii() else smallest)


def test_fold_matches_go_simple_fold_everywhere():
    """For every rune of planes 0-1, the fold equals Go's foldRune computed as Go does:
    its caseOrbit table, else the two-rune class of the simple case mappings."""
    orbit_of = {r: orbit for orbit in GO_ORBITS for r in orbit}

    def go_fold_rune(r: int) -> str:
        if r in orbit_of:
            return chr(min(orbit_of[r]))
        char = chr(r)
        for other in (char.lower(), char.upper(), char.title()):
            if len(other) == 1 and other != char:
                return min(char, other)
        return char

    wrong = [hex(r) for r in range(0x80, 0x20000)
             if not 0xD800 <= r < 0xE000 and go_fold(chr(r)) != go_fold_rune(r)]
    assert wrong == []


def test_no_rune_above_plane_1_has_a_case():
    """The fold table scans planes 0-1 only: no rune above them folds."""
    for start in range(0x20000, 0x110000, 0x1000):
        block = "".join(map(chr, range(start, start + 0x1000)))
        assert block.casefold() == block and block.upper() == block, hex(start)


# -- decode_object ---------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}',
    b' {"a": {"b": [1, 2.5, null, true, "x"]}} \n',
    b'{"a":[{"b":1},{"B":2}]}',  # equal folds in different objects: no collision
    b'{"tools":[{"function":{"parameters":{"properties":{"Model":{},"Prompt":{}}}}}]}',
    b'{"text":"' + b"[{" * 500 + b'\\"\\\\[{"}',  # brackets inside strings do not nest
    b'{"\\u006dodel":"a"}',
    '{"content":"caf\u00e9 \U0001f600"}'.encode(),
    b'{"a":"\\udc00"}',  # a lone surrogate escape in a value: kept as json.loads keeps it
])
def test_accepted_bodies_decode_as_json_loads_does(raw):
    """A body with nothing ambiguous decodes to exactly json.loads's value."""
    assert decode_object(raw) == json.loads(raw)


@pytest.mark.parametrize(("raw", "words"), [
    (b'{"model":"llama3.2","Model":"secret"}', ['"model"', '"Model"', "one key", "case"]),
    (b'{"a":{"Options":1,"options":2}}', ['"Options"', '"options"']),
    (b'{"a":[{"b":1,"B":2}]}', ['"b"', '"B"']),
    (b'{"max_tokens":5,"max_to\\u212aen\\u017f":9}', ['"max_tokens"', "one key"]),
    (b'{"model":"a","model":"b"}', ['"model"', "twice", "last"]),
    (b'{"x":{"y":1,"y":2}}', ['"y"', "twice", "last"]),
    (b'{"a":NaN}', ["NaN"]),
    (b'{"a":-Infinity}', ["Infinity"]),
    (b'{"a":', ["invalid JSON"]),
    (b'{"a":1} {"b":2}', ["invalid JSON"]),
    (b'\xef\xbb\xbf{"a":1}', ["invalid JSON"]),  # a BOM: Go refuses it too
    (b'{"a":"\xff"}', ["UTF-8"]),
    (b'{"a":"\xed\xb0\x80"}', ["UTF-8"]),  # a surrogate encoded in UTF-8 is not UTF-8
    (b"[1, 2]", ["must be a JSON object"]),
    (b'"text"', ["must be a JSON object"]),
])
def test_refusals_say_why(raw, words):
    """Each refusal is a 400 whose message names the keys and what the backend would do."""
    message = refusal(raw)
    for word in words:
        assert word in message


def nest(depth: int, kinds: str = "[{") -> bytes:
    """An object nested ``depth`` levels, alternating arrays and objects inside."""
    opens, closes = [b'{"a":'], [b"}"]
    for level in range(1, depth):
        if kinds[level % len(kinds)] == "[":
            opens.append(b"[")
            closes.append(b"]")
        else:
            opens.append(b'{"b":')
            closes.append(b"}")
    return b"".join(opens) + b"1" + b"".join(reversed(closes))


@pytest.mark.parametrize("kinds", ["[", "{", "[{"])
def test_depth_limit_is_exact(kinds):
    """MAX_DEPTH levels decode; one more is refused."""
    assert decode_object(nest(MAX_DEPTH, kinds)) == json.loads(nest(MAX_DEPTH, kinds))
    assert "nested deeper than 64" in refusal(nest(MAX_DEPTH + 1, kinds))


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"a":' + b'{"b":' * 100_000 + b"1" + b"}" * 100_001,
    b'{"a":' + b"[" * 100_000,  # never closed
    b'{"a":' + b'["\\"",' * 100_000,  # quotes and escapes on the way down
], ids=["array", "array-in-object", "objects", "unclosed", "escapes"])
def test_deep_bodies_are_refused_without_recursing(raw):
    """100,000 levels are a 400 about depth, never a RecursionError."""
    assert "nested deeper than 64" in refusal(raw)


def test_many_shallow_containers_are_not_deep():
    """Width is not depth: a million sibling arrays decode."""
    raw = b'{"a":[' + b"[]," * 1_000_000 + b"[]]}"
    assert len(decode_object(raw)["a"]) == 1_000_001


# -- properties ------------------------------------------------------------------------

# Keys drawn from runes that fold together, to make collisions common.
KEYS = st.text(alphabet=st.sampled_from(
    list("kKsSaA\u212a\u017f\u00b5\u03bc\u039c\u00df\u1e9e\u0130\u0131iI\udc00\ufffd")), max_size=3)
SCALARS = (st.none() | st.booleans() | st.integers(-10**20, 10**20)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4))


class Obj(list):
    """A JSON object as its key/value pairs, duplicates allowed."""


def values(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=3) | st.lists(st.tuples(KEYS, children), max_size=4).map(Obj)


TREES = st.lists(st.tuples(KEYS, st.recursive(SCALARS, values, max_leaves=12)), max_size=5).map(Obj)


def to_json(value: Any, ascii_only: bool) -> str:
    if isinstance(value, Obj):
        return "{" + ",".join(json.dumps(k, ensure_ascii=ascii_only) + ":" + to_json(v, ascii_only)
                              for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def go_sees_a_collision(value: Any) -> bool:
    """Whether some object holds two keys Go's decoder reads as one."""
    if isinstance(value, Obj):
        folds = [go_fold(k) for k, _ in value]
        return len(set(folds)) < len(folds) or any(go_sees_a_collision(v) for _, v in value)
    if isinstance(value, list):
        return any(go_sees_a_collision(v) for v in value)
    return False


@PROPERTY
@given(TREES, st.booleans())
def test_decoder_agrees_with_json_loads_or_refuses_collisions(tree, ascii_only):
    """Any body: the decoder returns json.loads's value, or refuses, and it refuses
    exactly when a Go-style decoding would see two keys as one."""
    text = to_json(tree, ascii_only)
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # a lone surrogate can only be sent escaped
        text = to_json(tree, True)
        raw = text.encode()
    try:
        got = decode_object(raw)
    except BadRequest:
        assert go_sees_a_collision(tree)
    else:
        assert not go_sees_a_collision(tree)
        assert got == json.loads(text)


# String values that look like structure: brackets, quotes and backslashes, escaped.
TRICKY = st.text(alphabet=st.sampled_from(list('[]{}"\\ a')), max_size=6)
# What sits beside each level's child, with its own depth: such a string, or shallow
# containers (so that a deep nest need not be a run of openers).
SIBLINGS = TRICKY.map(lambda t: (json.dumps(t), 0)) | st.sampled_from(
    [("[]", 1), ("{}", 1), ('[[1],{"x":[]}]', 3)])


DEPTHS = st.integers(MAX_DEPTH - 4, MAX_DEPTH + 4) | st.integers(1, 100)
NESTS = DEPTHS.flatmap(lambda depth: st.lists(st.tuples(st.sampled_from("[{"), SIBLINGS),
                                              min_size=depth, max_size=depth))


@settings(PROPERTY, max_examples=100)
@given(NESTS, TRICKY)
def test_depth_is_counted_exactly_whatever_sits_beside(levels, inner):
    """Nest objects and arrays to any depth, with strings full of brackets and escapes
    or shallow containers beside each level: refused exactly when deeper than MAX_DEPTH."""
    opens, closes, depth = [], [], len(levels)
    for index, (kind, (sibling, sibling_depth)) in enumerate(levels):
        depth = max(depth, index + 1 + sibling_depth)
        if kind == "[" and index:
            opens.append("[" + sibling + ",")
            closes.append("]")
        else:  # the top level is an object
            opens.append('{"s":' + sibling + ',"a":')
            closes.append("}")
    text = "".join(opens) + json.dumps(inner) + "".join(reversed(closes))
    if depth > MAX_DEPTH:
        assert "nested deeper" in refusal(text.encode())
    else:
        assert decode_object(text.encode()) == json.loads(text)
