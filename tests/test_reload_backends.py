"""app.Gateway's reload of [upstream.NAME] sections: a backend at the same address with new
routing keys stays the same object (its requests in flight, slots in use, health and lists
kept: a new one would let its server take twice its slots); one moved, removed or added is
retired or made."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ollama_proxy.app import Gateway
from ollama_proxy.config import load_config


def write(tmp_path: Path, body: str) -> str:
    ini = tmp_path / "gateway.ini"
    ini.write_text(f"[server]\ndatabase = {tmp_path / 'g.db'}\n{body}")
    return str(ini)


async def test_new_routing_keys_change_the_running_backend(tmp_path: Path) -> None:
    first = load_config(write(tmp_path, "[upstream.a]\nurl = http://127.0.0.1:1\nslots = 1\n"
                                        "[upstream.b]\nurl = http://127.0.0.1:2\n"), env={})
    gateway = Gateway(first)
    a, b = gateway.backends.backends
    a.in_flight = a.requests = 1  # a request holds a's one slot
    second = load_config(write(tmp_path, "[upstream.a]\nurl = http://127.0.0.1:1\nslots = 2\n"
                                         "priority = 1\nmodels = llama*\nmax_model_gb = 8\n"
                                         "[upstream.c]\nurl = http://127.0.0.1:3\n"), env={})
    gateway._swap_backends(second)
    gateway.config = dataclasses.replace(gateway.config, upstreams=second.upstreams)
    kept, made = gateway.backends.backends
    assert kept is a and (kept.slots, kept.priority, kept.in_flight) == (2, 1, 1)
    assert (kept.catalogue.globs, kept.catalogue.max_model_bytes) == (("llama*",), 8 * 10**9)
    assert made.name == "c" and gateway.backends.retired == [b] and b.retired
    assert b.drained.is_set()  # nothing in flight: its connections may close now
    moved = load_config(write(tmp_path, "[upstream.a]\nurl = http://127.0.0.1:9\nslots = 2\n"
                                        "priority = 1\nmodels = llama*\nmax_model_gb = 8\n"
                                        "[upstream.c]\nurl = http://127.0.0.1:3\n"), env={})
    gateway._swap_backends(moved)
    now_a, now_c = gateway.backends.backends
    assert now_a is not a and now_c is made and a.retired and not a.drained.is_set()
    assert (now_a.in_flight, now_a.url) == (0, "http://127.0.0.1:9")
