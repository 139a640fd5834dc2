"""The ``demo`` command: the gateway in front of the built-in simulated Ollama,
so a newcomer without a GPU sees it work, with examples to paste."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import tempfile

import trio

from ..access.keys import new_key
from ..app import Gateway
from ..config import Config, load_config
from ..sim.server import Simulator, run_simulator
from ..store import accounts


def examples(base: str, user_key: str, admin_key: str) -> str:
    """Ready-to-paste calls against the gateway at ``base``."""
    auth = f"-H 'Authorization: Bearer {user_key}'"
    return f"""
ollama-proxy demo: gateway on {base}, in front of a simulated Ollama.
A throwaway database was made for this run, with two users:
  admin  (role admin) key {admin_key}
  demo   (role user)  key {user_key}

Web console: open {base}/admin in a browser and log in with one of these keys.

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
            assert gateway.index is not None
            await gateway.index.reload()
            print(examples(f"http://{host}:{port}", user_key, admin_key), flush=True)

    cleanup: list[str] = []
    try:
        trio.run(main)
    finally:
        for path in cleanup:  # the throwaway database
            shutil.rmtree(path, ignore_errors=True)
    return 0
