"""Atomic output: an export is written beside OUT under a hidden temporary name and renamed into place only
when complete, so an interrupted or failed export leaves nothing that looks like a model."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_free(out: Path, directory: bool) -> None:
    """Refuse an OUT that holds something: a non-empty directory, a non-empty file, or the wrong kind."""
    out = Path(out)
    if not out.exists():
        return
    if directory and out.is_file():
        raise FileExistsError(f"{out} exists and is a file; the safetensors export writes a directory")
    if not directory and out.is_dir():
        raise FileExistsError(f"{out} is a directory; the gguf export writes one file (e.g. {out / 'model.gguf'})")
    if (out.is_dir() and any(out.iterdir())) or (out.is_file() and out.stat().st_size > 0):
        raise FileExistsError(f"{out} exists and is not empty; choose a new path or remove it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish(path: Path, mode: int) -> None:
    """Flush a written file to disk with the permissions a plain `open` would have given it (some writers
    create 0600 files)."""
    os.chmod(path, mode)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(out: Path, directory: bool) -> Iterator[Path]:
    """Yields a temporary path beside `out` (a directory, or a file path not yet created); on success its
    files are synced and it is renamed to `out` (replacing an empty one), on any error it is removed."""
    out = Path(out)
    check_free(out, directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)  # under the umask, like the directory it becomes
    target = tmp if directory else tmp / out.name
    try:
        yield target
        mode = 0o666 & ~_umask()
        for f in ([p for p in tmp.iterdir() if p.is_file()] if directory else [target]):
            _finish(f, mode)
        check_free(out, directory)  # nothing appeared there meanwhile
        if out.exists():
            os.rmdir(out) if out.is_dir() else os.remove(out)
        os.rename(target, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
