"""Every tool in bench/ starts: its imports still name modules that exist (a reshaped
package once left ``ledger_scale.py`` importing what had moved, unseen until it was run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "__init__.py")


def test_the_list_is_not_empty():
    assert {"compare.py", "ledger_scale.py", "body_attack.py", "load.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_bench_tool_answers_help(script: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=BENCH.parent,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
