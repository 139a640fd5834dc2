"""Strict decoding of JSON request bodies, sans-IO: the gateway reads a body
the way the backend will, or refuses it.

Ollama decodes with Go's ``encoding/json``, which matches object keys to
struct fields case-insensitively (under Unicode simple case folding, so
U+212A KELVIN SIGN is a "k") and lets the last of equal keys win. Python's
``json`` is case-sensitive, so ``{"model": "a", "Model": "b"}`` would be
model "a" to the gateway (its limits, its model rules) and "b" to Ollama.
A body with two keys Go would read as one, in any object, is refused; so is
one nested deeper than ``MAX_DEPTH`` (Python's decoder recurses), one that is
not UTF-8 (Go would read U+FFFD where we read something else) and one with
the non-JSON constants ``NaN``/``Infinity`` (Go refuses them).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Callable

from ..errors import BadRequest

# No API needs deeper bodies (a tool's JSON schema is a few levels); Python's
# decoder recurses once a level, so depth is checked before decoding.
MAX_DEPTH = 64

# Depth is read off the structural bytes only: everything but quotes and brackets
# deleted, "{}" mapped to "[]". Multi-byte UTF-8 never contains ASCII bytes.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_SQUARE = bytes.maketrans(b"{}", b"[]")
_STRING = re.compile(rb'"[^"]*"')  # a string of the reduced text (only brackets inside)
_TOO_MANY_OPEN = b"[" * (MAX_DEPTH + 1)
# Above this size, brackets are first counted with memchr: large bodies are images
# (base64 strings), and translating them would cost more than their few brackets.
_LARGE = 64 * 1024

# Unicode simple case folding's "S" entries (CaseFolding.txt): the only simple
# foldings that differ from the full ones ``str.casefold`` gives; every other
# character with a multi-character full folding has no simple one.
_SIMPLE_ONLY = {0x1E9E: 0xDF, 0x1FBC: 0x1FB3, 0x1FCC: 0x1FC3, 0x1FFC: 0x1FF3}
_SIMPLE_ONLY.update({upper: upper - 8 for base in (0x1F88, 0x1F98, 0x1FA8)
                     for upper in range(base, base + 8)})
# Cased characters all lie below this (planes 0 and 1); tests check it.
_CASED_END = 0x20000
_SURROGATES = range(0xD800, 0xE000)


@functools.cache
def _fold_table() -> dict[int, int]:
    """Go's ``foldRune`` for every character it changes: the smallest member
    of the character's class under simple case folding (CaseFolding C + S).
    A lone surrogate (a ``"\\udc00"`` escape) is U+FFFD to Go's decoder.
    Built on first use (~20 ms): only keys that are not ASCII need it."""
    classes: dict[str, set[str]] = {}
    every = "".join(map(chr, range(_CASED_END)))
    for start in range(0, _CASED_END, 256):
        block = every[start:start + 256]
        if block.casefold() == block:
            continue
        for char, full in zip(block, map(str.casefold, block)):
            if full == char:
                continue
            simple = chr(_SIMPLE_ONLY.get(ord(char), ord(full) if len(full) == 1 else ord(char)))
            if simple != char:
                classes.setdefault(simple, {simple}).add(char)
    table = dict.fromkeys(_SURROGATES, 0xFFFD)
    for members in classes.values():
        smallest = min(members)
        table.update((ord(m), ord(smallest)) for m in members if m != smallest)
    return table


def go_fold(key: str) -> str:
    """``key`` as Go's ``encoding/json`` compares it with field names (its
    ``foldName``): two keys name the same field when their folds are equal."""
    if key.isascii():
        return key.upper()
    return key.translate(_fold_table())


def quoted(key: str, limit: int = 60) -> str:
    """A key for an error message: JSON-quoted, long ones cut."""
    return json.dumps(key if len(key) <= limit else key[:limit] + "…")


def decode_object(raw: bytes | bytearray) -> dict[str, Any]:
    """The JSON object in ``raw``, exactly as ``json.loads`` reads it, or a
    ``BadRequest`` saying why the backend could read it differently."""
    if _too_deep(raw):
        raise BadRequest(f"request body is nested deeper than {MAX_DEPTH} levels")
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    objects: list[dict[str, Any]] = []
    try:
        value = json.loads(text, object_pairs_hook=_collector(objects.append),
                           parse_constant=_no_constant)
    except ValueError as exc:
        raise BadRequest(f"invalid JSON in request body: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    _check_folds(objects)
    return value


Pairs = list[tuple[str, Any]]


def _collector(keep: Callable[[dict[str, Any]], None]) -> Callable[[Pairs], dict[str, Any]]:
    """The decoder's object hook: builds each object, refuses a key spelled twice,
    and hands objects of two keys or more to ``keep`` for the fold check."""
    def make_object(pairs: Pairs) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            _refuse_duplicate(pairs)
        if len(obj) > 1:
            keep(obj)
        return obj
    return make_object


def _refuse_duplicate(pairs: Pairs) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise BadRequest(f"key {quoted(key)} appears twice in one object of the request body; "
                             "the backend would take the last one: send it once")
        seen.add(key)


def _check_folds(objects: list[dict[str, Any]]) -> None:
    """Refuse an object with two keys Go reads as one. All the body's keys are
    folded once (a body has few distinct keys); objects are searched only
    when two of those keys fold alike somewhere."""
    keys = set().union(*objects)
    if len({go_fold(k) for k in keys}) == len(keys):
        return
    for obj in objects:
        folds: dict[str, str] = {}
        for key in obj:
            other = folds.setdefault(go_fold(key), key)
            if other != key:
                raise BadRequest(
                    f"keys {quoted(other)} and {quoted(key)} in one object of the request body "
                    "are one key to the backend (it matches keys case-insensitively): send one")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _too_deep(raw: bytes | bytearray) -> bool:
    """Whether ``raw`` nests containers deeper than ``MAX_DEPTH`` (valid JSON:
    exactly; invalid JSON: enough to keep the decoder's recursion bounded).
    C-speed byte operations only, so honest bodies of any size stay cheap."""
    if len(raw) > _LARGE and _openers(raw) <= MAX_DEPTH:
        return False
    if b"\\" in raw:  # escaped quotes and backslashes, paired left to right as JSON does
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    text = raw.translate(_SQUARE, _NOT_STRUCTURE)
    if text.count(b"[") <= MAX_DEPTH:  # brackets in strings included: a bound
        return False
    # Two adjacent quotes are an empty string or the end of one and the start of the
    # next, with no bracket between: deleting them changes no bracket's standing.
    text = text.replace(b'""', b"")
    if b'"' in text:
        text = _STRING.sub(b"", text)
    if _TOO_MANY_OPEN in text:  # that many openers in a row nest in each other
        return True
    # Each pass deletes the innermost pairs, one level of every nest.
    for _ in range(MAX_DEPTH):
        shorter = text.replace(b"[]", b"")
        if len(shorter) == len(text):
            break
        text = shorter
    # Left: pairs nested deeper than MAX_DEPTH, or unmatched brackets (invalid JSON,
    # which the decoder refuses, after at most MAX_DEPTH levels plus those left open).
    return b"[]" in text or text.count(b"[") > MAX_DEPTH


def _openers(raw: bytes | bytearray) -> int:
    """How many "[" and "{" bytes ``raw`` holds, counting no further than MAX_DEPTH + 1
    (memchr skips the long strings a large body is made of)."""
    count = 0
    for char in (b"[", b"{"):
        pos = raw.find(char)
        while pos >= 0 and count <= MAX_DEPTH:
            count += 1
            pos = raw.find(char, pos + 1)
    return count
