"""What the strict request-body checks cost, against plain ``json.loads``.

    python3 bench/body_decode.py [--rounds N]

For each body: ``json.loads`` (what the gateway did before), the strict
decoder alone (``jsonbody.decode_object``: depth scan, UTF-8, duplicate and
case-folded keys) and the whole check of a proxied body (``body_rules.parse_body``:
the decoder plus spellings and types). Figures are the best of several rounds
(the machine is shared), in microseconds per body.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import sys
import timeit
from functools import partial
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ollama_proxy.api.body_rules import parse_body  # noqa: E402
from ollama_proxy.api.jsonbody import decode_object  # noqa: E402
from ollama_proxy.api.routes import ROUTES  # noqa: E402


def chat(messages: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"model": "llama3.2", "messages": messages, "stream": True,
                       "options": {"temperature": 0.2, "num_predict": 200}, **extra}).encode()


def bodies() -> list[tuple[str, bytes]]:
    words = "Why is the sky blue? Explain it to a child, in a few short sentences. "
    small = chat([{"role": "system", "content": "You are a helpful assistant. " * 8},
                  {"role": "user", "content": words * 8}])
    long_chat = chat([{"role": ("user", "assistant")[i % 2], "content": words * 3}
                      for i in range(100)])
    image = base64.b64encode(os.urandom(15 * 1024 * 1024)).decode()
    big = chat([{"role": "user", "content": "What is in this picture?", "images": [image]}])
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": words,
              "parameters": {"type": "object", "properties": {
                  "city": {"type": "string"}, "days": {"type": "integer"}}}}}
             for i in range(20)]
    with_tools = chat([{"role": "user", "content": "Caf\u00e9 \u65e5\u672c\u8a9e? " + words}],
                      tools=tools)
    return [("1 KB chat", small), ("100-message chat", long_chat),
            ("chat + 20 tools (non-ASCII)", with_tools), ("20 MB image chat", big)]


def best_us(fns: list[Callable[[], object]], rounds: int, budget_s: float = 0.1) -> list[float]:
    """Best time of one call of each function; rounds interleave them, so the
    shared machine's drift falls on all alike."""
    numbers = []
    for fn in fns:
        start = timeit.default_timer()
        fn()
        numbers.append(max(1, int(budget_s / max(timeit.default_timer() - start, 1e-7))))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for index, (fn, number) in enumerate(zip(fns, numbers)):
            took = timeit.timeit(fn, number=number) / number * 1e6
            best[index] = min(best[index], took)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    route = ROUTES["/api/chat"]
    print(f"{'body':30} {'bytes':>10} {'json.loads':>12} {'strict':>12} {'parse_body':>12}"
          f" {'strict/loads':>13}")
    for name, raw in bodies():
        loads, strict, parsed = best_us([partial(json.loads, raw), partial(decode_object, raw),
                                         partial(parse_body, route, raw)], args.rounds)
        print(f"{name:30} {len(raw):>10,} {loads:>10.1f}us {strict:>10.1f}us {parsed:>10.1f}us"
              f" {strict / loads:>13.2f}")


if __name__ == "__main__":
    main()
