"""The ``demo`` command: the gateway in front of the built-in simulated Ollama,
so a newcomer without a GPU sees it work, with examples to paste."""

from __future__ import annotations

import argparse
import logging

import trio

from .app import Gateway
from .config import load_config
from .simulator import Simulator, run_simulator


def examples(base: str) -> str:
    """Ready-to-paste calls against the gateway at ``base``."""
    return f"""
ollama-proxy demo: gateway on {base}, in front of a simulated Ollama.

  curl {base}/api/chat -d '{{"model": "llama3.2", "messages": [{{"role": "user", "content": "Hello"}}]}}'
  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "llama3.2", "stream": true, "messages": [{{"role": "user", "content": "Hello"}}]}}'
  curl {base}/api/tags
  curl {base}/health

  python3 -c 'import ollama; c = ollama.Client(host="{base}")
for part in c.chat(model="llama3.2", messages=[{{"role": "user", "content": "Hello"}}], stream=True):
    print(part.message.content, end="", flush=True)
print()'

  python3 -c 'import openai; o = openai.OpenAI(base_url="{base}/v1", api_key="unused")
for chunk in o.chat.completions.create(model="llama3.2", stream=True,
        messages=[{{"role": "user", "content": "Hello"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()'

Every request's usage is logged as an ollama_proxy.usage line. Ctrl-C stops.
"""


def run_demo(args: argparse.Namespace) -> int:
    async def main() -> None:
        sim = Simulator(tokens_per_s=args.tokens_per_s, first_byte_delay_s=args.first_byte_delay_s)
        async with trio.open_nursery() as nursery:
            sim_host, sim_port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
            config = load_config(args.config, listen=args.listen,
                                 upstream_urls=[f"http://{sim_host}:{sim_port}"])
            logging.basicConfig(level=getattr(logging, config.log.level.upper()),
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            gateway = Gateway(config)

            async def serve_then_stop(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                await gateway.run(handle_signals=True, task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: the simulator goes too

            host, port = await nursery.start(serve_then_stop)
            print(examples(f"http://{host}:{port}"), flush=True)

    trio.run(main)
    return 0
