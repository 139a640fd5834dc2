"""Model names as Ollama reads them, sans-IO: one canonical spelling, glob
matching for ``allowed_models`` (and, soon, backends' model lists), and the
filtered model-list replies. Shared by access and backends, so it lives here."""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from typing import Iterable

_REGISTRY_PREFIX = "registry.ollama.ai/library/"


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


# A model list reply: where its entries are, and which of their fields name the model.
_LISTS = (("models", ("name", "model")), ("data", ("id",)))  # /api/tags, /api/ps; /v1/models


def filter_listing(globs: Iterable[str], body: bytes) -> bytes:
    """A model list reply (``/api/tags``, ``/api/ps``, ``/v1/models``) without the
    models ``globs`` do not allow; anything else comes back unchanged."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if not isinstance(doc, dict):
        return body
    pats = tuple(globs)
    changed = False
    for key, name_fields in _LISTS:
        entries = doc.get(key)
        if not isinstance(entries, list):
            continue
        kept = []
        for entry in entries:
            name = next((entry[f] for f in name_fields if isinstance(entry, dict)
                         and isinstance(entry.get(f), str)), None)
            if name is not None and model_allowed(pats, name):
                kept.append(entry)
        changed = changed or len(kept) != len(entries)
        doc[key] = kept
    if not changed:
        return body
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
