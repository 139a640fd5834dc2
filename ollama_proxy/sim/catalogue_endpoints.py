"""The simulated Ollama's model-management endpoints: listing, showing, pulling,
copying and deleting models in its catalogue, natively and on the OpenAI layer."""

from __future__ import annotations

import urllib.parse
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..http.messages import Request
from ..http.responder import Responder
from .frames import NDJSON_CT, OPENAI_JSON_CT, Api
from .models import normalize_name, openai_model, ps_entry, show_body, tags_entry
from .requests import Body, Refusal, find_model
from .text import go_json

if TYPE_CHECKING:
    from .server import SimRecord, Simulator


class CatalogueEndpoints:
    """The endpoints over ``sim.models`` and its loaded models."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def tags(self, request: Request, responder: Responder, record: SimRecord) -> None:
        models = [tags_entry(model) for model in self.sim.models.values()]
        await self.sim.send(responder, record, 200, go_json({"models": models}))

    async def ps(self, request: Request, responder: Responder, record: SimRecord) -> None:
        models = [ps_entry(model, expiry) for model, expiry in self.sim.loaded_models()]
        await self.sim.send(responder, record, 200, go_json({"models": models}))

    async def show(self, request: Request, responder: Responder, record: SimRecord) -> None:
        body = self.sim.decode(request, record, Api.NATIVE, "api.ShowRequest")
        model = find_model(self.sim.models, _named(body, record), Api.NATIVE)
        await self.sim.send(responder, record, 200, go_json(show_body(model)))

    async def pull(self, request: Request, responder: Responder, record: SimRecord) -> None:
        body = self.sim.decode(request, record, Api.NATIVE, "api.PullRequest")
        model = self.sim.models.get(normalize_name(_named(body, record)))
        record.stream = body.get("stream", "bool") is not False
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        failure = "pull model manifest: file does not exist" if model is None else None
        if model is not None:
            layer = {
                "status": f"pulling {model.digest[:12]}",
                "digest": f"sha256:{model.digest}",
                "total": model.size,
            }
            lines.append(layer)  # omitempty: no "completed" before the first byte
            lines += [{**layer, "completed": model.size * part // 4} for part in (1, 4)]
            lines += [{"status": s} for s in ("verifying sha256 digest", "writing manifest")]
            lines.append({"status": "success"})
        if not record.stream:
            if failure is not None:
                raise Refusal(500, failure, Api.NATIVE)
            await self.sim.send(responder, record, 200, go_json(lines[-1]))
            return
        if failure is not None:
            lines.append({"error": failure})
        await self.sim.open_stream(responder, record, NDJSON_CT)
        for line in lines[:-1]:
            await responder.write(go_json(line) + b"\n")
        outcome = "completed" if failure is None else "error"
        await self.sim.last(responder, record, outcome, go_json(lines[-1]) + b"\n", chunked=True)

    async def copy(self, request: Request, responder: Responder, record: SimRecord) -> None:
        body = self.sim.decode(request, record, Api.NATIVE, "api.CopyRequest")
        source, destination = body.text("source"), body.text("destination")
        record.model = source
        if not source or not destination:
            raise Refusal(400, "source and destination are required", Api.NATIVE)
        model = self.sim.models.get(normalize_name(source))
        if model is None:
            raise Refusal(404, f'model "{source}" not found', Api.NATIVE)
        name = normalize_name(destination)
        self.sim.models[name] = replace(model, name=name)
        await self.sim.send(responder, record, 200, b"", None)

    async def delete(self, request: Request, responder: Responder, record: SimRecord) -> None:
        body = self.sim.decode(request, record, Api.NATIVE, "api.DeleteRequest")
        name = _named(body, record)
        if self.sim.models.pop(normalize_name(name), None) is None:
            raise Refusal(404, f"model '{name}' not found", Api.NATIVE)
        self.sim.unload(name)
        await self.sim.send(responder, record, 200, b"", None)

    async def v1_models(self, request: Request, responder: Responder, record: SimRecord) -> None:
        # Go marshals a list it never appended to as null.
        data = [openai_model(model.name, model) for model in self.sim.models.values()] or None
        body = go_json({"object": "list", "data": data}) + b"\n"
        await self.sim.send(responder, record, 200, body, OPENAI_JSON_CT)

    async def v1_model(self, request: Request, responder: Responder, record: SimRecord) -> None:
        record.model = urllib.parse.unquote(request.path[len("/v1/models/") :])
        model = find_model(self.sim.models, record.model, Api.OPENAI)
        body = go_json(openai_model(record.model, model)) + b"\n"
        await self.sim.send(responder, record, 200, body, OPENAI_JSON_CT)


def _named(body: Body, record: SimRecord) -> str:
    """``model``, or the deprecated ``name``; required."""
    record.model = body.text("model") or body.text("name")
    if not record.model:
        raise Refusal(400, "model is required", Api.NATIVE)
    return record.model
