"""Model names as Ollama reads them, sans-IO: one canonical spelling, glob
matching for ``allowed_models`` (and, soon, backends' model lists), the
``[aliases]`` names, and the model-list replies filtered and given the aliases.
Shared by access and backends, so it lives here."""

from __future__ import annotations

import copy
import functools
import json
import re
from fnmatch import fnmatchcase
from typing import Any, Iterable

_REGISTRY_PREFIX = "registry.ollama.ai/library/"
# A model name reaches logs, the ledger and glob matching. Ollama's longest valid
# name is 350 (host) + 3 x 80 (namespace, model, tag) + separators + a digest, under
# 700 characters; Hugging Face ids are under 200: no real name comes near this.
MAX_MODEL_CHARS = 1024
# Control characters and lone surrogates (from "\udc00" escapes: Go reads U+FFFD).
_BAD_MODEL_TEXT = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def name_problem(name: str) -> str | None:
    """Why no model can be called ``name`` (None: it could be one)."""
    if len(name) > MAX_MODEL_CHARS:
        return f"is longer than {MAX_MODEL_CHARS} characters"
    if _BAD_MODEL_TEXT.search(name):
        return "holds a control character or a lone surrogate (\\ud800-\\udfff)"
    return None


@functools.lru_cache(maxsize=4096)  # per request, several times: the same few names
def _model_names(model: str) -> tuple[str, ...]:
    """The spellings a model name matches a glob under: ``name:tag`` always,
    plus the bare ``name`` when the tag is ``latest``."""
    name = model.strip().lower()
    if name.startswith(_REGISTRY_PREFIX):
        name = name[len(_REGISTRY_PREFIX):]
    base, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:  # no tag ("host:port/x" has a '/' after the colon)
        return (name + ":latest", name)
    if tag == "latest":
        return (name, base)
    return (name,)


def canonical_model(model: str) -> str:
    """One spelling per model: lower case, ``name:tag``, no default registry."""
    return _model_names(model)[0]


def _normal_glob(glob: str) -> str:
    g = glob.strip().lower()
    return g[len(_REGISTRY_PREFIX):] if g.startswith(_REGISTRY_PREFIX) else g


def model_allowed(globs: Iterable[str] | None, model: str) -> bool:
    """Whether ``model`` matches one of ``globs`` (``None``: every model).

    Case-insensitive; ``registry.ollama.ai/library/`` is stripped; ``llama3.2``
    and ``llama3.2:latest`` are the same model for both globs and names.
    """
    if globs is None:
        return True
    names = _model_names(model)
    return any(fnmatchcase(n, _normal_glob(g)) for g in globs for n in names)


class Aliases:
    """The ``[aliases]`` section: ``NAME = TARGET`` pairs, NAME compared canonically
    (``gpt`` is ``gpt:latest``). A request for NAME goes to TARGET, spelled as configured.
    Immutable: a reload replaces the whole value, so a request sees one version."""

    __slots__ = ("pairs", "_targets")

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self.pairs = tuple(pairs)
        self._targets = {canonical_model(name): target for name, target in self.pairs}

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Aliases) and self.pairs == other.pairs

    def __hash__(self) -> int:
        return hash(self.pairs)

    def __repr__(self) -> str:
        return f"Aliases({self.pairs!r})"

    def target(self, model: str) -> str | None:
        """The model ``model`` stands for, if it is an alias."""
        return self._targets.get(canonical_model(model))


NO_ALIASES = Aliases()


def alias_visible(globs: Iterable[str] | None, alias: str, target: str) -> bool:
    """Whether a user with ``globs`` may use ``alias``: its target is allowed, or the
    alias's own name is (the admin who named it chose who may use it by that name)."""
    return model_allowed(globs, target) or model_allowed(globs, alias)


# A model list reply: where its entries are, and which of their fields name the model.
_LISTS = (("models", ("name", "model")), ("data", ("id",)))  # /api/tags, /api/ps; /v1/models


def _entry_name(entry: Any, name_fields: tuple[str, ...]) -> str | None:
    if not isinstance(entry, dict):
        return None
    return next((entry[f] for f in name_fields if isinstance(entry.get(f), str)), None)


def _with_aliases(entries: list[Any], name_fields: tuple[str, ...],
                  aliases: Aliases) -> list[tuple[Any, str | None, str | None]]:
    """``(entry, name, target)`` of each entry, then a copy of a target's entry named
    after each of its aliases (``target`` set); a model an alias shadows is left out."""
    by_name: dict[str, Any] = {}
    out: list[tuple[Any, str | None, str | None]] = []
    for entry in entries:
        name = _entry_name(entry, name_fields)
        if name is not None:
            if aliases.target(name) is not None:
                continue  # the name means the alias's target now
            by_name.setdefault(canonical_model(name), entry)
        out.append((entry, name, None))
    for alias, target in aliases.pairs:
        original = by_name.get(canonical_model(target))
        if original is not None:
            entry = copy.deepcopy(original)
            for f in name_fields:
                if f in entry:
                    entry[f] = alias
            out.append((entry, alias, target))
    return out


def dump_json(doc: Any) -> bytes:
    """Compact JSON, as Go writes it. A lone surrogate (from a ``\\udc00`` escape)
    cannot be UTF-8: then every non-ASCII character is escaped instead."""
    try:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(doc, separators=(",", ":")).encode()


def _load(body: bytes) -> Any:
    """The JSON document, or None when it is not one (nested too deep counts)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def filter_listing(globs: Iterable[str] | None, body: bytes,
                   aliases: Aliases = NO_ALIASES) -> bytes:
    """A model list reply (``/api/tags``, ``/api/ps``, ``/v1/models``) without the
    models ``globs`` do not allow (None: all allowed), with an entry per alias whose
    target it lists; anything else comes back unchanged."""
    doc = _load(body)
    if not isinstance(doc, dict):
        return body
    pats = None if globs is None else tuple(globs)
    changed = False
    for key, name_fields in _LISTS:
        entries = doc.get(key)
        if not isinstance(entries, list):
            continue
        kept = [entry for entry, name, target in _with_aliases(entries, name_fields, aliases)
                if name is not None and (model_allowed(pats, name) if target is None
                                         else alias_visible(pats, name, target))]
        changed = changed or kept != entries
        doc[key] = kept
    if not changed:
        return body
    return dump_json(doc)


def rename_model(body: bytes, alias: str) -> bytes:
    """A ``/v1/models/{id}`` reply for the target, given the alias's id."""
    doc = _load(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
        return body
    doc["id"] = alias
    return dump_json(doc)
