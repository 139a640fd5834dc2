"""Tests for build_pyz.py: the single-file ollama-proxy.pyz.

The wheels come from .pyz-cache/ at the repo root (downloaded once by pip, then
reused), so with a warm cache the whole module runs in a few seconds.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "build_pyz.py"
PACKAGE_MAIN = REPO / "ollama_proxy" / "__main__.py"

needs_main = pytest.mark.skipif(
    not PACKAGE_MAIN.is_file(),
    reason="ollama_proxy/__main__.py does not exist yet: the .pyz entry point calls its main()",
)


def run_build(output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # Run from an unrelated folder: build_pyz.py must find the package next to itself.
    return subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--output", str(output), *extra],
        cwd=output.parent, capture_output=True, text=True, timeout=300,
    )


def build_ok(output: Path) -> Path:
    proc = run_build(output)
    assert proc.returncode == 0, f"build failed:\n{proc.stdout}\n{proc.stderr}"
    assert output.is_file()
    # The one result line: path, size, sha256.
    last = proc.stdout.strip().splitlines()[-1]
    assert str(output) in last and re.search(r"sha256=[0-9a-f]{64}", last), last
    return output


def clean_env(home: Path) -> dict[str, str]:
    """No PYTHONPATH, no virtualenv, nothing but what a bare box would have."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}


def expected_version() -> str | None:
    init = (REPO / "ollama_proxy" / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", init, re.M)
    return m.group(1) if m else None


def run_version(python: str, pyz: Path, cwd: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-I", *flags, str(pyz), "version"],
        cwd=cwd, env=clean_env(cwd), capture_output=True, text=True, timeout=60,
    )


def assert_version_output(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert re.search(r"\d+\.\d+", proc.stdout), proc.stdout
    version = expected_version()
    if version:
        assert version in proc.stdout, proc.stdout


def find_python310() -> str | None:
    """A working Python 3.10 interpreter (its real path, not a shim), or None."""
    candidates = []
    which = shutil.which("python3.10")
    if which:
        candidates.append(which)
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.10*", "bin", "python3.10")))
    for cand in candidates:
        try:
            proc = subprocess.run(
                [cand, "-c", "import sys; print(sys.version_info[:2] == (3, 10)); print(sys.executable)"],
                capture_output=True, text=True, timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = proc.stdout.split()
        if proc.returncode == 0 and lines and lines[0] == "True":
            return lines[1] if len(lines) > 1 else cand
    return None


@pytest.fixture(scope="module")
def built_pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ollama-proxy.pyz built once for this module's tests."""
    if not PACKAGE_MAIN.is_file():
        pytest.skip("ollama_proxy/__main__.py does not exist yet: the .pyz entry point calls its main()")
    return build_ok(tmp_path_factory.mktemp("pyz") / "ollama-proxy.pyz")


@needs_main
def test_build_is_reproducible(built_pyz: Path, tmp_path: Path) -> None:
    first = build_ok(tmp_path / "first.pyz")
    second = build_ok(tmp_path / "second.pyz")
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() == built_pyz.read_bytes()
    assert os.stat(first).st_mode & 0o777 == 0o755
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@needs_main
def test_archive_layout(built_pyz: Path) -> None:
    data = built_pyz.read_bytes()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(built_pyz) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
        assert not [n for n in names if n.endswith("/")], "no directory entries"
        assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
        assert not [n for n in names if ".dist-info/" in n]
        tops = {n.split("/")[0] for n in names}
        for required in ("__main__.py", "ollama_proxy", "trio", "h11", "attr", "attrs",
                         "sortedcontainers", "idna", "outcome", "sniffio", "exceptiongroup",
                         "typing_extensions.py", "_vendor_licenses"):
            assert required in tops, required
        for project in ("trio", "h11", "attrs", "sortedcontainers", "idna", "outcome", "sniffio",
                        "exceptiongroup", "typing_extensions"):
            assert any(n.startswith(f"_vendor_licenses/{project}/") for n in names), project
        # Every file of the package, sources and package data (openapi.json), is in the
        # archive, unchanged.
        for path in (REPO / "ollama_proxy").rglob("*"):
            if (not path.is_file() or "__pycache__" in path.parts
                    or path.name.startswith(".") or path.name.endswith(("~", ".pyc", ".pyo"))):
                continue
            arc = path.relative_to(REPO).as_posix()
            assert zf.read(arc) == path.read_bytes(), arc


# Run inside the interpreter under test: every vendored module must come from the
# zip (-I still puts the system site-packages on sys.path, after the zip), and trio
# must actually run, with exceptiongroup on 3.10.
VENDORED_PROBE = """
import sys
pyz = sys.argv[1]
sys.path.insert(0, pyz)
import trio, h11, attr, attrs, sortedcontainers, idna, outcome, sniffio
mods = [trio, h11, attr, attrs, sortedcontainers, idna, outcome, sniffio]
if sys.version_info < (3, 11):
    import exceptiongroup, typing_extensions
    mods += [exceptiongroup, typing_extensions]
bad = [m.__name__ + ': ' + str(m.__file__) for m in mods if not str(m.__file__).startswith(pyz)]
assert not bad, bad
async def main():
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
    return await trio.to_thread.run_sync(lambda: 'ok')
print('trio', trio.__version__, trio.run(main))
"""


# Package data is read with importlib.resources, from inside the zip.
PACKAGE_DATA_PROBE = """
import sys
pyz = sys.argv[1]
sys.path.insert(0, pyz)
from ollama_proxy.admin import openapi
assert openapi.__file__.startswith(pyz), openapi.__file__
doc = openapi.document()
print('openapi', doc['openapi'], len(doc['paths']) > 10)
from ollama_proxy.admin import console_page
print('console', sum(len(console_page.asset(p).body) for p in console_page.FILES) > 1000)
"""


def check_interpreter(python: str, pyz: Path, cwd: Path) -> None:
    assert_version_output(run_version(python, pyz, cwd))
    # -S too: no site-packages at all, as on a box with nothing installed.
    assert_version_output(run_version(python, pyz, cwd, "-S"))
    proc = subprocess.run(
        [python, "-I", "-S", "-c", VENDORED_PROBE, str(pyz)],
        cwd=cwd, env=clean_env(cwd), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "trio 0.35.0 ok" in proc.stdout
    proc = subprocess.run(
        [python, "-I", "-S", "-c", PACKAGE_DATA_PROBE, str(pyz)],
        cwd=cwd, env=clean_env(cwd), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "openapi 3.1.0 True" in proc.stdout
    assert "console True" in proc.stdout


@needs_main
def test_pyz_runs_isolated(built_pyz: Path, tmp_path: Path) -> None:
    check_interpreter(sys.executable, built_pyz, tmp_path)


@needs_main
def test_pyz_runs_isolated_on_python310(built_pyz: Path, tmp_path: Path) -> None:
    python310 = find_python310()
    if python310 is None:
        pytest.skip("no working python3.10 on PATH (or under pyenv)")
    check_interpreter(python310, built_pyz, tmp_path)


def test_build_refuses_wheel_with_wrong_hash(tmp_path: Path) -> None:
    """Runs even before the package is complete: hashes are checked before anything else."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    listing = subprocess.run(
        [sys.executable, "-c",
         "import runpy, sys; ns = runpy.run_path(sys.argv[1]); "
         "print('\\n'.join(w.filename for w in ns['WHEELS']))", str(BUILD_SCRIPT)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    for name in listing.stdout.split():
        (wheels / name).write_bytes(b"not the pinned wheel")
    out = tmp_path / "out.pyz"
    proc = run_build(out, "--wheels-dir", str(wheels))
    assert proc.returncode == 1, proc.stderr
    assert "SHA-256 mismatch" in proc.stderr
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp"))
