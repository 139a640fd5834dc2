"""Usage extraction from relayed responses, sans-IO.

``StreamScanner`` is fed the upstream body piece by piece and returns the
bytes to forward: the same bytes, cut only at frame ends, minus the
usage-only SSE chunk when the proxy itself asked for it. On the way it keeps
a ``UsageTally``. The fast path (no usage, no error in a piece) costs a few
substring searches and one regex pass in C; frames are parsed only when they
may hold counts.

Counts a backend reports are believed up to ``MAX_REPORTED_TOKENS`` a
request: a broken or hostile backend's 2**63 must not reach the ledger
(SQLite refuses it) nor a user's quota. Ollama's timings (the final frame's
``*_duration``, ns) are read from the same frame, up to ``MAX_REPORTED_NS``;
a reply without them leaves them None.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from .framing import FrameBuffer, FrameKind, ndjson_lines, sse_data, sse_events

log = logging.getLogger("ollama_proxy.tally")  # "ollama_proxy.usage" is the access log

# No request uses a billion tokens (the largest context windows are ~10 M): a count
# beyond this is a broken or hostile backend's, clamped here and flagged estimated.
MAX_REPORTED_TOKENS = 10**9
# No request keeps a GPU busy for a day (10**14 ns: 27.8 h); beyond it, clamped too.
MAX_REPORTED_NS = 10**14


@dataclass(slots=True)
class UsageTally:
    """What one response used, as far as the relayed frames tell."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    exact: bool = False  # counts came from the backend, not an estimate
    clamped: bool = False  # the backend's counts were out of range, cut to the bound
    frames: int = 0  # content-bearing frames relayed (the estimate when counts never come)
    finished: bool = False  # the backend's end marker (done:true / [DONE]) was seen
    error: str | None = None  # an in-band error the backend sent
    # Ollama's timings of the work, in ns (None: the backend did not report it)
    total_ns: int | None = None
    load_ns: int | None = None
    prompt_eval_ns: int | None = None
    eval_ns: int | None = None

    def estimate(self, prompt_tokens_guess: int) -> None:
        """Fill in counts for a response that ended before the backend's totals."""
        if not self.exact:
            self.prompt_tokens = prompt_tokens_guess
            self.completion_tokens = self.frames


def _int(value: Any, tally: UsageTally) -> int:
    """A count as the backend gave it: 0 unless a positive whole number, at most
    ``MAX_REPORTED_TOKENS`` (beyond it the tally is marked ``clamped``)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return 0
    if value > MAX_REPORTED_TOKENS:
        log.warning("a backend reported %d tokens for one request; counted as %d (estimated)",
                    value, MAX_REPORTED_TOKENS)
        tally.clamped = True
        return MAX_REPORTED_TOKENS
    return value


def _ns(value: Any) -> int | None:
    """A duration as the backend gave it: None unless a whole number >= 0 (a bool, a
    float, text or a negative number is no duration), at most ``MAX_REPORTED_NS``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return None
    if value > MAX_REPORTED_NS:
        log.warning("a backend reported a duration of %d ns for one request; kept as %d",
                    value, MAX_REPORTED_NS)
        return MAX_REPORTED_NS
    return value


# (the key in Ollama's reply, the tally's field); the first two are also in /api/embed's
_DURATIONS = (("total_duration", "total_ns"), ("load_duration", "load_ns"),
              ("prompt_eval_duration", "prompt_eval_ns"), ("eval_duration", "eval_ns"))


def _apply_durations(tally: UsageTally, obj: dict[str, Any], done: bool) -> None:
    """Take Ollama's timings from its final frame or whole reply (native only).

    A reply with none of them (another server, a load-only reply) leaves all None:
    nothing is invented. With some, a missing one is Go's omitempty, a zero: on a
    ``done`` frame (generate, chat) for all four; on /api/embed's reply, which has
    no evaluation timings at all, for total and load only.
    """
    if not any(key in obj for key, _field in _DURATIONS):
        return
    for index, (key, field) in enumerate(_DURATIONS):
        if key in obj:
            value = _ns(obj[key])
        else:
            value = 0 if done or index < 2 else None
        setattr(tally, field, value)


def apply_usage_object(tally: UsageTally, obj: Any) -> bool:
    """Take counts from a parsed JSON document of either dialect; True if it had some.

    Native: ``prompt_eval_count``/``eval_count`` on a ``done:true`` frame or a
    whole reply (missing means 0: Go's omitempty), and the timings with them
    (``_apply_durations``). OpenAI: a ``usage`` object;
    the last one wins (``/v1/completions`` repeats zeros on every chunk).
    """
    if not isinstance(obj, dict):
        return False
    usage = obj.get("usage")
    if isinstance(usage, dict):
        prompt = _int(usage.get("prompt_tokens"), tally)
        completion = _int(usage.get("completion_tokens"), tally)
        if not prompt and not completion:
            return False  # /v1/completions' placeholder on every chunk, not a count
        tally.prompt_tokens = prompt
        tally.completion_tokens = completion
        tally.exact = True
        return True
    done = obj.get("done") is True
    if done or "prompt_eval_count" in obj or "eval_count" in obj:
        tally.prompt_tokens = _int(obj.get("prompt_eval_count"), tally)
        tally.completion_tokens = _int(obj.get("eval_count"), tally)
        tally.exact = True
        _apply_durations(tally, obj, done)
        return True
    return False


def _error_message(obj: Any) -> str | None:
    if not isinstance(obj, dict) or not obj.get("error"):
        return None
    err = obj["error"]
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None  # garbage or a frame cut by the size cap: not ours to judge


_NATIVE_FINAL = (b'"done":true', b'"done": true')
# A generated token shows as a non-empty text field of a frame, in any dialect: the
# native "response"/"thinking"/message "content", OpenAI chat "content"/"reasoning"
# (+ "_content")/tool-call "arguments", completions "text". Role-only deltas, finish
# chunks, usage-only chunks, done frames and error lines have none. Inside a JSON
# string every quote is escaped, so text that merely mentions such a field never
# matches.
_CONTENT = re.compile(
    rb'"(?:content|text|response|thinking|reasoning|reasoning_content|arguments)"\s*:\s*"[^"]')


class StreamScanner:
    """Frames a streamed body, forwards it unchanged and tallies its usage.

    ``drop_usage_chunk``: the client did not ask for usage, the proxy did, so
    the usage-only chunk (``choices: []``) is removed before the client sees it.
    ``capture_bytes``: keep up to that many bytes of the frames as they came
    (``captured``), for counting the streamed text after the stream; past the
    bound the capture is given up (``captured`` None).
    """

    __slots__ = ("kind", "tally", "captured", "_frames", "_drop_usage_chunk", "_capture_left")

    def __init__(self, kind: FrameKind, *, drop_usage_chunk: bool = False,
                 max_frame_bytes: int = 1 << 20, capture_bytes: int = 0) -> None:
        self.kind = kind
        self.tally = UsageTally()
        self._frames = FrameBuffer(kind, max_frame_bytes)
        self._drop_usage_chunk = drop_usage_chunk
        self.captured: list[bytes] | None = [] if capture_bytes > 0 else None
        self._capture_left = capture_bytes

    def feed(self, data: bytes) -> bytes:
        """Take an upstream piece; return the bytes that can go to the client now."""
        return self._scan(self._frames.feed(data))

    def finish(self) -> bytes:
        """End of the upstream body: the last (unterminated) frame, scanned too."""
        return self._scan(self._frames.flush())

    def _scan(self, region: bytes) -> bytes:
        if not region:
            return region
        self.tally.frames += len(_CONTENT.findall(region))
        if self.captured is not None:
            self._capture(self.captured, region)
        if self.kind is FrameKind.NDJSON:
            self._scan_ndjson(region)
            return region
        return self._scan_sse(region)

    def _capture(self, captured: list[bytes], region: bytes) -> None:
        self._capture_left -= len(region)
        if self._capture_left < 0:
            self.captured = None  # too long to count afterwards: the estimate stays
        else:
            captured.append(region)

    def _scan_ndjson(self, region: bytes) -> None:
        if (b'"error"' not in region and _NATIVE_FINAL[0] not in region
                and _NATIVE_FINAL[1] not in region):
            return
        tally = self.tally
        for line in ndjson_lines(region):
            if b'"error"' not in line and b'"done"' not in line:
                continue
            obj = _loads(line)
            message = _error_message(obj)
            if message is not None:
                tally.error = message
            elif isinstance(obj, dict) and obj.get("done") is True:
                tally.finished = True
                apply_usage_object(tally, obj)

    def _scan_sse(self, region: bytes) -> bytes:
        if b'"usage"' not in region and b'"error"' not in region and b"[DONE]" not in region:
            return region
        return b"".join(self._inspect_sse_event(region[start:end])
                        for start, end in sse_events(region))

    def _inspect_sse_event(self, event: bytes) -> bytes:
        """Take the counts, error or end marker of one SSE event; return what of it
        goes to the client."""
        tally = self.tally
        data = sse_data(event)
        if data is None:
            return event  # comments, blank keep-alives: forwarded as they are
        if data.startswith(b"[DONE]"):
            tally.finished = True
            return event
        obj = _loads(data)
        message = _error_message(obj)
        if message is not None:
            tally.error = message
            return event
        if not isinstance(obj, dict):
            return event
        has_usage = isinstance(obj.get("usage"), dict)
        apply_usage_object(tally, obj)
        if not has_usage or not self._drop_usage_chunk:
            return event
        if obj.get("choices") == []:
            return b""  # the usage-only chunk the client never asked for
        # /v1/completions repeats zero usage on every chunk once usage is asked
        # for; the client did not ask, so those bytes go as if it had not.
        return _ZERO_USAGE.sub(b"", event)


# Ollama's placeholder usage on every /v1/completions chunk (Go field order).
_ZERO_USAGE = re.compile(
    rb',"usage":\{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0\}'
)


def scan_whole_body(body: bytes) -> UsageTally:
    """Usage of a non-streamed JSON reply (either dialect)."""
    tally = UsageTally(finished=True)
    obj = _loads(body)
    message = _error_message(obj)
    if message is not None:
        tally.error = message
    apply_usage_object(tally, obj)
    return tally


def estimate_prompt_tokens(request: Any) -> int:
    """A rough prompt size (4 characters a token) for responses cut short."""
    if not isinstance(request, dict):
        return 0
    chars = 0
    for key in ("prompt", "system", "suffix", "input"):
        chars += _text_length(request.get(key))
    for message in request.get("messages") or ():
        if isinstance(message, dict):
            chars += _text_length(message.get("content"))
    return (chars + 3) // 4


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, str):
                total += len(item)
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                total += len(item["text"])
        return total
    return 0
