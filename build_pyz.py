#!/usr/bin/env python3
"""Build ``ollama-proxy.pyz``: one reproducible, self-contained zipapp.

Usage::

    python3 build_pyz.py                      # writes ./ollama-proxy.pyz
    python3 build_pyz.py --output dist/x.pyz
    python3 build_pyz.py --wheels-dir DIR     # offline: use wheels already in DIR

The archive holds:

* the ``ollama_proxy/`` package that sits next to this script (every file under
  it, package data such as ``ollama_proxy/static/*`` included; ``__pycache__``,
  ``*.pyc``/``*.pyo``, hidden files and editor backups ``*~`` left out);
* the runtime dependencies, vendored at the zip root at the exact versions and
  SHA-256 hashes pinned in ``WHEELS`` below (pure-Python ``py3-none-any`` wheels
  only, so zipimport can load them on any platform).  Only the importable
  packages/modules of each wheel are taken (no ``*.dist-info``, no test suites,
  no ``__pycache__``); each project's licence files are kept under
  ``_vendor_licenses/<project>/`` together with ``_vendor_licenses/VENDORED.txt``
  listing what was vendored;
* a root ``__main__.py`` that calls ``ollama_proxy.__main__.main()``.

So ``python3 ollama-proxy.pyz COMMAND`` (even ``python3 -I``: isolated mode, no
site-packages) runs on any machine with Python >= 3.10 and nothing installed.

Wheels
    By default they are fetched with ``python -m pip download --no-deps
    --only-binary=:all: --require-hashes`` into ``.pyz-cache/`` next to this
    script (``--cache-dir`` to change it).  A wheel already in the cache whose
    SHA-256 matches the pin is reused without running pip, so a warm build needs
    no network; a cached file whose hash does not match is deleted and fetched
    again.

    ``--wheels-dir DIR`` builds offline (air-gapped boxes): the pinned wheel
    files must already be in DIR under their usual file names (for instance
    copied from another machine's ``.pyz-cache/``, or fetched there with
    ``pip download --no-deps --only-binary=:all: -d DIR trio==0.35.0 ...``).
    pip is not run at all.

    Whatever their source, every wheel's SHA-256 is checked against ``WHEELS``
    before it is opened; a mismatch stops the build.

Reproducibility
    The same source and the same wheels give byte-identical output: entries are
    sorted by name, every entry has the date 1980-01-01 00:00:00, mode 0644 and
    "Unix" as creating system, there are no directory entries, and everything is
    deflated at level 9.  (Deflate output depends on the zlib build, so two
    machines agree byte for byte when their zlib does; the same machine always
    does.)  The output is written to a temporary file in the target folder and
    renamed into place, so a failed build never leaves a half-written file.

Updating a pin
    ``pip download --no-deps --only-binary=:all: -d /tmp/w NAME==VERSION`` then
    ``sha256sum /tmp/w/*.whl`` and edit ``WHEELS``.  Check the new version's
    ``Requires-Dist`` / ``Requires-Python`` (in its ``*.dist-info/METADATA``)
    against the other pins and against Python 3.10.

Stdlib only; needs Python >= 3.10 (and pip, unless ``--wheels-dir`` is given).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent
PACKAGE = "ollama_proxy"
DEFAULT_OUTPUT = "ollama-proxy.pyz"
DEFAULT_CACHE_DIR = ROOT / ".pyz-cache"

SHEBANG = b"#!/usr/bin/env python3\n"
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
ZIP_FILE_MODE = (stat.S_IFREG | 0o644) << 16
ZIP_COMPRESSION = zipfile.ZIP_DEFLATED
ZIP_COMPRESSLEVEL = 9
LICENSES_DIR = "_vendor_licenses"


@dataclass(frozen=True)
class Wheel:
    project: str
    version: str
    filename: str
    sha256: str
    why: str


# The vendored runtime, pinned.  trio 0.35.0 requires (METADATA): attrs>=23.2.0,
# sortedcontainers, idna, outcome, sniffio>=1.3.0, exceptiongroup on
# python_version < "3.11" (and cffi only on Windows, which we do not target);
# outcome requires attrs>=19.2.0; exceptiongroup 1.3 requires
# typing-extensions>=4.6.0 on python_version < "3.13".  Every pin below has
# Requires-Python <= 3.10.  exceptiongroup and typing_extensions are always
# vendored (they are only imported on 3.10) so that the same .pyz runs on 3.10+.
WHEELS: tuple[Wheel, ...] = (
    Wheel("trio", "0.35.0", "trio-0.35.0-py3-none-any.whl",
          "9a062a029487c1bdbcc1b2543b729a0bde857ce478b1512c84f391f628e0c5c9",
          "async runtime"),
    Wheel("h11", "0.16.0", "h11-0.16.0-py3-none-any.whl",
          "63cf8bbe7522de3bf65932fda1d9c2772064ffb3dae62d55932da54b31cb6c86",
          "HTTP/1.1 protocol"),
    Wheel("attrs", "26.1.0", "attrs-26.1.0-py3-none-any.whl",
          "c647aa4a12dfbad9333ca4e71fe62ddc36f4e63b2d260a37a8b83d2f043ac309",
          "trio, outcome"),
    Wheel("sortedcontainers", "2.4.0", "sortedcontainers-2.4.0-py2.py3-none-any.whl",
          "a163dcaede0f1c021485e957a39245190e74249897e2ae4b2aa38595db237ee0",
          "trio"),
    Wheel("idna", "3.20", "idna-3.20-py3-none-any.whl",
          "ab7ae7122974553370f0bdb919e1a960b2cd1bc1ef0276416d896db81c14582c",
          "trio"),
    Wheel("outcome", "1.3.0.post0", "outcome-1.3.0.post0-py2.py3-none-any.whl",
          "e771c5ce06d1415e356078d3bdd68523f284b4ce5419828922b6871e65eda82b",
          "trio"),
    Wheel("sniffio", "1.3.1", "sniffio-1.3.1-py3-none-any.whl",
          "2f6da418d1f1e0fddd844478f41680e794e6051915791a034ff65e5f100525a2",
          "trio"),
    Wheel("exceptiongroup", "1.3.2", "exceptiongroup-1.3.2-py3-none-any.whl",
          "41c6a70dfec22050d3d8b43386b059a4dc0bca3f3d40a40971cb206fff1785af",
          "trio on Python 3.10"),
    Wheel("typing_extensions", "4.16.0", "typing_extensions-4.16.0-py3-none-any.whl",
          "481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8",
          "exceptiongroup on Python < 3.13"),
)

# Directories inside vendored packages that are never imported at run time.
VENDOR_SKIP_DIRS = frozenset({"__pycache__", "_tests", "tests"})
SKIP_SUFFIXES = (".pyc", ".pyo")
NATIVE_SUFFIXES = (".so", ".pyd", ".dylib", ".dll")
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")

ROOT_MAIN = '''\
# Entry point of ollama-proxy.pyz (generated by build_pyz.py).
import sys

if sys.version_info < (3, 10):
    sys.stderr.write(
        "ollama-proxy needs Python >= 3.10; this is Python %d.%d\\n" % sys.version_info[:2]
    )
    sys.exit(2)

from ollama_proxy.__main__ import main

sys.exit(main())
'''


class BuildError(Exception):
    """A problem that stops the build; its message is shown to the user."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_wheel(wheel: Wheel, path: Path) -> None:
    actual = sha256_file(path)
    if actual != wheel.sha256:
        raise BuildError(
            f"SHA-256 mismatch for {path}:\n"
            f"  expected {wheel.sha256} (pinned in build_pyz.py for {wheel.project}=={wheel.version})\n"
            f"  got      {actual}\n"
            "Refusing to build with it. Delete the file (or fix --wheels-dir) and retry; "
            "if the pin itself is wrong, update WHEELS in build_pyz.py."
        )


def wheels_from_dir(wheels_dir: Path) -> dict[Wheel, Path]:
    missing = [w.filename for w in WHEELS if not (wheels_dir / w.filename).is_file()]
    if missing:
        raise BuildError(
            f"--wheels-dir {wheels_dir} lacks these pinned wheels:\n  "
            + "\n  ".join(missing)
        )
    found = {w: wheels_dir / w.filename for w in WHEELS}
    for w, path in found.items():
        verify_wheel(w, path)
    return found


def wheels_from_cache(cache_dir: Path) -> dict[Wheel, Path]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    need: list[Wheel] = []
    for w in WHEELS:
        path = cache_dir / w.filename
        if path.is_file():
            if sha256_file(path) == w.sha256:
                continue
            print(f"build_pyz: {path} does not match its pinned hash; fetching it again",
                  file=sys.stderr)
            path.unlink()
        need.append(w)
    if need:
        download(need, cache_dir)
    found = {w: cache_dir / w.filename for w in WHEELS}
    for w, path in found.items():
        if not path.is_file():
            raise BuildError(f"pip did not leave {w.filename} in {cache_dir}")
        verify_wheel(w, path)
    return found


def download(wheels: list[Wheel], dest: Path) -> None:
    names = ", ".join(f"{w.project}=={w.version}" for w in wheels)
    print(f"build_pyz: downloading {names}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="build_pyz-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(
            "".join(f"{w.project}=={w.version} --hash=sha256:{w.sha256}\n" for w in wheels),
            encoding="utf-8",
        )
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", "--require-hashes",
            "--disable-pip-version-check", "--no-input",
            "-d", str(dest), "-r", str(req),
        ]
        try:
            # pip's chatter goes to stderr: stdout is kept for the result line.
            proc = subprocess.run(cmd, stdout=sys.stderr.fileno())
        except OSError as exc:
            raise BuildError(f"could not run pip ({exc})") from exc
    if proc.returncode != 0:
        raise BuildError(
            f"pip download failed (exit {proc.returncode}): {' '.join(cmd[:3])} ...\n"
            "Without network access, build with --wheels-dir DIR holding the pinned wheels "
            "(see the build_pyz.py docstring). If pip is missing, install it "
            "(e.g. `apt-get install python3-pip`) or use --wheels-dir."
        )


def add_entry(entries: dict[str, bytes], name: str, data: bytes, origin: str) -> None:
    if name in entries:
        raise BuildError(f"two sources want the archive path {name!r} (second: {origin})")
    entries[name] = data


def collect_package(entries: dict[str, bytes], root: Path) -> None:
    pkg = root / PACKAGE
    if not (pkg / "__init__.py").is_file():
        raise BuildError(f"package not found: {pkg}/__init__.py")
    if not (pkg / "__main__.py").is_file():
        raise BuildError(f"{pkg}/__main__.py not found: the .pyz entry point calls its main()")
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith(".") or fname.endswith("~") or fname.endswith(SKIP_SUFFIXES):
                continue
            path = Path(dirpath) / fname
            arcname = path.relative_to(root).as_posix()
            add_entry(entries, arcname, path.read_bytes(), str(path))


def collect_wheel(entries: dict[str, bytes], wheel: Wheel, path: Path,
                  manifest: list[str]) -> None:
    license_files: dict[str, bytes] = {}
    modules: set[str] = set()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            parts = PurePosixPath(info.filename).parts
            top = parts[0]
            if top.endswith(".dist-info"):
                base = parts[-1]
                if (len(parts) > 2 and parts[1] == "licenses") or base.upper().startswith(LICENSE_PREFIXES):
                    if base in license_files:
                        raise BuildError(f"{path.name}: two licence files named {base}")
                    license_files[base] = zf.read(info)
                continue
            if top.endswith(".data"):
                raise BuildError(f"{path.name}: has a .data directory ({top}); not supported")
            if any(p in VENDOR_SKIP_DIRS for p in parts[:-1]):
                continue
            if parts[-1].endswith(SKIP_SUFFIXES):
                continue
            if parts[-1].endswith(NATIVE_SUFFIXES):
                raise BuildError(f"{path.name}: contains native code {info.filename}; "
                                 "only pure-Python wheels can be vendored")
            if top == PACKAGE or top == "__main__.py" or top == LICENSES_DIR:
                raise BuildError(f"{path.name}: would overwrite {top} in the archive")
            modules.add(top.removesuffix(".py"))
            add_entry(entries, info.filename, zf.read(info), f"{path.name}:{info.filename}")
    if not modules:
        raise BuildError(f"{path.name}: no importable package or module found")
    if not license_files:
        raise BuildError(f"{path.name}: no licence file found in its dist-info")
    for base, data in license_files.items():
        add_entry(entries, f"{LICENSES_DIR}/{wheel.project}/{base}", data, path.name)
    manifest.append(
        f"{wheel.project}=={wheel.version}  {wheel.filename}  sha256={wheel.sha256}  "
        f"provides: {', '.join(sorted(modules))}  (for {wheel.why})"
    )


def collect(root: Path, wheels: dict[Wheel, Path]) -> dict[str, bytes]:
    entries: dict[str, bytes] = {}
    collect_package(entries, root)
    manifest: list[str] = []
    for wheel in WHEELS:
        collect_wheel(entries, wheel, wheels[wheel], manifest)
    add_entry(entries, f"{LICENSES_DIR}/VENDORED.txt",
              ("Third-party packages vendored in this archive by build_pyz.py:\n"
               + "\n".join(manifest) + "\n").encode("utf-8"), "build_pyz.py")
    add_entry(entries, "__main__.py", ROOT_MAIN.encode("utf-8"), "build_pyz.py")
    return entries


def write_pyz(entries: dict[str, bytes], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(SHEBANG)
            with zipfile.ZipFile(f, "w") as zf:
                for name in sorted(entries):
                    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
                    info.create_system = 3  # Unix, whatever the building OS
                    info.external_attr = ZIP_FILE_MODE
                    info.compress_type = ZIP_COMPRESSION
                    zf.writestr(info, entries[name], compresslevel=ZIP_COMPRESSLEVEL)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build(output: Path, cache_dir: Path, wheels_dir: Path | None) -> Path:
    wheels = wheels_from_dir(wheels_dir) if wheels_dir is not None else wheels_from_cache(cache_dir)
    entries = collect(ROOT, wheels)
    write_pyz(entries, output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build_pyz.py",
        description="Build the reproducible single-file ollama-proxy.pyz "
                    "(the ollama_proxy package plus its pinned, vendored dependencies).",
        epilog="See the module docstring for details (python3 -c 'import build_pyz; help(build_pyz)').",
    )
    parser.add_argument("--output", "-o", type=Path, default=Path(DEFAULT_OUTPUT),
                        help=f"where to write the archive (default: ./{DEFAULT_OUTPUT})")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="download cache for the pinned wheels (default: .pyz-cache/ "
                             "next to build_pyz.py)")
    parser.add_argument("--wheels-dir", type=Path, default=None,
                        help="offline build: take the pinned wheels from DIR (still "
                             "hash-verified) instead of downloading them with pip")
    args = parser.parse_args(argv)
    if sys.version_info < (3, 10):
        print("build_pyz.py needs Python >= 3.10", file=sys.stderr)
        return 2
    try:
        output = build(args.output, args.cache_dir, args.wheels_dir)
    except BuildError as exc:
        print(f"build_pyz: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"build_pyz: error: {exc}", file=sys.stderr)
        return 1
    size = output.stat().st_size
    print(f"{output} {size} bytes sha256={sha256_file(output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
