"""bench/compare.py's fairness workload: a very short run has the report's shape (the
figures themselves are for bench/README.md, not for a test), and how the simulator's trace
is read into slot-seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import compare  # noqa: E402

MODE_KEYS = {"b_alone_ttft_p50_ms", "b_alone_ttft_p99_ms", "b_ttft_p50_ms", "b_ttft_p99_ms",
             "b_added_p50_ms", "b_requests", "b_alone_requests", "a_requests", "window_s",
             "slot_seconds", "a_share", "utilisation", "idle_slot_s", "peak_in_flight",
             "a_generation_p50_ms", "errors", "raw"}


def test_a_short_fairness_run_reports_both_modes(tmp_path: Path) -> None:
    """Half a second of flood with 2-token streams, fair queue and FIFO: each mode has B's
    time to first token alone and flooded, both users' slot-seconds and no errors."""
    out = tmp_path / "fair.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compare.py"), "--only", "fairness",
         "--fair-seconds", "0.5", "--fair-tokens", "2", "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert (report["summary"], report["costs"]) == ([], None)
    fairness = report["fairness"]
    assert {k: fairness[k] for k in ("slots", "tokens_per_s", "tokens", "flood_streams",
                                     "seconds", "generation_ms")} == {
        "slots": 2, "tokens_per_s": 50.0, "tokens": 2, "flood_streams": 16, "seconds": 0.5,
        "generation_ms": 40.0}
    assert list(fairness["modes"]) == ["fair", "fifo"]
    for mode in fairness["modes"].values():
        assert set(mode) == MODE_KEYS
        assert set(mode["slot_seconds"]) == {"user-a", "user-b"}
        assert mode["errors"] == {"a": 0, "b_alone": 0, "b": 0}
        assert mode["b_requests"] >= 1 and mode["b_alone_requests"] >= 1
        assert isinstance(mode["peak_in_flight"], int) and mode["window_s"] > 0
        assert set(mode["raw"]) == {"a", "b_alone", "b"}
    table = proc.stdout.splitlines()
    assert [line.split()[0] for line in table if line.startswith(("fair ", "fifo "))] == [
        "fair", "fifo"]
    assert any(line.startswith("target: B's TTFT p50") for line in table)


def test_slot_seconds_are_cut_to_the_window() -> None:
    """Spans are counted inside the window only; the share is of the slot time used, the
    utilisation of all the slots' time; the peak counts requests held at once (one ending
    as another starts is not two)."""
    trace = [{"tag": "user-a", "start": 0.0, "end": 2.0},  # 1 s inside
             {"tag": "user-a", "start": 2.0, "end": 3.0},  # whole: 1 s
             {"tag": "user-b", "start": 1.5, "end": 2.5},  # whole: 1 s
             {"tag": "user-a", "start": 3.0, "end": 5.0},  # 0 s: ends at the window's end...
             {"tag": "user-b", "start": 9.0, "end": 9.5}]  # ... and after it
    use = compare.slot_use(trace, 1.0, 3.0)
    assert use == {"window_s": 2.0, "slot_seconds": {"user-a": 2.0, "user-b": 1.0},
                   "a_share": round(2 / 3, 3), "utilisation": 0.75, "idle_slot_s": 1.0,
                   "peak_in_flight": 2, "a_generation_p50_ms": 1000.0}
