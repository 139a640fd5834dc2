"""One user's limits as a value: the defaults from the config merged with the
user's overrides, validated (sans-IO). The arithmetic is in ``windows``, the
per-user counters in ``counters``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..errors import Forbidden
from ..isotime import iso

LIMIT_NAMES = (
    "requests_per_minute", "requests_per_day", "tokens_per_minute", "tokens_per_day",
    "token_quota", "quota_period", "max_concurrent", "max_tokens_per_request",
    "allowed_models", "expires_at", "weight",
)
QUOTA_PERIODS = ("total", "month")
MAX_WEIGHT = 1000.0


_INT_LIMITS = ("requests_per_minute", "requests_per_day", "tokens_per_minute", "tokens_per_day",
               "token_quota", "max_concurrent", "max_tokens_per_request")


def weight_problem(value: object) -> str | None:
    """Why ``value`` cannot be a weight (None: it can): one rule for the config, the
    admin API, the CLI and the stored limits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_WEIGHT:
        return f"must be a number > 0 and <= {MAX_WEIGHT:g}"  # NaN fails the range too
    return None


@dataclass(frozen=True, slots=True)
class Limits:
    """One user's resolved limits. ``None`` = unlimited, ``0`` = none allowed."""

    requests_per_minute: int | None = None
    requests_per_day: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    token_quota: int | None = None
    quota_period: str = "total"  # "total" or "month" (UTC calendar month)
    max_concurrent: int | None = None
    max_tokens_per_request: int | None = None
    allowed_models: tuple[str, ...] | None = None  # globs; () = no model
    expires_at: float | None = None  # Unix seconds
    # The user's share of GPU slots under contention: the fair queue divides the growth of
    # the user's token counter by it. Never a count, so not part of ``unbounded``.
    weight: float = 1.0
    # No count applies (the fast path of ``check``); derived, not a limit.
    unbounded: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unbounded",
                           all(getattr(self, name) is None for name in _INT_LIMITS))
        for name in _INT_LIMITS:
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"{name} must be a whole number >= 0 or null, not {value!r}")
        if self.quota_period not in QUOTA_PERIODS:
            raise ValueError(f"quota_period must be 'total' or 'month', not {self.quota_period!r}")
        models = self.allowed_models
        if models is not None:
            if isinstance(models, str) or not all(isinstance(g, str) for g in models):
                raise ValueError("allowed_models must be a list of glob strings or null")
            if not isinstance(models, tuple):
                object.__setattr__(self, "allowed_models", tuple(models))
        exp = self.expires_at
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, (int, float))):
            raise ValueError(f"expires_at must be Unix seconds or null, not {exp!r}")
        problem = weight_problem(self.weight)
        if problem is not None:
            raise ValueError(f"weight {problem}, not {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))

    @staticmethod
    def merged(defaults: Limits, overrides: Mapping[str, Any] | None) -> Limits:
        """``defaults`` with the non-null ``overrides`` applied (a null falls back
        to the default); ``overrides`` as the store keeps them (JSON values,
        ``expires_at`` in Unix seconds). Unknown names and bad values raise
        ``ValueError``."""
        if not overrides:
            return defaults
        unknown = sorted(set(overrides) - set(LIMIT_NAMES))
        if unknown:
            raise ValueError(f"unknown limit: {', '.join(unknown)}")
        values = {f.name: getattr(defaults, f.name) for f in fields(Limits) if f.init}
        for name, value in overrides.items():
            if value is None:
                continue
            if name == "allowed_models" and isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return Limits(**values)

    def expired(self, now: float) -> Forbidden | None:
        """The refusal of a user whose ``expires_at`` has come, else None: one rule and
        one answer for the proxied calls (``counters``) and the admin API."""
        if self.expires_at is not None and now >= self.expires_at:
            return Forbidden("this user expired (expires_at)", code="user_expired")
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in the names and shapes the admin API takes (``expires_at`` as ISO 8601)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in LIMIT_NAMES}
        if self.allowed_models is not None:
            out["allowed_models"] = list(self.allowed_models)
        out["expires_at"] = iso(self.expires_at)
        return out
