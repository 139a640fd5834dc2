"""Same-run comparison: each workload against the simulator directly, through the
naive relay (bench/naive_relay.py, the yardstick), through the gateway and, with
--baseline, through another checkout's gateway; the gateway's ratios to each.

    python3 bench/compare.py [--quick] [--only NAME,...] [--json-out FILE] [--baseline PATH]
        [--fair-seconds S] [--fair-tokens N]

The simulator and the relays run as separate processes, pinned to different
cores when there are two (the relays on core 0, each measured while it alone
has load; simulator and load tool on core 1), so a relay's cost shows up as its
own CPU time (read from /proc) and its peak RSS (VmHWM, reset before each
workload). The machine is shared and noisy: read the ratios, not the absolute
figures.

Then the fairness workload (one backend with 2 slots, a flood from user A, user B's
time to first token, with the fair queue and first come first served) and what the
features cost (each on, off and on again, including routing across two backends).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def missing_modules(*names: str) -> list[str]:
    """The modules of ``names`` this Python cannot import."""
    import importlib.util
    return [name for name in names if importlib.util.find_spec(name) is None]


if __name__ == "__main__" and (_missing := missing_modules("trio", "h11")):
    sys.exit(f"bench/compare.py cannot import {', '.join(_missing)} (the gateway, "
             f"the simulator and the load tool run on them); install them with:\n"
             f"    {sys.executable} -m pip install -r {ROOT / 'tests' / 'requirements.txt'}")

from load import parse_args, run_load  # noqa: E402

sys.path.insert(0, str(ROOT))
from ollama_proxy.access.keys import new_key  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CHAT_5 = "hi [[sim:tokens=5]]"
# Default limits for every user, set high enough never to refuse a benchmark request but
# all counted: windows, a month quota, concurrency, and a cap injected into every body.
LIMITS_ON = {
    "OLLAMA_PROXY_LIMITS_REQUESTS_PER_MINUTE": "100000000",
    "OLLAMA_PROXY_LIMITS_REQUESTS_PER_DAY": "1000000000",
    "OLLAMA_PROXY_LIMITS_TOKENS_PER_MINUTE": "1000000000",
    "OLLAMA_PROXY_LIMITS_TOKENS_PER_DAY": "100000000000",
    "OLLAMA_PROXY_LIMITS_TOKEN_QUOTA": "1000000000000",
    "OLLAMA_PROXY_LIMITS_QUOTA_PERIOD": "month",
    "OLLAMA_PROXY_LIMITS_MAX_CONCURRENT": "100000",
    "OLLAMA_PROXY_LIMITS_MAX_TOKENS_PER_REQUEST": "4096",
}


# Every load comes from this one address: the per-address connection cap must not apply.
ONE_ADDRESS = {"OLLAMA_PROXY_SERVER_MAX_CONNECTIONS_PER_IP": "100000"}


@dataclass(frozen=True)
class Workload:
    name: str
    args: list[str]  # bench/load.py arguments, without --url
    gateway_only_memory: bool = False  # the figure that matters is the gateway's RSS


def workloads(quick: bool) -> list[Workload]:
    """The workloads: small requests, fast streams, paced streams, many idle streams;
    --quick shortens each."""
    scale = 0.25 if quick else 1.0
    n = lambda count: str(max(1, int(count * scale)))  # noqa: E731
    dur = lambda seconds: str(max(1.0, seconds * scale))  # noqa: E731
    return [
        Workload("small c=1", ["-n", n(2000), "-c", "1", "--prompt", CHAT_5]),
        Workload("small c=32", ["--duration", dur(6), "-c", "32", "--prompt", CHAT_5]),
        Workload("64 streams x 50 ndjson",
                 ["-n", n(640), "-c", "64", "--stream", "--prompt", "[[sim:tokens=50]]"]),
        Workload("64 streams x 50 sse",
                 ["-n", n(640), "-c", "64", "--stream", "--api", "openai",
                  "--prompt", "[[sim:tokens=50]]"]),
        Workload("128 streams @ 50 tok/s",
                 ["-n", n(512), "-c", "128", "--stream", "--chunk-delay",
                  "--prompt", "[[sim:tokens=100]] [[sim:rate=50]]"]),
        Workload("256 streams @ 50 tok/s",
                 ["-n", n(1024), "-c", "256", "--stream", "--chunk-delay",
                  "--prompt", "[[sim:tokens=100]] [[sim:rate=50]]"]),
        Workload("1000 idle streams",
                 ["-n", "1000", "-c", "1000", "--stream",
                  "--prompt", f"[[sim:tokens={int(20 * scale) or 1}]] [[sim:rate=2]]"],
                 gateway_only_memory=True),
    ]


class Process:
    """A child process whose stdout/stderr go to a file we can scan for its address."""

    def __init__(self, name: str, argv: list[str], ready: str, core: int | None,
                 env: dict[str, str] | None = None, cwd: pathlib.Path = ROOT) -> None:
        self.log = open(f"/tmp/ollama-proxy-bench-{name}-{os.getpid()}.log", "w+")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd,
                                     env={**os.environ, **(env or {})})
        if core is not None:
            os.sched_setaffinity(self.proc.pid, {core})
        self.address = self._wait_for(ready)

    def _wait_for(self, marker: str, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.log.seek(0)
            for line in self.log:
                if marker in line:
                    return line.split(marker, 1)[1].split()[0].rstrip(",")
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.log.seek(0)
        output = self.log.read()[-2000:]
        self.stop()
        raise RuntimeError(f"{self.proc.args} did not start:\n{output}")

    def cpu_s(self) -> float:
        fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def reset_peak_rss(self) -> None:
        pathlib.Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak_rss_mb(self) -> float:
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@dataclass(frozen=True)
class Target:
    """Where a workload's load goes: the simulator itself (no process of its own to
    measure) or a relay in front of it, whose CPU time and peak RSS are measured."""
    name: str  # direct, naive, gateway or baseline
    url: str
    process: Process | None = None


def run_workload(workload: Workload, targets: list[Target], key: str) -> dict:
    """The workload against each target in turn, in the order given."""
    args = ["--json", "--key", key, *workload.args]  # the simulator ignores the key, as Ollama does
    pair: dict = {"name": workload.name}
    for target in targets:
        if target.process is None:
            pair[target.name] = run_load(parse_args(["--url", target.url, *args]))
            continue
        target.process.reset_peak_rss()
        cpu_before = target.process.cpu_s()
        pair[target.name] = run_load(parse_args(["--url", target.url, *args]))
        pair[f"{target.name}_cpu_ms"] = (target.process.cpu_s() - cpu_before) * 1000
        pair[f"{target.name}_peak_rss_mb"] = target.process.peak_rss_mb()
    return pair


def _get(report: dict, *path: str) -> float | None:
    value: object = report
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return float(value)  # type: ignore[arg-type]


def figures(pair: dict, name: str) -> dict:
    """One target's own figures in one workload (CPU and RSS only for a relay)."""
    r = pair[name]
    cpu_ms = pair.get(f"{name}_cpu_ms")
    chunks = (r.get("chunks_per_s") or 0) * (r.get("duration_s") or 0)
    rss = pair.get(f"{name}_peak_rss_mb")
    return {
        "req_s": round(r.get("requests_per_s", 0), 1),
        "p50_ms": _get(r, "latency_ms", "p50"),
        "p99_ms": _get(r, "latency_ms", "p99"),
        "ttfb_p50_ms": _get(r, "ttfb_ms", "p50"),
        "chunks_s": round(r.get("chunks_per_s") or 0),
        "chunk_delay_p99_ms": _get(r, "chunk_delay_ms", "p99"),
        "cpu_ms_per_request": None if cpu_ms is None
        else round(cpu_ms / max(1, r.get("requests", 0)), 3),
        "cpu_ms_per_1000_chunks": round(cpu_ms / chunks * 1000, 2)
        if cpu_ms is not None and chunks else None,
        "peak_rss_mb": None if rss is None else round(rss, 1),
        "errors": {"status": r.get("status"), "broken": r.get("broken")},
    }


def versus(ours: dict, ref: dict) -> dict:
    """``ours`` against ``ref`` (both from ``figures``): ratios, and milliseconds added."""

    def ratio(key: str) -> float | None:
        a, b = ours.get(key), ref.get(key)
        return round(a / b, 3) if a is not None and b else None

    def added(key: str) -> float | None:
        a, b = ours.get(key), ref.get(key)
        return None if a is None or b is None else round(a - b, 3)

    return {"req_s_ratio": ratio("req_s"), "chunks_s_ratio": ratio("chunks_s"),
            "added_p50_ms": added("p50_ms"), "added_p99_ms": added("p99_ms"),
            "added_ttfb_p50_ms": added("ttfb_p50_ms"),
            "chunk_delay_p99_ratio": ratio("chunk_delay_p99_ms"),
            "cpu_ratio": ratio("cpu_ms_per_request")}


def summarise(pair: dict) -> dict:
    """The ratios and added costs this tool reports (the gateway against the
    simulator directly), then each other relay measured: its figures, and the gateway's
    against them."""
    d, g = figures(pair, "direct"), figures(pair, "gateway")
    vs = versus(g, d)
    row = {
        "workload": pair["name"],
        "throughput_ratio": vs["req_s_ratio"],
        "direct_req_s": d["req_s"],
        "gateway_req_s": g["req_s"],
        "added_p50_ms": vs["added_p50_ms"],
        "added_p99_ms": vs["added_p99_ms"],
        "added_ttfb_p50_ms": vs["added_ttfb_p50_ms"],
        "gateway_chunks_s": g["chunks_s"],
        "direct_chunks_s": d["chunks_s"],
        "chunk_delay_p99_ms": g["chunk_delay_p99_ms"],
        "direct_chunk_delay_p99_ms": d["chunk_delay_p99_ms"],
        "gateway_cpu_ms_per_request": g["cpu_ms_per_request"],
        "gateway_cpu_ms_per_1000_chunks": g["cpu_ms_per_1000_chunks"],
        "gateway_peak_rss_mb": g["peak_rss_mb"],
        "errors": {"direct": d["errors"]["status"], "gateway": g["errors"]["status"],
                   "broken": [d["errors"]["broken"], g["errors"]["broken"]]},
    }
    for name in ("naive", "baseline"):
        if name in pair:
            row[name] = figures(pair, name)
            row[f"gateway_vs_{name}"] = versus(g, row[name])
    return row


def problems(raw: list[dict]) -> list[str]:
    """The runs with answers other than 200 or broken connections: their figures measure
    something other than the workload (the 1,000 streams refused by the simulator's cap)."""
    out = []
    for pair in raw:
        for name in ("direct", "naive", "gateway", "baseline"):
            report = pair.get(name) or {}
            wrong = [f"{count} x {code}" for code, count in (report.get("status") or {}).items()
                     if code != "200" and count]
            if report.get("broken"):
                wrong.append(f"{report['broken']} broken")
            if wrong:
                out.append(f"warning: {pair['name']}, {name}: {', '.join(wrong)}")
    return out


def render(columns: list[tuple[str, int, tuple[str, ...]]], rows: list[dict]) -> str:
    """A fixed-width table: each column is (heading, width, the key path in a row)."""
    def cell(row: dict, path: tuple[str, ...]) -> str:
        value: object = row
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return "-" if value is None else str(value)

    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w, _) in enumerate(columns))]
    for row in rows:
        lines.append("  ".join(cell(row, path).rjust(w) if i else cell(row, path).ljust(w)
                               for i, (_, w, path) in enumerate(columns)))
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """The gateway against the simulator directly."""
    return render([("workload", 24, ("workload",)), ("direct/s", 9, ("direct_req_s",)),
                   ("gw/s", 9, ("gateway_req_s",)), ("ratio", 6, ("throughput_ratio",)),
                   ("+p50ms", 7, ("added_p50_ms",)), ("+p99ms", 7, ("added_p99_ms",)),
                   ("+ttfb", 7, ("added_ttfb_p50_ms",)), ("gw chk/s", 8, ("gateway_chunks_s",)),
                   ("dly p99", 8, ("chunk_delay_p99_ms",)),
                   ("d dly99", 8, ("direct_chunk_delay_p99_ms",)),
                   ("cpu/req", 7, ("gateway_cpu_ms_per_request",)),
                   ("cpu/1kc", 7, ("gateway_cpu_ms_per_1000_chunks",)),
                   ("RSS MB", 7, ("gateway_peak_rss_mb",))], rows)


def format_versus(rows: list[dict], name: str, short: str) -> str:
    """The gateway against another relay measured in the same run (``name`` in the rows):
    that relay's figures, the gateway's ratios to them (gw/x) and the milliseconds it adds."""
    mine, vs = (name,), (f"gateway_vs_{name}",)
    return render([("workload", 24, ("workload",)), (f"{short}/s", 9, (*mine, "req_s")),
                   (f"gw/{short}", 6, (*vs, "req_s_ratio")),
                   ("+p50ms", 7, (*vs, "added_p50_ms")), ("+p99ms", 7, (*vs, "added_p99_ms")),
                   ("+ttfb", 7, (*vs, "added_ttfb_p50_ms")),
                   (f"{short} chk/s", 8, (*mine, "chunks_s")),
                   (f"{short} dly99", 8, (*mine, "chunk_delay_p99_ms")),
                   (f"dly gw/{short}", 9, (*vs, "chunk_delay_p99_ratio")),
                   (f"{short} cpu/r", 8, (*mine, "cpu_ms_per_request")),
                   (f"{short} cpu/kc", 9, (*mine, "cpu_ms_per_1000_chunks")),
                   (f"cpu gw/{short}", 9, (*vs, "cpu_ratio")),
                   (f"{short} RSS", 7, (*mine, "peak_rss_mb"))], rows)


def chosen(only: str | None, name: str) -> bool:
    """Whether ``--only`` (comma-separated parts, each a substring) picks ``name``."""
    return not only or any(part and part in name for part in only.split(","))


def checkout(path: pathlib.Path) -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes), for the report."""
    proc = subprocess.run(["git", "-C", str(path), "describe", "--always", "--dirty"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a quarter of each workload")
    parser.add_argument("--only", help="comma-separated workload names (substring match)")
    parser.add_argument("--json-out", metavar="FILE", help="write all figures as JSON here")
    parser.add_argument("--gateway-arg", action="append", default=[],
                        help="extra argument for `serve` (repeatable; the baseline's too)")
    parser.add_argument("--baseline", metavar="PATH", type=pathlib.Path,
                        help="another checkout of this repository: its `serve` is measured on "
                             "the same workloads in the same run (not in the cost phase)")
    parser.add_argument("--fair-seconds", type=float, metavar="S",
                        help="how long user A floods in the fairness workload (default 20, "
                             "--quick 5; 1 for a smoke run)")
    parser.add_argument("--fair-tokens", type=int, default=20, metavar="N",
                        help="tokens in each stream of the fairness workload (default 20: 400 ms "
                             "at 50 tokens/s)")
    args = parser.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "ollama_proxy").is_dir():
        parser.error(f"--baseline {args.baseline}: no ollama_proxy package there")
    baseline = None if args.baseline is None else args.baseline.resolve()

    two_cores = len(os.sched_getaffinity(0)) >= 2
    selected = [w for w in workloads(args.quick) if chosen(args.only, w.name)]
    commits = {"gateway": checkout(ROOT),
               "baseline": None if baseline is None else checkout(baseline)}
    rows = []
    raw = []
    if selected:
        raw = measure_workloads(args, selected, baseline, two_cores)
        rows = [summarise(pair) for pair in raw]
        print(f"the gateway ({commits['gateway']}) against the simulator directly")
        print(format_table(rows))
        print("\nagainst the naive relay (bench/naive_relay.py, same core): gw/nv = gateway "
              "÷ naive, +ms = gateway − naive")
        print(format_versus(rows, "naive", "nv"))
        if baseline is not None:
            print(f"\nagainst the baseline {baseline} ({commits['baseline']}, same core): "
                  "gw/bl = ours ÷ baseline, +ms = ours − baseline")
            print(format_versus(rows, "baseline", "bl"))
        for line in problems(raw):
            print(line)
    fairness = None
    if chosen(args.only, "fairness"):
        fairness = measure_fairness(args, two_cores)
        print()
        print("\n".join(format_fairness(fairness)))
    costs = None
    costs_chosen = [c for c in COSTS if chosen(args.only, "cost") or chosen(args.only, c[0])]
    if costs_chosen:
        costs = measure_costs(args, two_cores, costs_chosen)
        print()
        for line in format_costs(costs):
            print(line)
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(
            {"commits": commits, "baseline": None if baseline is None else str(baseline),
             "summary": rows, "fairness": fairness, "costs": costs, "raw": raw}, indent=1))
    return 0


def measure_workloads(args: argparse.Namespace, selected: list[Workload],
                      baseline: pathlib.Path | None, two_cores: bool) -> list[dict]:
    """Each workload directly, through the naive relay, through the gateway and through
    the baseline if any, one after the other; every relay on the gateway's core."""
    relay_core = 0 if two_cores else None
    key = new_key()
    workdir = tempfile.mkdtemp(prefix="ollama-proxy-bench-")
    env = {"OLLAMA_PROXY_ADMIN_KEY": key,  # every feature on: keys, ledger, usage log, limits
           **LIMITS_ON, **ONE_ADDRESS}
    serve = [sys.executable, "-m", "ollama_proxy", "serve", "--listen", "127.0.0.1:0"]
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)

        def start(name: str, argv: list[str], ready: str, core: int | None, **options) -> Process:
            process = Process(name, argv, ready, core, **options)
            stack.callback(process.stop)
            return process

        sim = start("sim", [sys.executable, str(HERE / "sim_server.py")], "ready ",
                    1 if two_cores else None)
        sim_url = f"http://{sim.address}"
        upstream = ["--upstream", sim_url]
        targets = [Target("direct", sim_url)]
        naive = start("naive", [sys.executable, str(HERE / "naive_relay.py"),
                                "--listen", "127.0.0.1:0", *upstream], "listening on ", relay_core)
        targets.append(Target("naive", naive.address, naive))
        for name, cwd in (("gateway", ROOT), ("baseline", baseline)):
            if cwd is None:
                continue
            database = {"OLLAMA_PROXY_SERVER_DATABASE": os.path.join(workdir, f"{name}.db")}
            gateway = start(name, [*serve, *upstream, *args.gateway_arg], "listening on ",
                            relay_core, env={**env, **database}, cwd=cwd)
            targets.append(Target(name, gateway.address, gateway))
        if two_cores:  # the load tool shares the simulator's core; the relays have their own
            os.sched_setaffinity(0, {1})
        raw = []
        for workload in selected:
            print(f"... {workload.name}", file=sys.stderr, flush=True)
            raw.append(run_workload(workload, targets, key))
        return raw


# Features measured on and off in the same run: (name, workload, on, off); each side is the
# gateway to run ("serve"; "serve2": serve with two backends, a simulator each, both serving
# the model; or "bare": bare_gateway.py, the relay with no features) and its env.
SERVE, SERVE_TWO, BARE = "serve", "serve2", "bare"
ROUTING = "routing across two backends"
COSTS = [
    ("keys + ledger + usage log", "small c=32", (SERVE, {}), (BARE, {})),
    ("keys + ledger + usage log", "small c=1", (SERVE, {}), (BARE, {})),
    ("ledger durability", "small c=32",
     (SERVE, {"OLLAMA_PROXY_SERVER_LEDGER_WAIT": "true", **LIMITS_ON}),
     (SERVE, {"OLLAMA_PROXY_SERVER_LEDGER_WAIT": "false", **LIMITS_ON})),
    ("limits", "small c=32", (SERVE, LIMITS_ON), (SERVE, {})),
    ("limits", "small c=1", (SERVE, LIMITS_ON), (SERVE, {})),
    (ROUTING, "small c=32", (SERVE_TWO, LIMITS_ON), (SERVE, LIMITS_ON)),
    (ROUTING, "small c=1", (SERVE_TWO, LIMITS_ON), (SERVE, LIMITS_ON)),
]


def measure_costs(args: argparse.Namespace, two_cores: bool,
                  costs: list[tuple[str, str, tuple[str, dict], tuple[str, dict]]]
                  ) -> list[dict]:
    """Each feature's cost: the same workload through a gateway with it on, off, and on
    again (before and after, averaged, so drift cancels), all in this run."""
    by_name = {w.name: w for w in workloads(args.quick)}
    sims = [Process("sim", [sys.executable, str(HERE / "sim_server.py")], "ready ",
                    1 if two_cores else None)]
    if any(side[0] == SERVE_TWO for _, _, *sides in costs for side in sides):
        sims.append(Process("sim2", [sys.executable, str(HERE / "sim_server.py")], "ready ",
                            1 if two_cores else None))
    sim = sims[0]
    workdir = tempfile.mkdtemp(prefix="ollama-proxy-bench-")
    key = new_key()
    out = []
    try:
        for n, (feature, workload_name, on, off) in enumerate(costs):
            print(f"... cost of {feature} ({workload_name})", file=sys.stderr, flush=True)
            reports = []
            for i, (command, extra) in enumerate((on, off, on)):
                env = {"OLLAMA_PROXY_ADMIN_KEY": key, **extra, **ONE_ADDRESS,
                       "OLLAMA_PROXY_SERVER_DATABASE": os.path.join(workdir, f"{n}-{i}.db")}
                program = ([str(HERE / "bare_gateway.py")] if command == BARE
                           else ["-m", "ollama_proxy", "serve"])
                upstreams = [arg for one in (sims if command == SERVE_TWO else [sim])
                             for arg in ("--upstream", f"http://{one.address}")]
                gateway = Process(f"gateway-cost-{n}-{i}", [
                    sys.executable, *program, "--listen", "127.0.0.1:0", *upstreams],
                    "listening on ", 0 if two_cores else None, env)
                try:
                    reports.append(run_load(parse_args([
                        "--url", gateway.address, "--json", "--key", key,
                        *by_name[workload_name].args])))
                finally:
                    gateway.stop()
            on = [reports[0], reports[2]]
            on_rps = sum(r["requests_per_s"] for r in on) / 2
            on_p50 = sum(r["latency_ms"]["p50"] for r in on) / 2
            off_rps, off_p50 = reports[1]["requests_per_s"], reports[1]["latency_ms"]["p50"]
            out.append({"feature": feature, "workload": workload_name,
                        "on_req_s": round(on_rps, 1), "off_req_s": round(off_rps, 1),
                        "throughput_cost_pct": round(100 * (1 - on_rps / off_rps), 1),
                        "on_p50_ms": round(on_p50, 3), "off_p50_ms": round(off_p50, 3),
                        "added_p50_ms": round(on_p50 - off_p50, 3)})
    finally:
        for one in sims:
            one.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def format_costs(costs: list[dict]) -> list[str]:
    return [f"cost of {c['feature']} ({c['workload']}): {c['on_req_s']:.0f} vs "
            f"{c['off_req_s']:.0f} req/s on/off ({c['throughput_cost_pct']:.1f} %), p50 "
            f"{c['on_p50_ms']:.3f} vs {c['off_p50_ms']:.3f} ms ({c['added_p50_ms']:+.3f})"
            for c in costs]


# The fairness workload (issue 11): one simulated backend at FAIR_RATE tokens/s behind a
# gateway with [upstream] slots = FAIR_SLOTS; user A keeps FAIR_FLOOD streams in flight, user
# B sends one stream at a time; once with the fair queue, once first come first served.
FAIR_SLOTS, FAIR_RATE, FAIR_FLOOD = 2, 50.0, 16
FAIR_MODES = (("fair", "true"), ("fifo", "false"))
USER_A, USER_B = "user-a", "user-b"  # the prompts' first words: the simulator's trace tags


def admin(url: str, key: str, method: str, path: str, body: dict | None = None) -> Any:
    """One admin API call with ``key``; its JSON answer."""
    request = urllib.request.Request(
        url + path, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def stream_args(url: str, key: str, user: str, tokens: int, c: int) -> list[str]:
    """bench/load.py's arguments for ``c`` streams of ``tokens`` tokens, sent by ``user``."""
    return ["--url", url, "--key", key, "--json", "-c", str(c), "--workers", "1", "--stream",
            "--prompt", f"{user} [[sim:tokens={tokens}]]"]


def wait_for_flood(url: str, key: str, timeout_s: float = 30.0) -> None:
    """Until the backend's slots are all taken and the rest of the flood waits in the queue."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = admin(url, key, "GET", "/admin/api/backends")
        if (answer["backends"][0]["in_flight"] >= FAIR_SLOTS
                and answer["queued"] >= FAIR_FLOOD - FAIR_SLOTS - 1):
            return
        time.sleep(0.01)
    raise RuntimeError(f"user A's {FAIR_FLOOD} streams did not fill the queue in {timeout_s} s")


def slot_use(trace: list[dict], start: float, end: float) -> dict:
    """Who held the backend's slots between ``start`` and ``end`` (the simulator's trace):
    slot-seconds per user, A's share of those used, the share of all the slots' time that
    was used (the rest idled while A's streams waited), the most requests the backend had
    at once (the slots; one more when a request began at the simulator in the instant
    between its last write and its end stamp), and how long one of A's generations held a slot."""
    held: dict[str, float] = {}
    steps = []
    for span in trace:
        a, b = max(span["start"], start), min(span["end"], end)
        if b > a:
            held[span["tag"]] = held.get(span["tag"], 0.0) + b - a
            steps += [(a, 1), (b, -1)]
    whole = sorted(span["end"] - span["start"] for span in trace
                   if span["tag"] == USER_A and start <= span["start"] and span["end"] <= end)
    level = peak = 0
    for _, step in sorted(steps):  # at the same instant an end (-1) sorts before a start
        level += step
        peak = max(peak, level)
    used, capacity = sum(held.values()), FAIR_SLOTS * (end - start)
    return {"window_s": round(end - start, 3),
            "slot_seconds": {tag: round(seconds, 3) for tag, seconds in sorted(held.items())},
            "a_share": round(held.get(USER_A, 0.0) / used, 3) if used else None,
            "utilisation": round(used / capacity, 4) if capacity else None,
            "idle_slot_s": round(capacity - used, 3), "peak_in_flight": peak,
            "a_generation_p50_ms": round(whole[len(whole) // 2] * 1000, 1) if whole else None}


def bad_answers(report: dict) -> int:
    """Answers other than 200, and broken streams, in a load report."""
    return sum(count for code, count in (report.get("status") or {}).items()
               if code != "200") + (report.get("broken") or 0)


def fairness_run(url: str, admin_key: str, seconds: float, tokens: int,
                 trace_path: str) -> dict:
    """B alone, then B while A floods (A started first, B measured once the queue is full);
    the slots' use in B's window from the simulator's trace."""
    keys = {user: admin(url, admin_key, "POST", "/admin/api/users",
                        {"name": user, "limits": {}})["key"] for user in (USER_A, USER_B)}
    b_args = stream_args(url, keys[USER_B], USER_B, tokens, 1)
    alone = run_load(parse_args([*b_args, "--duration", str(max(0.2, seconds / 5))]))
    flood = subprocess.Popen(  # stopped with SIGINT: its streams in flight end, then it reports
        [sys.executable, str(HERE / "load.py"),
         *stream_args(url, keys[USER_A], USER_A, tokens, FAIR_FLOOD),
         "--duration", str(seconds + 600)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        wait_for_flood(url, admin_key)
        start = time.monotonic()
        flooded = run_load(parse_args([*b_args, "--duration", str(seconds)]))
        end = time.monotonic()
    finally:
        if flood.poll() is None:
            flood.send_signal(signal.SIGINT)
        out, err = flood.communicate(timeout=120)
    if flood.returncode != 0:
        raise RuntimeError(f"user A's load failed ({flood.returncode}):\n{err[-2000:]}")
    a = json.loads(out)
    trace = [json.loads(line) for line in pathlib.Path(trace_path).read_text().splitlines()]
    use = slot_use(trace, start, end)
    return {
        "b_alone_ttft_p50_ms": alone["ttft_ms"]["p50"], "b_alone_ttft_p99_ms": alone["ttft_ms"]["p99"],
        "b_ttft_p50_ms": flooded["ttft_ms"]["p50"], "b_ttft_p99_ms": flooded["ttft_ms"]["p99"],
        "b_added_p50_ms": None if None in (flooded["ttft_ms"]["p50"], alone["ttft_ms"]["p50"])
        else round(flooded["ttft_ms"]["p50"] - alone["ttft_ms"]["p50"], 3),
        "b_requests": flooded["requests"], "b_alone_requests": alone["requests"],
        "a_requests": a["requests"], **use,
        "errors": {"a": bad_answers(a), "b_alone": bad_answers(alone),
                   "b": bad_answers(flooded)},
        "raw": {"a": a, "b_alone": alone, "b": flooded},
    }


def measure_fairness(args: argparse.Namespace, two_cores: bool) -> dict:
    """The fairness workload with the fair queue, then first come first served: one
    simulator (its trace in a file), a fresh gateway and ledger for each."""
    seconds = args.fair_seconds or (5.0 if args.quick else 20.0)
    tokens = args.fair_tokens
    workdir = tempfile.mkdtemp(prefix="ollama-proxy-bench-")
    trace = os.path.join(workdir, "trace.jsonl")
    key = new_key()
    result: dict = {"slots": FAIR_SLOTS, "tokens_per_s": FAIR_RATE, "tokens": tokens,
                    "flood_streams": FAIR_FLOOD, "seconds": seconds,
                    "generation_ms": round(tokens / FAIR_RATE * 1000, 1), "modes": {}}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        sim = Process("sim-fair", [sys.executable, str(HERE / "sim_server.py"),
                                   "--tokens-per-s", str(FAIR_RATE), "--trace", trace],
                      "ready ", 1 if two_cores else None)
        stack.callback(sim.stop)
        if two_cores:  # the load tool shares the simulator's core; the gateway has its own
            os.sched_setaffinity(0, {1})
        for mode, fair_queue in FAIR_MODES:
            print(f"... fairness, {mode}", file=sys.stderr, flush=True)
            env = {"OLLAMA_PROXY_ADMIN_KEY": key, **LIMITS_ON, **ONE_ADDRESS,
                   "OLLAMA_PROXY_SERVER_DATABASE": os.path.join(workdir, f"{mode}.db"),
                   "OLLAMA_PROXY_UPSTREAM_DEFAULT_SLOTS": str(FAIR_SLOTS),
                   "OLLAMA_PROXY_ROUTING_FAIR_QUEUE": fair_queue}
            gateway = Process(f"gateway-{mode}", [
                sys.executable, "-m", "ollama_proxy", "serve", "--listen", "127.0.0.1:0",
                "--upstream", f"http://{sim.address}"], "listening on ",
                0 if two_cores else None, env)
            try:
                result["modes"][mode] = fairness_run(gateway.address, key, seconds, tokens,
                                                     trace)
            finally:
                gateway.stop()
    return result


def format_fairness(fairness: dict) -> list[str]:
    """The fairness table, and B's time to first token against the target."""
    rows = [{"mode": mode, **figures} for mode, figures in fairness["modes"].items()]
    for row in rows:
        row["errors_all"] = sum(row["errors"].values())
        row["a_slot_s"] = row["slot_seconds"].get(USER_A)
        row["b_slot_s"] = row["slot_seconds"].get(USER_B)
    lines = [f"fairness: one backend with {fairness['slots']} slots at "
             f"{fairness['tokens_per_s']:g} tokens/s; user A keeps {fairness['flood_streams']} "
             f"streams of {fairness['tokens']} tokens in flight, user B sends one at a time, "
             f"{fairness['seconds']:g} s (one generation {fairness['generation_ms']:g} ms); "
             "TTFT in ms, slot time in s",
             render([("mode", 5, ("mode",)), ("B alone p50", 11, ("b_alone_ttft_p50_ms",)),
                     ("p99", 8, ("b_alone_ttft_p99_ms",)), ("B flood p50", 11, ("b_ttft_p50_ms",)),
                     ("p99", 8, ("b_ttft_p99_ms",)), ("+p50", 8, ("b_added_p50_ms",)),
                     ("B reqs", 6, ("b_requests",)), ("A reqs", 6, ("a_requests",)),
                     ("A slot s", 8, ("a_slot_s",)), ("B slot s", 8, ("b_slot_s",)),
                     ("A share", 7, ("a_share",)), ("used", 6, ("utilisation",)),
                     ("idle s", 6, ("idle_slot_s",)), ("peak", 4, ("peak_in_flight",)),
                     ("A gen ms", 8, ("a_generation_p50_ms",)),
                     ("errors", 6, ("errors_all",))], rows)]
    target = [f"{row['mode']} {row['b_ttft_p50_ms']}" for row in rows]
    alone = [row["b_alone_ttft_p50_ms"] for row in rows]
    lines.append(f"target: B's TTFT p50 under the flood <= B alone ({', '.join(map(str, alone))}"
                 f") + one generation ({fairness['generation_ms']:g}): {', '.join(target)} ms")
    return lines


if __name__ == "__main__":
    sys.exit(main())
