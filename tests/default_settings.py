"""The gateway's default server and pool settings for tests that run one of them alone,
built as the gateway builds them (``app``) from a config of defaults: the config is
their one source."""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

from ollama_proxy.app import pool_settings as pool_from_config
from ollama_proxy.app import server_settings as from_config
from ollama_proxy.config import Config, load_config
from ollama_proxy.http.client import PoolSettings
from ollama_proxy.http.server import ServerSettings


@cache
def _defaults(upstream_url: str = "http://127.0.0.1:11434") -> Config:
    return load_config(None, env={}, upstream_urls=[upstream_url])


def server_settings(**overrides: Any) -> ServerSettings:
    """The ``[server]`` defaults, but ``overrides``."""
    return dataclasses.replace(from_config(_defaults().server), **overrides)


def pool_settings(port: int, **overrides: Any) -> PoolSettings:
    """The ``[upstream.NAME]`` defaults for a backend on 127.0.0.1:``port``, but ``overrides``."""
    upstream = _defaults(f"http://127.0.0.1:{port}").upstreams[0]
    return dataclasses.replace(pool_from_config(upstream), **overrides)
