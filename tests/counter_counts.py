"""What one user's counters hold at a moment, as one dict that tests compare."""

from __future__ import annotations

from ollama_proxy.access.counters import UserCounters


def counts(uc: UserCounters, now: float) -> dict[str, int]:
    """Requests and tokens in each window, the quota's total and month, requests in flight."""
    return {"requests_minute": uc.rpm.used(now), "requests_day": uc.rpd.used(now),
            "tokens_minute": uc.tpm.used(now), "tokens_day": uc.tpd.used(now),
            "tokens_total": uc.quota.used(now, "total"),
            "tokens_month": uc.quota.used(now, "month"), "in_flight": uc.in_flight}
