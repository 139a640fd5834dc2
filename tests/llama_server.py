"""A real llama-cpp-python server (0.3.36, a tiny random model) for end-to-end tests.

Where to find it: ``OLLAMA_PROXY_LLAMA_VENV`` and ``OLLAMA_PROXY_LLAMA_MODEL``, else
``/tmp/llama-venv`` and ``/tmp/tiny.gguf``. When they are missing and ``../shared/realup``
(next to the repository) exists, its ``setup.sh`` makes them: offline from a prebuilt
wheel, ~10-20 s, once (the venv is cached in /tmp; a file lock keeps two test processes
from building it at once), bounded by ``SETUP_TIMEOUT_S``. ``OLLAMA_PROXY_LLAMA_SETUP=0``
turns that off. Without either the tests skip and say why.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from child_process import Child

VENV = Path(os.environ.get("OLLAMA_PROXY_LLAMA_VENV", "/tmp/llama-venv"))
MODEL = Path(os.environ.get("OLLAMA_PROXY_LLAMA_MODEL", "/tmp/tiny.gguf"))
PYTHON = VENV / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
REALUP = Path(__file__).resolve().parents[2] / "shared" / "realup"
SETUP_TIMEOUT_S = 120.0  # ~10-20 s here; a cold pip cache on a loaded machine takes longer
STARTUP_S = 60.0  # the model loads in ~2.5 s; a loaded machine takes longer
LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def _setup() -> str | None:
    """Make the venv and the model with ``realup/setup.sh``; None, or why it could not."""
    if os.environ.get("OLLAMA_PROXY_LLAMA_SETUP", "1") == "0":
        return "OLLAMA_PROXY_LLAMA_SETUP=0 turned the automatic setup off"
    if not (REALUP / "setup.sh").exists():
        return f"{REALUP} does not exist (a fresh clone has no ../shared/realup)"
    with open(f"{VENV}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be building it
        if PYTHON.exists() and MODEL.exists():
            return None
        try:
            done = subprocess.run(["bash", str(REALUP / "setup.sh"), str(VENV), str(MODEL)],
                                  capture_output=True, text=True, timeout=SETUP_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"{REALUP}/setup.sh took more than {SETUP_TIMEOUT_S:g} s"
    if done.returncode != 0:
        return f"{REALUP}/setup.sh failed ({done.returncode}): {done.stderr[-800:]}"
    return None


def need_llama() -> None:
    """Skip the test, saying why, unless the server can be run."""
    if PYTHON.exists() and MODEL.exists():
        return
    problem = _setup()
    if problem is not None or not (PYTHON.exists() and MODEL.exists()):
        pytest.skip(f"no llama-cpp-python server: {PYTHON} or {MODEL} is missing and could not "
                    f"be made: {problem or 'setup.sh made neither'} (point "
                    "OLLAMA_PROXY_LLAMA_VENV / OLLAMA_PROXY_LLAMA_MODEL at a venv with "
                    "llama-cpp-python[server]==0.3.36 and a GGUF model)")


def run_llama(*extra: str) -> Iterator[str]:
    """The real server on an OS-chosen port (alias ``tiny``), its URL; reaped after."""
    need_llama()
    argv = [str(PYTHON), "-m", "llama_cpp.server", "--model", str(MODEL), "--model_alias",
            "tiny", "--host", "127.0.0.1", "--port", "0", "--n_ctx", "2048", "--n_threads", "1",
            *extra]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    with Child(argv, cwd=Path("/tmp"), env=env) as child:
        port = child.wait_match("stderr", LISTENING, STARTUP_S).group(1)
        yield f"http://127.0.0.1:{port}"
