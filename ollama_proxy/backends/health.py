"""One backend's health, sans-IO: what probes said, request failures in a row, ejection.

Two sources, kept apart on purpose. Probes (a cheap GET) say whether the server
answers at all: ``up``. Real requests say whether it does its job: after
``eject_after_failures`` request failures in a row it is ejected for ``eject_s``,
twice as long on each repeat up to ``MAX_EJECT_S``, because a backend that answers
health checks can still fail every generation (out of memory, a broken model).

Decisions:
- An ejection lasts its whole time; a good probe does not end it early (the probe
  already answered while requests failed). After it, the probe's word decides.
- Only a request's success resets the failures and the doubling; a probe's does not,
  else a backend that answers probes but fails requests would never be ejected longer.
- Failures reported while ejected (requests sent before the ejection) are not counted:
  they would eject it again, doubled, for one bad moment.
- ``eject_after_failures == 0`` never ejects.

Methods return whether a transition happened, so the trio shell logs it once.
"""

from __future__ import annotations

MAX_EJECT_S = 300.0
# 2.0 ** 64 times any sane eject_s is past MAX_EJECT_S: no float overflow on a long streak.
_MAX_DOUBLINGS = 64


class Health:
    """One backend's health: up/down from probes, failures in a row, ejection."""

    __slots__ = ("eject_after_failures", "eject_s", "up", "last_error", "failures", "ejections",
                 "ejected_until")

    def __init__(self, *, eject_after_failures: int, eject_s: float) -> None:
        if eject_after_failures < 0:
            raise ValueError("eject_after_failures must be >= 0")
        if eject_s < 0:
            raise ValueError("eject_s must be >= 0")
        self.eject_after_failures = eject_after_failures
        self.eject_s = eject_s
        self.up: bool | None = None  # None: not probed yet
        self.last_error: str | None = None
        self.failures = 0  # request-path failures in a row
        self.ejections = 0  # ejections in a row (the doubling); reset by a request's success
        self.ejected_until: float | None = None

    def ejected(self, now: float) -> bool:
        return self.ejected_until is not None and now < self.ejected_until

    def available(self, now: float) -> bool:
        """May requests go here: not known down, not ejected."""
        return self.up is not False and not self.ejected(now)

    def failed(self, now: float, error: str) -> bool:
        """A request to this backend failed; True when this ejected it."""
        self.last_error = error
        if self.ejected(now) or not self.eject_after_failures:
            return False
        self.failures += 1
        if self.failures < self.eject_after_failures:
            return False
        self.ejected_until = now + self.eject_for()
        self.ejections += 1
        self.failures = 0
        return True

    def eject_for(self) -> float:
        """How long the next ejection lasts, in seconds."""
        return min(self.eject_s * 2.0 ** min(self.ejections, _MAX_DOUBLINGS), MAX_EJECT_S)

    def succeeded(self) -> bool:
        """A request got a good answer: it is up, the streak is over. True when it was
        not up before (the shell logs "up"). Does not end an ejection (see above)."""
        was_up = self.up is True
        self.up = True
        self.last_error = None
        self.failures = 0
        self.ejections = 0
        return not was_up

    def probed(self, ok: bool, error: str | None, now: float) -> bool:
        """A health check's result; True when it turned up or down."""
        if self.ejected_until is not None and not self.ejected(now):
            self.ejected_until = None  # over: forget it
        changed = self.up is not ok
        self.up = ok
        self.last_error = None if ok else error
        return changed

    def describe(self, now: float) -> dict[str, object]:
        """For /admin/api/backends (JSON-able)."""
        until = self.ejected_until
        left = until - now if until is not None and now < until else 0.0
        return {
            "up": self.up is True,
            "ejected": left > 0,
            "ejected_for_s": round(left, 1),
            "failures_in_a_row": self.failures,
            "error": self.last_error,
        }
