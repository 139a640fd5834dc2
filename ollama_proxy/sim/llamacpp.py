"""A llama.cpp-like OpenAI server for tests: the usage quirks of llama-cpp-python
0.3.36 as measured against the real one, or the
tokenizer endpoints of llama.cpp's llama-server.

* Streams ignore ``stream_options.include_usage``: a role-only first chat
  chunk, one chunk per token, an empty finish chunk, ``[DONE]`` (N tokens: N + 2
  chat chunks, N + 1 completion chunks); JSON with spaces, as Python writes it.
  Whole replies carry ``usage``.
* The tokenizer: one token per character, BOS added to every prompt, the
  ChatML markers one token each. A chat prompt is rendered with ChatML and an
  empty system turn when none is given, so ``"Say hello."`` counts 40.
* ``flavor="llama-cpp-python"``: ``POST /extras/tokenize`` and
  ``/extras/tokenize/count`` (``{"input"}``, BOS always added);
  ``flavor="llama-server"``: ``POST /tokenize`` (``{"content", "add_special"}``)
  and ``POST /apply-template``. Any other path: 404 ``{"detail": "Not Found"}``.

Generation is deterministic: ``max_tokens`` characters (default 16) of a fixed
text. ``calls`` lists every ``(path, body)`` received; ``tokenize_status`` and
``tokenize_gate`` (a ``trio.Event`` the tokenizer waits for) make its tokenizer
fail or hang, for tests.
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from ..http.messages import Request
from ..http.responder import Responder
from ..http.server import HttpServer
from .server import SERVER_SETTINGS

FLAVORS = ("llama-cpp-python", "llama-server")
BOS = "<s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL = (BOS, IM_START, IM_END)  # one token each when special tokens are parsed
DEFAULT_TOKENS = 16
_TEXT = "Once upon a time, a small model said hello. "
_JSON = [(b"content-type", b"application/json")]


def char_tokens(text: str, *, add_bos: bool) -> int:
    """Tokens of ``text``: one per character, a special marker one, BOS if added."""
    count = len(text)
    for marker in SPECIAL:
        count -= text.count(marker) * (len(marker) - 1)
    return count + (1 if add_bos else 0)


def chatml(messages: list[dict[str, Any]]) -> str:
    """The prompt ChatML makes of ``messages`` (an empty system turn unless one is
    given), the assistant's header last."""
    turns = [] if messages and messages[0].get("role") == "system" else [("system", "")]
    turns += [(str(m.get("role")), str(m.get("content") or "")) for m in messages]
    return "".join(f"{IM_START}{role}\n{text}{IM_END}\n" for role, text in turns) + \
        f"{IM_START}assistant\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # ", " and ": ", as llama-cpp-python's server


class LlamaCppSim:
    """The fake server; ``handle`` is an ``HttpServer`` handler."""

    def __init__(self, flavor: str = "llama-cpp-python", model: str = "tiny") -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}")
        self.flavor = flavor
        self.model = model
        self.calls: list[tuple[str, Any]] = []
        self.tokenize_status = 200
        self.tokenize_gate: trio.Event | None = None
        self._served = 0

    async def handle(self, request: Request, responder: Responder) -> None:
        raw = await request.read_body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.calls.append((request.path, body))
        self._served += 1
        endpoint = self._endpoint(request.method, request.path)
        if endpoint is None or not isinstance(body, dict) and request.method == "POST":
            await responder.respond(404, _JSON, _dumps({"detail": "Not Found"}))
            return
        if endpoint in self._tokenizer_endpoints():
            if self.tokenize_gate is not None:
                await self.tokenize_gate.wait()
            if self.tokenize_status != 200:
                await responder.respond(self.tokenize_status, _JSON, _dumps({"detail": "down"}))
                return
        await endpoint(body or {}, responder)

    def _tokenizer_endpoints(self) -> tuple[Any, ...]:
        return (self._extras_tokenize, self._extras_count, self._tokenize, self._apply_template)

    def _endpoint(self, method: str, path: str) -> Any:
        if method == "GET":
            return self._models if path == "/v1/models" else None
        if method != "POST":
            return None
        endpoints = {"/v1/chat/completions": self._chat, "/v1/completions": self._completion}
        if self.flavor == "llama-cpp-python":
            endpoints.update({"/extras/tokenize": self._extras_tokenize,
                              "/extras/tokenize/count": self._extras_count})
        else:
            endpoints.update({"/tokenize": self._tokenize,
                              "/apply-template": self._apply_template})
        return endpoints.get(path)

    async def _models(self, body: dict[str, Any], responder: Responder) -> None:
        data = [{"id": self.model, "object": "model", "owned_by": "me", "permissions": []}]
        await responder.respond(200, _JSON, _dumps({"object": "list", "data": data}))

    # -- tokenizer endpoints

    async def _extras_tokenize(self, body: dict[str, Any], responder: Responder) -> None:
        count = char_tokens(str(body.get("input", "")), add_bos=True)
        await responder.respond(200, _JSON, _dumps({"tokens": list(range(1, count + 1))}))

    async def _extras_count(self, body: dict[str, Any], responder: Responder) -> None:
        count = char_tokens(str(body.get("input", "")), add_bos=True)
        await responder.respond(200, _JSON, _dumps({"count": count}))

    async def _tokenize(self, body: dict[str, Any], responder: Responder) -> None:
        count = char_tokens(str(body.get("content", "")), add_bos=bool(body.get("add_special")))
        await responder.respond(200, _JSON, _dumps({"tokens": list(range(1, count + 1))}))

    async def _apply_template(self, body: dict[str, Any], responder: Responder) -> None:
        await responder.respond(200, _JSON, _dumps({"prompt": chatml(body.get("messages", []))}))

    # -- generation

    async def _chat(self, body: dict[str, Any], responder: Responder) -> None:
        prompt = char_tokens(chatml(body.get("messages") or []), add_bos=True)
        await self._generate(body, responder, prompt, chat=True)

    async def _completion(self, body: dict[str, Any], responder: Responder) -> None:
        prompt = char_tokens(str(body.get("prompt", "")), add_bos=True)
        await self._generate(body, responder, prompt, chat=False)

    async def _generate(self, body: dict[str, Any], responder: Responder, prompt: int, *,
                        chat: bool) -> None:
        count = body.get("max_tokens") or DEFAULT_TOKENS
        text = (_TEXT * (count // len(_TEXT) + 1))[:count]
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{self._served}", "model": self.model,
                "created": int(time.time()),
                "object": "chat.completion.chunk" if chat else "text_completion"}
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if chat:
                choice["message"] = {"content": text, "role": "assistant"}
            else:
                choice["text"] = text
            usage = {"prompt_tokens": prompt, "completion_tokens": count,
                     "total_tokens": prompt + count}
            reply = {**base, "object": "chat.completion" if chat else "text_completion",
                     "choices": [choice], "usage": usage}
            await responder.respond(200, _JSON, _dumps(reply))
            return
        await responder.start(200, [(b"content-type", b"text/event-stream")])

        async def event(delta: dict[str, Any] | None, text: str, finish: str | None) -> None:
            choice: dict[str, Any] = {"index": 0}
            if chat:
                choice["delta"] = delta
            else:
                choice["text"] = text
            choice.update(logprobs=None, finish_reason=finish)
            await responder.write(b"data: " + _dumps({**base, "choices": [choice]}) + b"\r\n\r\n")
            await trio.lowlevel.checkpoint()

        if chat:
            await event({"role": "assistant"}, "", None)
        for char in text:
            await event({"content": char}, char, None)
        await event({}, "", "length")
        await responder.write(b"data: [DONE]\r\n\r\n")
        await responder.end()


async def run_llamacpp_sim(sim: LlamaCppSim, host: str, port: int, *,
                           task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
                           ) -> None:
    """Serve ``sim`` on ``host:port`` (0 = any free port) until cancelled."""
    await HttpServer(sim.handle, SERVER_SETTINGS).serve(host, port, task_status=task_status)
