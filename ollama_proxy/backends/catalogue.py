"""What one backend serves, sans-IO: its configured globs or the list learned from
its ``/api/tags`` (Ollama) or ``/v1/models`` (OpenAI-compatible servers), the sizes
that list gives, and the models ``/api/ps`` says are loaded. Also the pure merges of
several backends' list replies into one, for the gateway's own list endpoints.

Names are compared as ``api.models`` compares them (``llama3.2`` is
``llama3.2:latest``; case and the default registry do not count). The trio shell
(``registry``) fetches the bodies and logs the ``ValueError`` a bad one raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..api.models import canonical_model, dump_json, model_allowed, name_problem

# A hostile or broken backend could list millions of models; the list is kept for the
# life of the process and scanned for the admin page, so it is bounded. Ollama's
# library holds a few hundred models and vLLM/llama-server serve one or a few: a reply
# naming more distinct models than this is refused as a bad body (the old list stays).
# The body itself is bounded by the shell's read limit before it gets here.
MAX_MODELS = 10_000

KINDS = ("ollama", "openai")

# Where a list reply keeps its entries and which fields name the model in them.
_TAGS = ("models", ("name", "model"))  # /api/tags and /api/ps
_OPENAI = ("data", ("id",))  # /v1/models (llama-server's extra "models" key is ignored)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model a backend listed."""

    name: str  # as the backend spells it
    size: int | None  # bytes, from /api/tags "size"; None when unknown (openai lists)


class Catalogue:
    """One backend's models: configured globs or the learned list, sizes, loaded set.

    ``globs`` None or empty: the backend serves what it lists (learned). Learning
    replaces the whole list at once, so a bad reply leaves the old one in place.
    """

    def __init__(self, *, kind: str, globs: tuple[str, ...] | None,
                 max_model_bytes: int | None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown backend kind {kind!r}")
        self.kind = kind
        # An empty [upstream] models value means "learned", never "serves nothing".
        self.globs = globs or None
        self.max_model_bytes = max_model_bytes
        self.learned: dict[str, ModelInfo] = {}  # canonical_model(name) -> info
        self.loaded: frozenset[str] = frozenset()  # canonical names from /api/ps
        self.learned_at: float | None = None  # now of the last successful learn

    def __repr__(self) -> str:
        return (f"Catalogue(kind={self.kind!r}, globs={self.globs!r}, "
                f"learned={len(self.learned)}, loaded={len(self.loaded)})")

    def learn_tags(self, body: bytes, now: float) -> None:
        """Take an Ollama ``/api/tags`` reply as the list; ValueError on a bad body."""
        self.learned = _learn(body, *_TAGS, sized=True)
        self.learned_at = now

    def learn_openai(self, body: bytes, now: float) -> None:
        """Take a ``/v1/models`` reply (``{"data": [{"id": ...}]}``) as the list; the
        list says nothing of sizes. ValueError on a bad body."""
        self.learned = _learn(body, *_OPENAI, sized=False)
        self.learned_at = now

    def learn_ps(self, body: bytes) -> None:
        """Take an ``/api/ps`` reply as the loaded set; ValueError on a bad body."""
        self.loaded = frozenset(_learn(body, *_TAGS, sized=False))

    def size(self, model: str) -> int | None:
        """The model's size in bytes as listed; None when not listed or not given."""
        info = self.learned.get(canonical_model(model))
        return None if info is None else info.size

    def knows_size_over_cap(self, model: str) -> bool:
        """Whether the model is known to be larger than ``max_model_bytes`` (for the
        message that says why no backend serves it)."""
        size = self.size(model)
        return self.max_model_bytes is not None and size is not None and size > self.max_model_bytes

    def serves(self, model: str) -> bool:
        """Whether requests for ``model`` may go here: the globs allow it (or, without
        globs, the learned list has it), and it fits the size cap. An unknown size fits:
        refusing it would make every openai backend refuse every model."""
        if self.globs is not None:
            listed = model_allowed(self.globs, model)
        else:
            listed = canonical_model(model) in self.learned
        return listed and not self.knows_size_over_cap(model)

    def warm(self, model: str) -> bool:
        """Whether the model is loaded now. An OpenAI-compatible server does not say,
        and serves what it lists without loading: always warm."""
        return self.kind == "openai" or canonical_model(model) in self.loaded

    def models(self) -> list[str]:
        """The learned models this backend serves, as it spells them, in its order
        (for the admin page; configured globs alone give no names)."""
        return [info.name for info in self.learned.values() if self.serves(info.name)]


Keep = Callable[[str], bool]  # which of one backend's models its list may show


def merged_tags(bodies: Sequence[bytes], keep: Sequence[Keep] = ()) -> bytes:
    """One ``/api/tags`` (or ``/api/ps``: the same shape) reply from several backends'
    replies, each showing only what ``keep[i]`` allows of body i (see ``_merged``)."""
    return dump_json({"models": _merged(bodies, keep, *_TAGS)})


def merged_openai_models(bodies: Sequence[bytes], keep: Sequence[Keep] = ()) -> bytes:
    """One ``/v1/models`` reply from several backends' replies (see ``_merged``)."""
    return dump_json({"object": "list", "data": _merged(bodies, keep, *_OPENAI)})


def _merged(bodies: Sequence[bytes], keep: Sequence[Keep], key: str,
            fields: tuple[str, ...]) -> list[Any]:
    """The union of the bodies' entries: one per canonical name, the first seen wins
    and keeps its place, each entry as its backend wrote it; of body i only the models
    ``keep[i]`` allows (its backend's globs and size cap: what it is sent). A body that
    does not parse is skipped (its backend is down or broken; the others still answer);
    ValueError only when none parses, so the caller can answer with an error."""
    seen: set[str] = set()
    merged: list[Any] = []
    parsed = 0
    for i, body in enumerate(bodies):
        try:
            entries = _entries(body, key)
        except ValueError:
            continue
        parsed += 1
        if i < len(keep):
            allowed = keep[i]
            entries = [e for e in entries
                       if (name := _entry_name(e, fields)) is not None and allowed(name)]
        merged.extend(entry for _, _, entry in _named(entries, fields, seen))
    if not parsed:
        raise ValueError(f"no model list parsed (of {len(bodies)})")
    return merged


def _entries(body: bytes, key: str) -> list[Any]:
    """The list under ``key`` in a JSON object body (Go's null list is empty)."""
    try:
        doc = json.loads(body)
    except RecursionError as err:  # not a ValueError, and no real list nests so deep
        raise ValueError("not a model list: JSON nested too deeply") from err
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"not a model list: {err}") from err
    if not isinstance(doc, dict):
        raise ValueError("not a model list: not a JSON object")
    entries = doc.get(key, False)  # absent: not a list reply at all
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"not a model list: no {key!r} list")
    return entries


def _named(entries: Iterable[Any], fields: tuple[str, ...],
           seen: set[str]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(canonical, name, entry)`` of entries with a usable name not in ``seen``
    (added to it): a later spelling of the same model is a duplicate."""
    for entry in entries:
        name = _entry_name(entry, fields)
        if name is None:
            continue
        key = canonical_model(name)
        if key not in seen:
            seen.add(key)
            yield key, name, entry


def _entry_name(entry: Any, fields: tuple[str, ...]) -> str | None:
    """The first field that holds a name a model could have (blank, control
    characters, overlong: not one)."""
    if not isinstance(entry, dict):
        return None
    for field in fields:
        name = entry.get(field)
        if isinstance(name, str) and name.strip() and name_problem(name) is None:
            return name
    return None


def _learn(body: bytes, key: str, fields: tuple[str, ...], *,
           sized: bool) -> dict[str, ModelInfo]:
    """The models a list reply names, by canonical name (the first spelling wins)."""
    learned: dict[str, ModelInfo] = {}
    for canonical, name, entry in _named(_entries(body, key), fields, set()):
        if len(learned) == MAX_MODELS:
            raise ValueError(f"lists more than {MAX_MODELS} models")
        learned[canonical] = ModelInfo(name, _size(entry.get("size")) if sized else None)
    return learned


def _size(value: Any) -> int | None:
    """A size in bytes, or None: JSON true is an int to Python, and a negative or
    fractional size is no size."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


