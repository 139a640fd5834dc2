"""What a prompt costs beyond its text, learned from exact counts (sans-IO).

A backend counts a prompt after its chat template wrapped it: "hi" is one
token of text and 40 for llama.cpp (BOS, role headers, an empty system turn,
the assistant header). Every exact count teaches the difference, per basis
(what the text was counted with: ``TEXT``, the 4-characters-a-token estimate,
or one backend's tokenizer), route, model and message structure
(``prompt_shape``: the roles in order, since a template wraps each message).
The limits' reservations and the estimated usage rows both add it to their
text estimate, so "estimated" means text + what this model's template adds.

An overhead seen twice in a row for one structure, from texts of different
sizes, is *confirmed*: the template's cost depended on the structure only, not
on the words, which is what lets a text-only tokenizer's count plus the
overhead stand for the backend's own count.

On the ``TEXT`` basis the difference also holds the estimate's error, which
the words decide (8,000 characters of Chinese are 2,000 tokens to the estimate
and 8,000 to the model), and any user's request teaches it: there the overhead
is the least of the last ``FLOOR_OF`` seen, and never more than
``MAX_TEXT_OVERHEAD``, so one user's unusual prompt cannot inflate everyone's
reservations and estimates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from .models import canonical_model
from .record import RequestRecord
from .usage import estimate_prompt_tokens

if TYPE_CHECKING:
    from .exchange import Exchange

Shape = tuple[str, ...]
TEXT = "text"  # the basis of the 4-characters-a-token estimate
# Learned (basis, route, model, shape) entries: few in a process; still bounded.
MAX_ENTRIES = 1_000
CONFIRMED = 2  # the same overhead this many times in a row, each from a text of another size
FLOOR_OF = 8  # TEXT basis: the overhead is the least of this many latest
MAX_TEXT_OVERHEAD = 1024  # TEXT basis: a template costs less (tool lists have no shape)
# Request fields a template renders besides the messages' text: no fixed cost per shape.
_RENDERED_EXTRAS = frozenset({"tools", "functions", "tool_choice", "chat_template_kwargs",
                              "images"})
_MESSAGE_KEYS = frozenset({"role", "content"})
_PROMPT_PARTS = ("system", "prompt", "suffix", "template", "raw")


def prompt_shape(body: Any) -> Shape | None:
    """The structure a template's cost depends on: the roles in order for a chat,
    the prompt fields present otherwise, one entry per input to embed. None when a
    template renders more than the text (tools, images, tool calls, names): no
    fixed overhead holds for such prompts."""
    if not isinstance(body, dict) or not _RENDERED_EXTRAS.isdisjoint(body):
        return None
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            return None
        roles = []
        for message in messages:
            if (not isinstance(message, dict) or not isinstance(message.get("content"), str)
                    or not isinstance(message.get("role"), str)
                    or not message.keys() <= _MESSAGE_KEYS):
                return None
            roles.append(message["role"])
        return tuple(roles)
    inputs = body.get("input")
    if isinstance(inputs, list):
        return ("input",) * len(inputs)
    if inputs is not None:
        return ("input",)
    return tuple(part for part in _PROMPT_PARTS if body.get(part))


class _Learned(NamedTuple):
    overhead: int  # the one to use: the latest, or on the TEXT basis the least of ``latest``
    seen: int  # times in a row the same overhead came, each from a text of another size
    text: int  # the size of the text it last came with
    last: int  # the latest overhead that came
    latest: tuple[int, ...]  # the last FLOOR_OF that came


class PromptOverheads:
    """The learned overheads; ``observe`` is a usage hook that learns the ``TEXT`` one."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        # (basis, route, model, shape or None: the model's, any shape) -> what was learned
        self._learned: dict[tuple[str, str, str, Shape | None], _Learned] = {}

    def overhead(self, basis: str, route: str, model: str,
                 shape: Shape | None) -> tuple[int, bool]:
        """``(overhead, confirmed for this shape)``: this shape's when known, else the
        model's on that route (never confirmed), else ``(0, False)``."""
        name = canonical_model(model)
        if shape is not None:
            hit = self._learned.get((basis, route, name, shape))
            if hit is not None:
                return hit.overhead, hit.seen >= CONFIRMED
        hit = self._learned.get((basis, route, name, None))
        return (hit.overhead, False) if hit is not None else (0, False)

    def learn(self, basis: str, route: str, model: str, shape: Shape | None, overhead: int,
              text: int) -> None:
        """Remember an exact count's overhead (over a text of ``text`` tokens) for the
        shape and for the model. The same text size again confirms nothing."""
        name = canonical_model(model)
        keys: list[tuple[str, str, str, Shape | None]] = [(basis, route, name, None)]
        if shape is not None:
            keys.append((basis, route, name, shape))
        if basis == TEXT:
            overhead = min(overhead, MAX_TEXT_OVERHEAD)
        for key in keys:
            old = self._learned.get(key)
            if old is None or old.last != overhead:
                seen = 1
            else:
                seen = old.seen + (old.text != text)
            latest = (*(old.latest[1 - FLOOR_OF:] if old else ()), overhead)
            value = min(latest) if basis == TEXT else overhead
            if len(self._learned) >= self.max_entries and key not in self._learned:
                self._learned = {}
            self._learned[key] = _Learned(value, seen, text, overhead, latest)

    def text_estimate(self, route: str, model: str | None, body: Any) -> tuple[int, int]:
        """``(text estimate, overhead to add)`` of a request body: what a reservation
        holds and an estimated row counts. A text that over-counts adds nothing."""
        text = estimate_prompt_tokens(body)
        if not self._learned or not model:
            return text, 0
        overhead, _ = self.overhead(TEXT, route, model, prompt_shape(body))
        return text, max(0, overhead)

    def estimate(self, ex: Exchange) -> int:
        """The prompt estimate of an exchange whose backend gave no count."""
        text, overhead = self.text_estimate(ex.route.name, ex.model, ex.body_obj)
        return text + overhead

    def observe(self, ex: Exchange, record: RequestRecord) -> None:
        """Learn from a record the backend counted (a usage hook: runs per request)."""
        if (record.estimated or record.prompt_tokens <= 0 or not ex.model
                or not ex.route.metered):
            return
        reserved = ex.reservation.text_estimate if ex.reservation is not None else None
        text = reserved if reserved is not None else estimate_prompt_tokens(ex.body_obj)
        self.learn(TEXT, ex.route.name, ex.model, prompt_shape(ex.body_obj),
                   record.prompt_tokens - text, text)
