"""Same-run comparison: each workload against the simulator directly, then
through the gateway, and the ratios between the two.

    python3 bench/compare.py [--quick] [--only NAME,...] [--json-out FILE]

The simulator and the gateway run as separate processes, pinned to different
cores when there are two (gateway on core 0; simulator and load tool on core
1), so the gateway's cost shows up as its own CPU time (read from /proc) and
its peak RSS (VmHWM, reset before each workload). The machine is shared and
noisy: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import sys
import time
from dataclasses import dataclass

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
    """The workloads of the benchmark issue; --quick shortens each."""
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


def run_pair(workload: Workload, sim_url: str, gateway: Process, gateway_url: str,
             key: str) -> dict:
    args = ["--json", "--key", key, *workload.args]  # the simulator ignores the key, as Ollama does
    direct = run_load(parse_args(["--url", sim_url, *args]))
    gateway.reset_peak_rss()
    cpu_before = gateway.cpu_s()
    via = run_load(parse_args(["--url", gateway_url, *args]))
    cpu_ms = (gateway.cpu_s() - cpu_before) * 1000
    return {"name": workload.name, "direct": direct, "gateway": via,
            "gateway_cpu_ms": cpu_ms, "gateway_peak_rss_mb": gateway.peak_rss_mb()}


def _get(report: dict, *path: str) -> float | None:
    value: object = report
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return float(value)  # type: ignore[arg-type]


def summarise(pair: dict) -> dict:
    """The ratios and added costs the benchmark issue asks for."""
    d, g = pair["direct"], pair["gateway"]
    requests = max(1, g.get("requests", 0))
    chunks = (g.get("chunks_per_s") or 0) * (g.get("duration_s") or 0)

    def diff(*path: str) -> float | None:
        a, b = _get(g, *path), _get(d, *path)
        return None if a is None or b is None else round(a - b, 3)

    return {
        "workload": pair["name"],
        "throughput_ratio": round(g["requests_per_s"] / d["requests_per_s"], 3)
        if d.get("requests_per_s") else None,
        "direct_req_s": round(d.get("requests_per_s", 0), 1),
        "gateway_req_s": round(g.get("requests_per_s", 0), 1),
        "added_p50_ms": diff("latency_ms", "p50"),
        "added_p99_ms": diff("latency_ms", "p99"),
        "added_ttfb_p50_ms": diff("ttfb_ms", "p50"),
        "gateway_chunks_s": round(g.get("chunks_per_s") or 0),
        "direct_chunks_s": round(d.get("chunks_per_s") or 0),
        "chunk_delay_p99_ms": _get(g, "chunk_delay_ms", "p99"),
        "direct_chunk_delay_p99_ms": _get(d, "chunk_delay_ms", "p99"),
        "gateway_cpu_ms_per_request": round(pair["gateway_cpu_ms"] / requests, 3),
        "gateway_cpu_ms_per_1000_chunks": round(pair["gateway_cpu_ms"] / chunks * 1000, 2)
        if chunks else None,
        "gateway_peak_rss_mb": round(pair["gateway_peak_rss_mb"], 1),
        "errors": {"direct": d.get("status"), "gateway": g.get("status"),
                   "broken": [d.get("broken"), g.get("broken")]},
    }


def format_table(rows: list[dict]) -> str:
    cols = [("workload", 24), ("direct_req_s", 9), ("gateway_req_s", 9), ("throughput_ratio", 6),
            ("added_p50_ms", 7), ("added_p99_ms", 7), ("added_ttfb_p50_ms", 7),
            ("gateway_chunks_s", 8), ("chunk_delay_p99_ms", 8), ("direct_chunk_delay_p99_ms", 8),
            ("gateway_cpu_ms_per_request", 7), ("gateway_cpu_ms_per_1000_chunks", 7),
            ("gateway_peak_rss_mb", 7)]
    heads = ["workload", "direct/s", "gw/s", "ratio", "+p50ms", "+p99ms", "+ttfb", "gw chk/s",
             "dly p99", "d dly99", "cpu/req", "cpu/1kc", "RSS MB"]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, (_, w)) in enumerate(zip(heads, cols)))]
    for row in rows:
        cells = []
        for i, (key, width) in enumerate(cols):
            value = row.get(key)
            text = "-" if value is None else str(value)
            cells.append(text.ljust(width) if i == 0 else text.rjust(width))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a quarter of each workload")
    parser.add_argument("--only", help="comma-separated workload names (substring match)")
    parser.add_argument("--json-out", metavar="FILE", help="write all figures as JSON here")
    parser.add_argument("--gateway-arg", action="append", default=[],
                        help="extra argument for `serve` (repeatable)")
    args = parser.parse_args(argv)

    two_cores = len(os.sched_getaffinity(0)) >= 2
    sim = Process("sim", [sys.executable, str(HERE / "sim_server.py")], "ready ",
                  1 if two_cores else None)
    sim_url = f"http://{sim.address}"
    key = new_key()
    workdir = tempfile.mkdtemp(prefix="ollama-proxy-bench-")
    env = {"OLLAMA_PROXY_ADMIN_KEY": key,  # every feature on: keys, ledger, usage log, limits
           "OLLAMA_PROXY_SERVER_DATABASE": os.path.join(workdir, "bench.db"), **LIMITS_ON,
           **ONE_ADDRESS}
    gateway = Process("gateway", [sys.executable, "-m", "ollama_proxy", "serve",
                                  "--listen", "127.0.0.1:0", "--upstream", sim_url,
                                  *args.gateway_arg],
                      "listening on ", 0 if two_cores else None, env)
    gateway_url = gateway.address
    if two_cores:  # the load tool shares the simulator's core; the gateway has its own
        os.sched_setaffinity(0, {1})
    rows = []
    raw = []
    try:
        for workload in workloads(args.quick):
            if args.only and not any(part in workload.name for part in args.only.split(",")):
                continue
            print(f"... {workload.name}", file=sys.stderr, flush=True)
            pair = run_pair(workload, sim_url, gateway, gateway_url, key)
            raw.append(pair)
            rows.append(summarise(pair))
    finally:
        gateway.stop()
        sim.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(rows))
    costs = None
    if not args.only or "cost" in args.only:
        costs = measure_costs(args, two_cores)
        print()
        for line in format_costs(costs):
            print(line)
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(
            {"summary": rows, "costs": costs, "raw": raw}, indent=1))
    return 0


# Features measured on and off in the same run: (name, workload, on, off); each side is the
# gateway to run ("serve", or "bare": bare_gateway.py, the relay with no features) and its env.
SERVE, BARE = "serve", "bare"
COSTS = [
    ("keys + ledger + usage log", "small c=32", (SERVE, {}), (BARE, {})),
    ("keys + ledger + usage log", "small c=1", (SERVE, {}), (BARE, {})),
    ("ledger durability", "small c=32",
     (SERVE, {"OLLAMA_PROXY_SERVER_LEDGER_WAIT": "true", **LIMITS_ON}),
     (SERVE, {"OLLAMA_PROXY_SERVER_LEDGER_WAIT": "false", **LIMITS_ON})),
    ("limits", "small c=32", (SERVE, LIMITS_ON), (SERVE, {})),
    ("limits", "small c=1", (SERVE, LIMITS_ON), (SERVE, {})),
]


def measure_costs(args: argparse.Namespace, two_cores: bool) -> list[dict]:
    """Each feature's cost: the same workload through a gateway with it on, off, and on
    again (before and after, averaged, so drift cancels), all in this run."""
    by_name = {w.name: w for w in workloads(args.quick)}
    sim = Process("sim", [sys.executable, str(HERE / "sim_server.py")], "ready ",
                  1 if two_cores else None)
    workdir = tempfile.mkdtemp(prefix="ollama-proxy-bench-")
    key = new_key()
    out = []
    try:
        for n, (feature, workload_name, on, off) in enumerate(COSTS):
            print(f"... cost of {feature} ({workload_name})", file=sys.stderr, flush=True)
            reports = []
            for i, (command, extra) in enumerate((on, off, on)):
                env = {"OLLAMA_PROXY_ADMIN_KEY": key, **extra, **ONE_ADDRESS,
                       "OLLAMA_PROXY_SERVER_DATABASE": os.path.join(workdir, f"{n}-{i}.db")}
                program = ([str(HERE / "bare_gateway.py")] if command == BARE
                           else ["-m", "ollama_proxy", "serve"])
                gateway = Process(f"gateway-cost-{n}-{i}", [
                    sys.executable, *program, "--listen", "127.0.0.1:0",
                    "--upstream", f"http://{sim.address}"], "listening on ",
                    0 if two_cores else None, env)
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
        sim.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def format_costs(costs: list[dict]) -> list[str]:
    return [f"cost of {c['feature']} ({c['workload']}): {c['on_req_s']:.0f} vs "
            f"{c['off_req_s']:.0f} req/s on/off ({c['throughput_cost_pct']:.1f} %), p50 "
            f"{c['on_p50_ms']:.3f} vs {c['off_p50_ms']:.3f} ms ({c['added_p50_ms']:+.3f})"
            for c in costs]


if __name__ == "__main__":
    sys.exit(main())
