"""A child process for end-to-end tests: stdout and stderr drained line by line
by threads (a chatty log can never fill a pipe), waits bounded, always reaped."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Callable


class Child:
    """Use as a context manager: on the way out it is killed if still running, then waited for."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str],
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, preexec_fn=preexec_fn,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace",
        )
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._queues: dict[str, queue.Queue[str | None]] = {"stdout": queue.Queue(),
                                                             "stderr": queue.Queue()}
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [threading.Thread(target=self._drain, args=(name, pipe), daemon=True)
                         for name, pipe in (("stdout", self.proc.stdout),
                                            ("stderr", self.proc.stderr))]
        for thread in self._threads:
            thread.start()

    def _drain(self, name: str, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines[name].append(line)
            self._queues[name].put(line)
        self._queues[name].put(None)

    def text(self, name: str) -> str:
        return "".join(self.lines[name])

    def describe(self) -> str:
        return (f"exit code {self.proc.poll()}\n--- stdout\n{self.text('stdout')}"
                f"--- stderr\n{self.text('stderr')[-4000:]}")

    def wait_match(self, name: str, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        """The first match of ``pattern`` on a line of ``name`` not read before."""
        deadline = time.monotonic() + timeout_s
        lines = self._queues[name]
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise AssertionError(f"no {pattern.pattern!r} on {name} within {timeout_s} s\n"
                                     + self.describe()) from None
            if line is None:
                raise AssertionError(f"{name} closed before {pattern.pattern!r}\n"
                                     + self.describe())
            match = pattern.search(line)
            if match:
                return match

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)

    def terminate(self, timeout_s: float) -> int:
        """SIGTERM, then the exit code (within ``timeout_s``) with all output read."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        self._join()
        return code

    def kill(self, timeout_s: float) -> int:
        """SIGKILL: no drain, no flush, no atexit."""
        self.proc.kill()
        code = self.proc.wait(timeout=timeout_s)
        self._join()
        return code

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._join()
