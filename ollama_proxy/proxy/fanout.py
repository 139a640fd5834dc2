"""Requests that go to several backends at once, their answers merged into one:
the model lists (``/api/tags``, ``/api/ps``, ``/v1/models``: the union) and
model management (``/api/pull``, ``/api/delete``: every ollama backend, the
answer saying per backend what happened).

Each backend gets its own request; one that fails is named in the answer and
the others still count. A backend is asked with its own key, never the client's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

import trio

from ..api.headers import upstream_request_headers
from ..api.routes import Route
from ..backends.catalogue import Keep, merged_openai_models, merged_tags
from ..backends.registry import LIST_TIMEOUT_S, MAX_LIST_BYTES, RETRY_AFTER_DOWN_S, Backend
from ..errors import NoBackendAvailable, ProxyError, UpstreamProtocolError

MERGES: dict[str, Callable[[Sequence[bytes], Sequence[Keep]], bytes]] = {
    "tags": merged_tags,
    "ps": merged_tags,  # the same shape
    "openai_models": merged_openai_models,
}


@dataclass(slots=True)
class Answer:
    """One backend's answer (``status`` 0: none came, ``error`` says why)."""

    backend: Backend
    status: int = 0
    body: bytes = b""
    error: str | None = None

    def detail(self) -> dict[str, object]:
        """What the merged answer says of this backend."""
        if self.status == 0:
            return {"status": "unreachable", "error": self.error}
        out: dict[str, object] = {"status_code": self.status}
        try:
            parsed = json.loads(self.body) if self.body.strip() else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            for key in ("status", "error"):
                if isinstance(parsed.get(key), str):
                    out[key] = parsed[key]
        if 200 <= self.status < 300 and "status" not in out:
            out["status"] = "success"
        return out


async def ask_all(backends: Sequence[Backend], method: str, target: str,
                  request_headers: list[tuple[bytes, bytes]], body: bytes,
                  request_id: bytes, timeout_s: float | None = LIST_TIMEOUT_S,
                  max_bytes: int = MAX_LIST_BYTES) -> list[Answer]:
    """The same request to every one of ``backends`` at once; answers in their order."""
    answers = [Answer(b) for b in backends]

    async def ask(answer: Answer) -> None:
        backend = answer.backend
        headers = upstream_request_headers(
            request_headers, host=backend.host_header, body_length=len(body),
            api_key=backend.api_key, request_id=request_id)
        try:
            with trio.fail_after(timeout_s) if timeout_s else trio.CancelScope():
                answer.status, answer.body = await backend.fetch(method, target, headers, body,
                                                                 max_bytes)
        except trio.TooSlowError:
            answer.error = f"no answer within {timeout_s:g} s"
        except ProxyError as err:
            answer.error = err.message

    async with trio.open_nursery() as nursery:
        for answer in answers:
            nursery.start_soon(ask, answer)
    return answers


def merged_listing(route: Route, answers: Sequence[Answer]) -> bytes:
    """The union of the model lists that came back; a 502 when none did."""
    ok = [a for a in answers if a.status == 200]
    if ok:
        try:  # each backend's list shows what it is sent: its globs and size cap
            return MERGES[route.name]([a.body for a in ok],
                                      [a.backend.catalogue.serves for a in ok])
        except ValueError:
            pass
    raise UpstreamProtocolError("no backend answered the model list: " + "; ".join(
        f"{a.backend.name}: {a.error or f'answered {a.status}'}" for a in answers))


def management_answer(answers: Sequence[Answer], what: str) -> tuple[int, dict[str, object]]:
    """One answer for a pull or a delete sent to every ollama backend: 200 when every
    backend did it, 502 when one failed or was unreachable, else the backends' own
    status (a delete of a model none has: 404). The body names each backend's outcome."""
    details = {a.backend.name: a.detail() for a in answers}
    failed = [a for a in answers if a.status == 0 or a.status >= 500]
    refused = [a for a in answers if 400 <= a.status < 500]
    if not failed and not refused:
        return 200, {"status": "success", "backends": details}
    bad = failed or refused
    status = 502 if failed else (200 if len(refused) < len(answers) else bad[0].status)
    names = ", ".join(a.backend.name for a in bad)
    message = f"{what} failed on {names}" if status != 200 else f"{what}: not done on {names}"
    payload: dict[str, object] = {"backends": details}
    if status == 200:
        payload["status"] = "success"
        payload["note"] = message
    else:
        payload["error"] = message
    return status, payload


def backend_param(target: str) -> tuple[str | None, str | None]:
    """``?backend=NAME`` of a management request, and its target without it (None: as is)."""
    path, sep, query = target.partition("?")
    if not sep:
        return None, None
    pairs = parse_qsl(query, keep_blank_values=True)
    names = [value for key, value in pairs if key == "backend"]
    if not names:
        return None, None
    rest = urlencode([(k, v) for k, v in pairs if k != "backend"])
    return names[-1], path + ("?" + rest if rest else "")


def no_backend(native: bool) -> NoBackendAvailable:
    kind = "ollama " if native else ""
    return NoBackendAvailable(f"no {kind}backend is up; retry later",
                              retry_after_s=RETRY_AFTER_DOWN_S)
