"""The ``demo`` command: the gateway in front of the built-in simulated Ollama,
so a newcomer without a GPU sees it work, with examples to paste."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
from typing import Any

import trio

from ..access.keys import new_key
from ..app import Gateway
from ..config import Config, load_config
from ..errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable
from ..http.client import PoolSettings, UpstreamPool
from ..sim.server import Simulator, run_simulator
from ..store import accounts

log = logging.getLogger("ollama_proxy.demo")

# --traffic: these users each send a request every few seconds, so that the console's
# charts have something to show.
TRAFFIC_USERS = ("alice", "bob", "carol")
TRAFFIC_PAUSE_S = (1.0, 5.0)  # between two requests of one user, drawn uniformly
TRAFFIC_TIMEOUT_S = 120.0


def traffic_request(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """One request of the kinds a team sends: chats (mostly streamed), a generate,
    an embedding; answers of varied length."""
    tokens = rng.randint(5, 60)
    prompt = f"{rng.choice(PROMPTS)} [[sim:tokens={tokens}]]"
    model = rng.choice(("llama3.2", "llama3.2", "qwen3:4b"))
    kind = rng.choices(("chat", "openai", "generate", "embed"), weights=(4, 3, 1, 1))[0]
    messages = [{"role": "user", "content": prompt}]
    if kind == "chat":
        return "/api/chat", {"model": model, "messages": messages, "stream": rng.random() < 0.8}
    if kind == "openai":
        return "/v1/chat/completions", {"model": model, "messages": messages,
                                        "stream": rng.random() < 0.8}
    if kind == "generate":
        return "/api/generate", {"model": model, "prompt": prompt, "stream": True}
    return "/api/embed", {"model": "all-minilm", "input": [rng.choice(PROMPTS) for _ in range(3)]}


PROMPTS = ("Summarise this week's incident reports.", "Write a haiku about GPUs.",
           "Explain a hash join.", "Translate 'good morning' into French.",
           "Review this function for bugs.", "Draft a polite reminder email.")


async def user_traffic(host: str, port: int, key: str, seed: int) -> None:
    """Requests of one user to the gateway at ``host:port``, forever, a few seconds apart
    (the pause is the point: a gentle load; the demo's nursery ends it)."""
    rng = random.Random(seed)
    pool = UpstreamPool(PoolSettings(
        host=host, port=port, max_connections=1, connect_timeout_s=5.0,
        first_byte_timeout_s=TRAFFIC_TIMEOUT_S, chunk_gap_timeout_s=TRAFFIC_TIMEOUT_S, tls=None))
    headers = [(b"host", f"{host}:{port}".encode()), (b"authorization", f"Bearer {key}".encode()),
               (b"content-type", b"application/json")]
    await trio.sleep(rng.uniform(0.0, 1.0))  # not all at once
    while True:
        path, body = traffic_request(rng)
        try:
            data = json.dumps(body).encode()
            response = await pool.request(
                "POST", path, [*headers, (b"content-length", str(len(data)).encode())], data)
            try:
                await response.read_all(16 * 1024 * 1024)
            finally:
                await response.aclose()
            if response.status >= 400:
                log.info("demo traffic: %s answered %d", path, response.status)
        except (UpstreamUnreachable, UpstreamTimeout, UpstreamProtocolError) as exc:
            log.info("demo traffic: %s failed: %s", path, exc)
        except Exception:  # the demo's sample traffic never ends the demo
            log.exception("demo traffic: %s failed", path)
        await trio.sleep(rng.uniform(*TRAFFIC_PAUSE_S))


def examples(base: str, user_key: str, admin_key: str, traffic: bool = False) -> str:
    """Ready-to-paste calls against the gateway at ``base``."""
    auth = f"-H 'Authorization: Bearer {user_key}'"
    background = (f"\nBackground traffic: {', '.join(TRAFFIC_USERS)} each send a request every few "
                  "seconds.\n" if traffic else "")
    return f"""
ollama-proxy demo: gateway on {base}, in front of a simulated Ollama.
A throwaway database was made for this run, with two users:
  admin  (role admin) key {admin_key}
  demo   (role user)  key {user_key}

Web console: open {base}/admin in a browser and log in with one of these keys.
{background}
  curl {base}/api/chat {auth} -d '{{"model": "llama3.2", "messages": [{{"role": "user", "content": "Hello"}}]}}'
  curl {base}/v1/chat/completions {auth} -H 'Content-Type: application/json' \\
       -d '{{"model": "llama3.2", "stream": true, "messages": [{{"role": "user", "content": "Hello"}}]}}'
  curl {base}/api/tags {auth}
  curl {base}/v1/me {auth}
  curl {base}/admin/api/users -H 'Authorization: Bearer {admin_key}'
  curl {base}/admin/api/usage?group_by=model -H 'Authorization: Bearer {admin_key}'
  curl {base}/health

  python3 -c 'import ollama; c = ollama.Client(host="{base}", headers={{"Authorization": "Bearer {user_key}"}})
for part in c.chat(model="llama3.2", messages=[{{"role": "user", "content": "Hello"}}], stream=True):
    print(part.message.content, end="", flush=True)
print()'

  python3 -c 'import openai; o = openai.OpenAI(base_url="{base}/v1", api_key="{user_key}")
for chunk in o.chat.completions.create(model="llama3.2", stream=True,
        messages=[{{"role": "user", "content": "Hello"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()'

Every request's usage goes to the ledger (and an ollama_proxy.usage log line). Ctrl-C stops.
"""


def run_demo(args: argparse.Namespace) -> int:
    async def main() -> None:
        sim = Simulator(tokens_per_s=args.tokens_per_s, first_byte_delay_s=args.first_byte_delay_s)
        async with trio.open_nursery() as nursery:
            sim_host, sim_port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
            workdir = tempfile.mkdtemp(prefix="ollama-proxy-demo-")
            cleanup.append(workdir)

            def load() -> Config:  # also on reload: the throwaway database stays
                config = load_config(args.config, listen=args.listen,
                                     upstream_urls=[f"http://{sim_host}:{sim_port}"])
                return dataclasses.replace(config, server=dataclasses.replace(
                    config.server, database=os.path.join(workdir, "demo.db")))

            config = load()
            logging.basicConfig(level=getattr(logging, config.log.level.upper()),
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            admin_key = new_key()
            gateway = Gateway(config, admin_key=admin_key, loader=load)

            async def serve_then_stop(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                await gateway.run(handle_signals=True, task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: the simulator goes too

            host, port = await nursery.start(serve_then_stop)
            _, user_key = await gateway.store.call(
                accounts.create_user, gateway.secret, "demo", actor="demo")
            traffic_keys = [(await gateway.store.call(
                accounts.create_user, gateway.secret, name, actor="demo"))[1]
                for name in (TRAFFIC_USERS if args.traffic else ())]
            assert gateway.index is not None
            await gateway.index.reload()
            print(examples(f"http://{host}:{port}", user_key, admin_key, bool(traffic_keys)),
                  flush=True)
            target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
            for seed, key in enumerate(traffic_keys):
                nursery.start_soon(user_traffic, target, port, key, seed)

    cleanup: list[str] = []
    try:
        trio.run(main)
    finally:
        for path in cleanup:  # the throwaway database
            shutil.rmtree(path, ignore_errors=True)
    return 0
