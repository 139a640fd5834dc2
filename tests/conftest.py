"""Shared fixtures (the stack itself lives in gateway_stack.py, importable by tests)."""

from __future__ import annotations

import os

import pytest
import trio

from gateway_stack import Stack, start_stack

# The official clients honour HTTP(S)_PROXY; loopback must never go through one.
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ.pop("OLLAMA_HOST", None)


@pytest.fixture
async def stack(nursery: trio.Nursery) -> Stack:
    return await start_stack(nursery)
