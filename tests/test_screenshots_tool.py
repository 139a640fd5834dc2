"""docs/screenshots.py is a tool run by hand (it takes the README's console pictures), never
by the suite: here only that it starts, and that the pictures it made are there and small."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_PNG_BYTES = 150 * 1024


def test_the_screenshot_tool_starts() -> None:
    result = subprocess.run([sys.executable, str(REPO / "docs" / "screenshots.py"), "--help"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "--traffic-s" in result.stdout


def test_the_readme_pictures_exist_and_are_small() -> None:
    pictures = re.findall(r"!\[[^\]]*\]\((docs/[\w.-]+\.png)\)", (REPO / "README.md").read_text())
    assert sorted(pictures) == ["docs/console-overview.png", "docs/console-playground.png"]
    for picture in pictures:
        data = (REPO / picture).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < MAX_PNG_BYTES, picture
