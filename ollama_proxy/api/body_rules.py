"""The request body's rules, sans-IO: parsing and checking it, and the rewrites the
gateway makes to it (an OpenAI stream must report usage; ``max_completion_tokens`` is
ignored by Ollama, so it becomes ``max_tokens``; a completion cap is set where limits
demand one). Rewrites change ``Exchange.body_obj`` and mark it dirty; it is re-serialised
once, at the end (``Exchange.body``).

The body is checked so that the gateway reads what the backend will: decoded
strictly (``jsonbody``), every field the gateway reads spelled exactly as it
reads it (the backend's decoder would take another case as the same field)
and of the type the APIs document.
"""

from __future__ import annotations

import functools
from typing import Any

from ..errors import ApiFamily, BadRequest
from .jsonbody import decode_object, go_fold, quoted
from .models import name_problem
from .routes import Route, RouteKind, Text


def _by_fold(*names: str) -> dict[str, str]:
    return {go_fold(name): name for name in names}


# The fields the gateway reads or writes, where it reads them (with the text
# usage.estimate_prompt_tokens reads), by their folded spelling.
_TOP_FIELDS = _by_fold("model", "options", "stream", "stream_options", "messages", "prompt",
                       "input", "keep_alive", "max_tokens", "max_completion_tokens", "system",
                       "suffix")
_INNER_FIELDS = {"options": _by_fold("num_predict"), "stream_options": _by_fold("include_usage")}
_MESSAGE_FIELDS = _by_fold("content")


def parse_body(route: Route, raw: bytes | bytearray) -> dict[str, Any] | None:
    """The JSON object of a JSON route's body, checked (400 when it is not one,
    or when the backend could read it differently from the gateway)."""
    if not route.json_body:
        return None
    if not raw.strip():
        raise BadRequest("missing request body")
    obj = decode_object(raw)
    _check_spelling(obj, _top_fields(route.model_fields), "")
    for name, fields in _INNER_FIELDS.items():
        inner = obj.get(name)
        if isinstance(inner, dict):
            _check_spelling(inner, fields, name + ".")
    _check_types(route, obj)
    return obj


@functools.cache
def _top_fields(model_fields: tuple[str, ...]) -> dict[str, str]:
    """The top-level fields checked on a route that reads its model from ``model_fields``."""
    return {**_TOP_FIELDS, **_by_fold(*model_fields)}


def _check_spelling(obj: dict[str, Any], fields: dict[str, str], where: str) -> None:
    """Refuse a key that names one of ``fields`` to the backend but not to us."""
    for key in obj:
        name = fields.get(go_fold(key))
        if name is not None and name != key:
            raise BadRequest(f"{quoted(where + key)} must be spelled {quoted(where + name)}: the "
                             "backend reads keys case-insensitively, and the gateway checks "
                             "this field")


def _check_types(route: Route, obj: dict[str, Any]) -> None:
    """The fields the gateway reads must have the types the APIs document
    (null means absent)."""
    _check_model(route, obj)
    messages = obj.get("messages")
    if messages is not None:  # read on every route by the usage estimate
        if not isinstance(messages, list):
            raise BadRequest('"messages" must be a list of objects')
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise BadRequest(f'"messages[{index}]" must be an object')
            if "content" not in message:
                _check_spelling(message, _MESSAGE_FIELDS, f"messages[{index}].")
    if route.family is ApiFamily.NATIVE:
        if route.metered:
            _check_type(obj, "options", dict, "an object")
    elif route.kind is RouteKind.GENERATION:
        _check_type(obj, "stream_options", dict, "an object")
    if route.text is Text.PROMPT:
        _check_type(obj, "prompt", str, "a string")
    elif route.text is Text.OPENAI_PROMPT and not _is_openai_prompt(obj.get("prompt")):
        raise BadRequest('"prompt" must be a string, a list of strings, a list of token ids '
                         "or a list of lists of token ids")
    elif route.text is Text.INPUT:
        _check_type(obj, "input", (str, list), "a string or a list")


def _check_type(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> None:
    value = obj.get(name)
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f'"{name}" must be {what}')


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _is_openai_prompt(value: Any) -> bool:
    if value is None or isinstance(value, str) or _is_token_ids(value):
        return True
    return isinstance(value, list) and (all(isinstance(v, str) for v in value)
                                        or all(_is_token_ids(v) for v in value))


def _check_model(route: Route, obj: dict[str, Any]) -> None:
    """``model`` (and ``name`` where Ollama reads it) must be text a name can be;
    required where the route says so."""
    names = route.model_fields
    for name in names:
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRequest(f'"{name}" must be a string')
        problem = name_problem(value)
        if problem is not None:
            raise BadRequest(f'"{name}" {problem}: no model has such a name')
    if route.model_required and not any(obj.get(name) for name in names):
        raise BadRequest('"model" is required')


def wants_stream(route: Route, obj: dict[str, Any] | None) -> bool:
    """Whether the backend will stream: native defaults to true, /v1 to false."""
    if obj is None:
        return False
    value = obj.get("stream")
    if value is None:
        return route.stream_default
    if not isinstance(value, bool):
        raise BadRequest('"stream" must be true or false')
    return value


def apply_openai_rules(route: Route, obj: dict[str, Any], stream: bool) -> tuple[bool, bool]:
    """Rewrite an OpenAI generation body; returns ``(changed, usage_injected)``."""
    if not route.openai_generation:
        return False, False
    changed = False
    if "max_completion_tokens" in obj:
        cap = obj.pop("max_completion_tokens")
        changed = True
        if cap is not None:
            current = obj.get("max_tokens")
            if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
                raise BadRequest('"max_completion_tokens" must be a whole number >= 1')
            if not isinstance(current, int) or isinstance(current, bool) or current > cap:
                obj["max_tokens"] = cap
    injected = False
    if stream:
        options = obj.get("stream_options")  # an object or None (parse_body)
        if not (options or {}).get("include_usage"):
            obj["stream_options"] = {**(options or {}), "include_usage": True}
            changed = injected = True
    return changed, injected


def requested_cap(route: Route, obj: dict[str, Any]) -> int | None:
    """The completion cap the client asked for: native ``options.num_predict``,
    OpenAI ``max_tokens`` (after ``apply_openai_rules``). None when absent, 0
    or negative (Ollama's "no limit"); 400 when it is not a number."""
    if route.family is ApiFamily.NATIVE:
        options = obj.get("options")  # an object or None (parse_body)
        if options is None:
            return None
        value, where = options.get("num_predict"), "options.num_predict"
    else:
        value, where = obj.get("max_tokens"), "max_tokens"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):  # also NaN and Infinity
        raise BadRequest(f'"{where}" must be a whole number')
    return int(value) if value >= 1 else None


def set_cap(route: Route, obj: dict[str, Any], cap: int) -> bool:
    """Send ``cap`` as the completion cap unless the client asked for no more;
    True when the body changed."""
    if route.family is ApiFamily.NATIVE:
        target = obj.get("options")
        if target is None:
            target = obj["options"] = {}
        key = "num_predict"
    else:
        target, key = obj, "max_tokens"
    current = target.get(key)
    if current is not None and not isinstance(current, bool) and 1 <= current <= cap:
        return False
    target[key] = cap
    return True
