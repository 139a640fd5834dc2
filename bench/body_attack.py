"""Big request bodies against the gateway: its memory during and after.

    python3 bench/body_attack.py [--repo PATH] [--strangers 20] [--mb 64]

Two bursts against ``serve`` (in front of the simulator): first ``--strangers``
connections with no key, each announcing and sending a ``--mb`` MiB body; then
``--members`` connections with the admin key, each sending a ``--member-mb`` MiB
JSON body to /api/show (read whole, parsed, relayed). For each burst: the
gateway's resident memory before, its peak during (VmHWM) and after the burst
ended (every connection closed, ``--settle-s`` later), and how long the burst
took. ``--repo`` runs another checkout's gateway (e.g. an older commit, for a
before/after table) with this script.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import Process  # noqa: E402

MIB = 1024 * 1024
PIECE = b"a" * (1024 * 1024)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def send_body(address: tuple[str, int], head: bytes, frame: tuple[bytes, bytes], size: int,
              results: list[str]) -> None:
    """One client: the head, then a ``size``-byte body (``frame``'s two parts around
    filler) as fast as the gateway takes it; records the status line it got (or how
    the connection ended)."""
    prefix, suffix = frame
    try:
        with socket.create_connection(address, timeout=60) as sock:
            sock.sendall(head)
            sent = 0
            try:
                sock.sendall(prefix)
                sent = len(prefix)
                while sent < size - len(suffix):
                    piece = PIECE[:min(len(PIECE), size - len(suffix) - sent)]
                    sock.sendall(piece)
                    sent += len(piece)
                sock.sendall(suffix)
                sent += len(suffix)
            except OSError:
                pass  # the gateway answered and closed before the body was all sent
            try:
                answer = sock.recv(4096)
            except OSError as exc:
                answer = f"({type(exc).__name__} after {sent // MIB} MiB sent)".encode()
            results.append(answer.split(b"\r\n", 1)[0].decode("latin-1") or
                           f"(closed after {sent // MIB} MiB sent)")
    except OSError as exc:
        results.append(f"({type(exc).__name__})")


def burst(gateway: Process, address: tuple[str, int], clients: int, head: bytes,
          frame: tuple[bytes, bytes], size: int, settle_s: float) -> dict:
    pid = gateway.proc.pid
    before = rss_mb(pid)
    gateway.reset_peak_rss()
    results: list[str] = []
    threads = [threading.Thread(target=send_body, args=(address, head, frame, size, results))
               for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - started
    peak = rss_mb(pid, "VmHWM")
    time.sleep(settle_s)
    answers: dict[str, int] = {}
    for line in results:
        answers[line] = answers.get(line, 0) + 1
    return {"clients": clients, "body_mib": size // MIB, "rss_before_mb": round(before, 1),
            "rss_peak_mb": round(peak, 1), "rss_after_mb": round(rss_mb(pid), 1),
            "seconds": round(took, 2), "answers": answers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(HERE.parent), help="checkout whose gateway runs")
    parser.add_argument("--strangers", type=int, default=20)
    parser.add_argument("--mb", type=int, default=64, help="each stranger's body, MiB")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--member-mb", type=int, default=32, help="each member's body, MiB")
    parser.add_argument("--settle-s", type=float, default=2.0)
    args = parser.parse_args()

    from ollama_proxy.access.keys import new_key  # this checkout's: only to make a key

    workdir = tempfile.mkdtemp(prefix="ollama-proxy-body-attack-")
    key = new_key()
    sim = Process("attack-sim", [sys.executable, str(HERE / "sim_server.py")], "ready ", None)
    env = {"OLLAMA_PROXY_ADMIN_KEY": key,
           "OLLAMA_PROXY_SERVER_DATABASE": os.path.join(workdir, "gw.db")}
    gateway = Process("attack-gateway", [sys.executable, "-m", "ollama_proxy", "serve",
                                         "--listen", "127.0.0.1:0", "--upstream",
                                         f"http://{sim.address}"], "listening on ", None, env,
                      cwd=pathlib.Path(args.repo))
    host, port = gateway.address.removeprefix("http://").rsplit(":", 1)
    address = (host, int(port))
    try:
        size = args.mb * MIB
        strangers = burst(gateway, address, args.strangers,
                          b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size,
                          (b"", b""), size, args.settle_s)
        size = args.member_mb * MIB
        head = (b"POST /api/show HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (key.encode(), size))
        members = burst(gateway, address, args.members, head,
                        (b'{"model": "llama3.2", "padding": "', b'"}'), size, args.settle_s)
    finally:
        gateway.stop()
        sim.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"repo": args.repo, "strangers": strangers, "members": members}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
