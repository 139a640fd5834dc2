"""What the simulated Ollama says, and how Go would write it, sans-IO.

Pure functions of their inputs: Go-faithful JSON encoding and decode-error
messages, RFC3339Nano timestamps, the ``[[sim:...]]`` directives, and the
deterministic words, token ids and embedding vectors.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

# --------------------------------------------------------------------------- Go JSON


# Go's encoder escapes these even inside strings (HTML safety, JS line separators).
_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)
# Marks where a pre-rendered GoFloats goes (a private-use character no text of ours holds).
_SLOT = "\ue000"
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)


def _go_float(value: float, digits: str) -> str:
    """Go's float notation: plain between 1e-6 and 1e21, else exponent (``1e-7``)."""
    if value == 0 or 1e-6 <= abs(value) < 1e21:
        text = format(Decimal(digits), "f")
        return text[:-2] if text.endswith(".0") else text
    mantissa, _, exponent = f"{Decimal(digits):e}".partition("e")
    sign = "-" if exponent.startswith("-") else "+"
    return f"{mantissa}e{sign}{exponent.lstrip('+-').lstrip('0') or '0'}"


def _shortest_f32(value: float) -> str:
    """Fewest significant digits that read back as the same float32."""
    target = struct.pack("<f", value)
    value = struct.unpack("<f", target)[0]  # digits of the float32 itself, rounded correctly
    for precision in range(1, 10):
        digits = f"{value:.{precision}g}"
        if struct.pack("<f", float(digits)) == target:
            return digits
    return repr(value)


@dataclass(frozen=True, slots=True)
class GoFloats:
    """A list of floats as Go writes ``[]float32`` (``f32``) or ``[]float64``.

    Python and Go print floats differently (``1.0``/``1``, ``1e-05``/``0.00001``),
    so ``go_json`` takes floats only wrapped in this.
    """

    values: tuple[float, ...]
    f32: bool = True

    def render(self) -> str:
        shortest = _shortest_f32 if self.f32 else repr
        return "[" + ",".join(_go_float(v, shortest(v)) for v in self.values) + "]"


def go_json(value: Any) -> bytes:
    """``json.Marshal``: compact, raw UTF-8, ``<>&`` escaped, keys in dict order.

    Floats must come as ``GoFloats``; the common case (none) runs in C.
    """
    try:
        text = _ENCODER.encode(value)
    except TypeError:
        rendered: list[str] = []

        def slot(obj: Any) -> str:
            if not isinstance(obj, GoFloats):
                raise TypeError(f"cannot encode {type(obj).__name__}") from None
            rendered.append(obj.render())
            return f"{_SLOT}{len(rendered) - 1}{_SLOT}"

        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=slot)
        for index, floats in enumerate(rendered):
            text = text.replace(f'"{_SLOT}{index}{_SLOT}"', floats, 1)
    return text.translate(_GO_ESCAPES).encode()


def rfc3339nano(ns: int) -> str:
    """Go's ``time.RFC3339Nano`` in UTC: fraction with trailing zeros trimmed."""
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    fraction = f".{frac:09d}".rstrip("0") if frac else ""
    return f"{stamp}{fraction}Z"


def now_ns() -> int:
    return time.time_ns()


class GoJsonError(ValueError):
    """A body Go's ``json.Decoder`` would reject; ``str()`` is Go's message."""


_LITERALS = {"t": "true", "f": "false", "n": "null"}


def _quote_char(char: str) -> str:
    """Go's ``quoteChar``: the offending character as Go prints it."""
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
    return "'" + json.dumps(char, ensure_ascii=False)[1:-1] + "'"


def _innermost_container(text: str, end: int) -> str:
    """``{`` or ``[``: the container open at ``end`` (strings skipped)."""
    stack: list[str] = []
    in_string = escaped = False
    for char in text[:end]:
        if in_string:
            escaped = not escaped and char == "\\"
            in_string = escaped or char != '"'
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append(char)
        elif char in "}]" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def _go_message(text: str, exc: json.JSONDecodeError) -> str:
    pos = exc.pos
    if pos >= len(text):
        return "unexpected EOF"
    char = text[pos]
    if exc.msg == "Expecting value":
        literal = _LITERALS.get(char)
        if literal:  # a literal broken part way (Python stops at its first letter)
            for index, got in enumerate(text[pos : pos + len(literal)]):
                if got != literal[index]:
                    return (
                        f"invalid character {_quote_char(got)} in literal {literal}"
                        f" (expecting {_quote_char(literal[index])})"
                    )
            return "unexpected EOF"
        return f"invalid character {_quote_char(char)} looking for beginning of value"
    if exc.msg.startswith("Expecting property name"):
        return f"invalid character {_quote_char(char)} looking for beginning of object key string"
    if exc.msg == "Expecting ':' delimiter":
        return f"invalid character {_quote_char(char)} after object key"
    if exc.msg == "Expecting ',' delimiter":
        in_object = _innermost_container(text, pos) == "{"
        where = "object key:value pair" if in_object else "array element"
        return f"invalid character {_quote_char(char)} after {where}"
    if exc.msg.startswith("Invalid control character"):
        return f"invalid character {_quote_char(char)} in string literal"
    if exc.msg.startswith("Invalid \\escape") and pos + 1 < len(text):
        return f"invalid character {_quote_char(text[pos + 1])} in string escape code"
    return "unexpected EOF"  # unterminated strings and the like


def _reject_constant(name: str) -> Any:
    raise GoJsonError(f"invalid character {_quote_char(name[0])} looking for beginning of value")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def go_decode(body: bytes | bytearray) -> Any:
    """One JSON value as ``json.Decoder.Decode`` reads it (trailing bytes ignored).

    Raises ``GoJsonError`` with Go's message; an empty body is ``EOF``.
    """
    text = body.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        raise GoJsonError("EOF")
    try:
        value = _DECODER.raw_decode(text, start)[0]
    except json.JSONDecodeError as exc:
        raise GoJsonError(_go_message(text, exc)) from None
    return _without_lone_surrogates(value) if _SURROGATE_ESCAPE.search(text) else value


# A "\ud800"-"\udfff" escape; Go reads one that is not half of a pair as U+FFFD.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _without_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    return value


def json_kind(value: Any) -> str:
    """The JSON kind Go names in ``cannot unmarshal <kind> into ...``."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "null"


# --------------------------------------------------------------------------- directives

_DIRECTIVE = re.compile(r"\[\[sim:([^\]]*)\]\]")


@dataclass(frozen=True, slots=True)
class Directives:
    """Per-request control written into the prompt as ``[[sim:name=value]]``."""

    tokens: int | None = None  # completion tokens the model "wants" to say
    delay: float | None = None  # seconds before the first byte (a model load)
    rate: float | None = None  # tokens per second (0 = as fast as possible)
    error_after: int | None = None  # frames before Ollama's mid-stream error
    drop_after: int | None = None  # frames before the connection is dropped
    status: int | None = None  # error status answered before any frame


# name -> (parser, smallest allowed value)
_DIRECTIVE_TYPES: dict[str, tuple[type, float]] = {
    "tokens": (int, 0),
    "delay": (float, 0),
    "rate": (float, 0),
    "error_after": (int, 0),
    "drop_after": (int, 0),
    "status": (int, 400),
}


def parse_directives(text: str) -> Directives:
    """Collect the directives in ``text``; a typo is an error, never ignored.

    Raises ``ValueError`` naming the bad directive.
    """
    values: dict[str, Any] = {}
    for match in _DIRECTIVE.finditer(text):
        name, _, raw = match.group(1).partition("=")
        spec = _DIRECTIVE_TYPES.get(name)
        try:
            if spec is None:
                raise ValueError
            value = spec[0](raw)
            if not spec[1] <= value or (name == "status" and value > 599):
                raise ValueError
        except ValueError:
            raise ValueError(f"simulator: bad directive {match.group(0)}") from None
        values[name] = value
    return Directives(**values)


# --------------------------------------------------------------------------- words and vectors

# Some words carry <, >, & and non-ASCII, so ordinary streams exercise Go's
# escaping and raw UTF-8 (and any relay that would re-encode them).
WORDS = (
    "the", "model", "answers", "with", "a", "quiet", "stream", "of", "tokens", "that",
    "arrive", "one", "by", "every", "frame", "counts", "gateway", "keeps", "ledger",
    "honest", "while", "GPU", "hums", "along", "in", "dark", "server", "room", "and",
    "R&D", "team", "waits", "for", "<result>", "café", "naïve", "über", "日本語", "so",
    "proxy", "relays", "bytes", "unchanged", "never", "buffers", "lines", "ends", "well",
    "slowly", "quickly", "then", "again", "until", "done", "fair", "queue", "shares",
    "time", "->", "each", "user", "limits", "hold", "fast",
)  # fmt: skip
# Vocabulary size of the fake tokenizer; ids in ``context`` stay below it.
VOCAB_SIZE = 128_256


def word_count(text: str) -> int:
    return len(text.split())


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _lcg(state: int) -> int:
    """One step of Knuth's MMIX generator: same sequence on every platform."""
    return (state * 6364136223846793005 + 1442695040888963407) & 0xFFFF_FFFF_FFFF_FFFF


def pick_words(prompt: str, count: int) -> list[str]:
    """``count`` words chosen deterministically from ``prompt`` (a stable prefix)."""
    state = _seed(prompt)
    words = []
    for _ in range(count):
        state = _lcg(state)
        words.append(WORDS[(state >> 33) % len(WORDS)])
    return words


def context_ids(text: str, count: int) -> list[int]:
    """Fake token ids for ``context``, deterministic per text."""
    state = _seed(text)
    ids = []
    for _ in range(count):
        state = _lcg(state)
        ids.append((state >> 33) % VOCAB_SIZE)
    return ids


def embed_vector(text: str, dim: int) -> list[float]:
    """An L2-normalised vector of float32 values, deterministic per text."""
    state = _seed(text)
    raw = []
    for _ in range(dim):
        state = _lcg(state)
        raw.append((state >> 11) / float(1 << 53) * 2.0 - 1.0)
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [struct.unpack("<f", struct.pack("<f", x / norm))[0] for x in raw]
