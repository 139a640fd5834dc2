"""Make the README's console screenshots: docs/console-overview.png and docs/console-playground.png.

Runs ``python3 -m ollama_proxy demo --traffic`` from this checkout, lets the demo users send
requests for a while, then drives headless Chromium (selenium; Debian's ``chromium`` and
``chromium-driver``) to the admin overview and to the playground after a streamed chat, and
saves both views as small PNGs (recompressed at zlib level 9). A tool, not a test: run it
by hand after changing the console::

    python3 docs/screenshots.py [--traffic-s 20] [--width 900]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
STARTUP_S = 30.0
PROMPTS = ("Write a haiku about our GPU server.", "Say hello to the team.",
           "What does the gateway keep?", "Tell me about the queue.", "Why is the ledger honest?")
WAIT_S = 30.0


def recompress_png(data: bytes) -> bytes:
    """The same image with its pixel data deflated at level 9, ancillary chunks dropped."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks: list[tuple[bytes, bytes]] = []
    pixels = b""
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        at += 12 + length
        if kind == b"IDAT":
            pixels += body
        elif kind in (b"IHDR", b"PLTE", b"IEND"):
            chunks.append((kind, body))
    packed = zlib.compress(zlib.decompress(pixels), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    out = [data[:8]]
    for kind, body in chunks:
        if kind == b"IEND":
            out.append(chunk(b"IDAT", packed))
        out.append(chunk(kind, body))
    return b"".join(out)


class Demo:
    """The demo with --traffic in a child process; its stdout read by a thread."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_PROXY_")}
        env["PYTHONPATH"] = str(REPO)
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ollama_proxy", "demo", "--listen", "127.0.0.1:0", "--traffic"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True).start()

    def _drain(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines.put(line)

    def find(self, pattern: str) -> str:
        deadline = time.monotonic() + STARTUP_S
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            found = re.search(pattern, line)
            if found:
                return found.group(1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def get_json(url: str, key: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        return json.load(response)


def browser(width: int, height: int, profile: str) -> Any:
    from selenium import webdriver
    binary = next(p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                        "google-chrome")) if p)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = shutil.which("chromedriver")
    service = webdriver.ChromeService(driver) if driver else None
    return webdriver.Chrome(options=options, service=service)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder for the PNGs (default docs/)")
    parser.add_argument("--width", type=int, default=900, help="image width in px (default 900)")
    parser.add_argument("--height", type=int, default=760, help="image height in px (default 760)")
    parser.add_argument("--traffic-s", type=float, default=20.0,
                        help="seconds of demo traffic before the overview is taken (default 20)")
    args = parser.parse_args()

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    demo = Demo()
    profile = tempfile.mkdtemp(prefix="console-shots-")
    driver = None
    try:
        base = demo.find(r"gateway on (http://\S+),")
        admin_key = demo.find(r"admin +\(role admin\) key (\S+)")
        user_key = demo.find(r"demo +\(role user\) +key (\S+)")
        time.sleep(args.traffic_s)  # the traffic's pace is the point: let it fill the charts
        users = get_json(base + "/admin/api/usage?group_by=user", admin_key)["rows"]
        print(f"traffic so far: {sum(r['requests'] for r in users)} requests of {len(users)} users")

        driver = browser(args.width, args.height, profile)
        wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1)

        def login(key: str) -> None:
            driver.get(base + "/health")
            driver.execute_script("sessionStorage.clear()")
            driver.get(base + "/admin")
            wait.until(lambda d: d.find_element(By.ID, "login-key").is_displayed())
            driver.find_element(By.ID, "login-key").send_keys(key)
            driver.find_element(By.ID, "login-button").click()
            wait.until(lambda d: d.find_element(By.ID, "who").text)

        def save(name: str) -> None:
            path = Path(args.out) / name
            path.write_bytes(recompress_png(driver.get_screenshot_as_png()))
            print(f"{path}: {path.stat().st_size // 1024} KB")

        login(admin_key)
        driver.find_element(By.CSS_SELECTOR, '#nav button[data-view="overview"]').click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#view-overview rect.bar"))
        save("console-overview.png")

        login(user_key)
        driver.find_element(By.CSS_SELECTOR, '#nav button[data-view="playground"]').click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pg-model option"))
        for prompt in PROMPTS:  # the first whose simulated answer a plain font can show
            driver.find_element(By.ID, "pg-clear").click()
            driver.find_element(By.ID, "pg-prompt").send_keys(prompt)
            driver.find_element(By.ID, "pg-send").click()
            wait.until(lambda d: "completion tokens" in d.find_element(By.ID, "pg-stats").text)
            answer = driver.find_element(By.CSS_SELECTOR, "#pg-chat .msg.assistant").text
            if all(ord(c) < 0x3000 for c in answer):
                break
        save("console-playground.png")
    finally:
        if driver is not None:
            driver.quit()
        demo.stop()
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
