"""The ``[routing]`` settings as a value: read by the config, used by the backends and
the router (a value, so the config layer may import it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """``[routing]``: the defaults are the schema's (a test keeps them equal)."""

    refresh_s: float = 30.0
    health_interval_s: float = 5.0
    queue_timeout_s: float = 60.0
    max_queue: int = 256
    max_queued_per_user: int = 16
    eject_after_failures: int = 3
    eject_s: float = 30.0
    fair_queue: bool = True  # False: first come first served
