"""An Ollama-native request for a model only an ``openai`` backend serves, with one
ollama backend next to it: a 404 in Ollama's shape that names the /v1 API, and the
ollama backend never sees the request (it is not "the only backend that answers for
itself": the model is known, just not to the native API)."""

from __future__ import annotations

import httpx
import trio

from gateway_stack import bearer, gateway_config, relayed, start_gateway
from ollama_proxy.sim.server import Simulator, run_simulator


async def test_native_chat_for_an_openai_only_model_is_a_404_naming_v1(nursery):
    with trio.fail_after(10):
        sims = [Simulator(), Simulator()]
        urls = []
        for sim in sims:
            host, port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
            urls.append(f"http://{host}:{port}")
        config = gateway_config(urls, env={"OLLAMA_PROXY_UPSTREAM_DEFAULT2_KIND": "openai",
                                           "OLLAMA_PROXY_UPSTREAM_DEFAULT2_MODELS": "tiny"})
        _, url, _, key = await start_gateway(nursery, config)
        async with httpx.AsyncClient(headers=bearer(key)) as client:
            reply = await client.post(url + "/api/chat", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 404
    assert reply.json() == {"error": "model 'tiny' is served only by OpenAI-compatible "
                                     "backends: use the /v1 API for it"}
    assert relayed(sims[0]) == [] and relayed(sims[1]) == []
