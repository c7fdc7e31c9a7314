"""Compile mwq_cpu.cpp once into a cache directory and load it with ctypes.

Why ctypes and not torch.utils.cpp_extension: the kernel only needs raw pointers, and skipping the torch and
pybind11 headers cuts the one-time build from ~20 s to ~2 s. The library links the process's libgomp (the
one torch already loaded, same soname), so its threads are torch's OpenMP threads.

The cache file name hashes the source, the compiler, the flags and the CPU (we build with -march=native),
so a changed kernel or a different machine never loads a stale or illegal binary. The build writes to a
temporary file and renames it into place, so concurrent first runs are safe.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mwq_cpu.cpp")  # includes the mwq_*.h next to it
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-Wno-uninitialized")


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/d2moe/kernels, else ~/.cache/d2moe/kernels."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "d2moe" / "kernels"


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return os.uname().machine


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _flags(march: str) -> tuple[str, ...]:
    return (*FLAGS, f"-march={march}")


def library_path(cache_dir: Path, compiler: str, march: str = "native") -> Path:
    """Where the build for this source, compiler, flags and CPU lives."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256()
    sources = [p.read_bytes() for p in sorted(SOURCE.parent.glob("mwq_*.[ch]*"))]
    for part in (*sources, version.encode(), " ".join(_flags(march)).encode(), _cpu_fingerprint().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir / f"mwq_cpu-{key.hexdigest()[:16]}.so"


def build(cache_dir: Path | None = None, march: str = "native") -> Path:
    """Compile if needed; return the shared library's path. Raises RuntimeError on failure.

    `march` other than native builds for an older CPU (e.g. x86-64-v3: AVX2 only, the portable kernel).
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (g++/c++)")
    cache_dir = cache_dir or default_cache_dir()
    lib = library_path(cache_dir, compiler, march)
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        cmd = [compiler, *_flags(march), str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built %s", lib)
    return lib


@lru_cache(maxsize=None)
def load_library(cache_dir: Path | None = None, march: str = "native") -> ctypes.CDLL | None:
    """The compiled kernels, or None (with a logged warning) when they cannot be built or loaded.

    Memoised per (cache directory, march): a loaded library is immutable, so this is a cache, not state.
    """
    try:
        return ctypes.CDLL(str(build(cache_dir, march)))
    except (RuntimeError, OSError) as exc:
        log.warning("MWQ CPU kernel unavailable, using the torch path: %s", exc)
        return None
