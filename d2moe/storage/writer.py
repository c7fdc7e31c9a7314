"""Writes a store atomically: everything goes into a temporary sibling directory which is renamed into place
only by `commit()`. A failed or interrupted conversion leaves no directory that looks like a model.

The writer is a small state machine (OPEN -> DENSE -> EXPERTS -> COMMITTED / ABORTED) that raises on
out-of-order calls, like gguf-py's writer.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from d2moe.storage.checksum import crc32
from d2moe.storage.format import (
    BLOB_ALIGNMENT,
    CONFIG_FILE,
    DENSE_FILE,
    EXPERTS_FILE,
    INDEX_FILE,
    BlobEntry,
    StoreConfig,
    align_up,
)


class _State(enum.Enum):
    OPEN = 0
    DENSE = 1
    EXPERTS = 2
    DONE = 3


class StoreWriter:
    """Usage: `with StoreWriter(out, cfg) as w: w.write_dense(t); w.add_expert(...); w.commit()`."""

    def __init__(self, out_dir: Path, config: StoreConfig, *, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists (pass --force to replace it)")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.overwrite = overwrite
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        self._experts = open(self.tmp_dir / EXPERTS_FILE, "wb")
        self._entries: list[BlobEntry] = []
        self._state = _State.OPEN

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state is not _State.DONE:
            self.abort()

    def _expect(self, *states: _State) -> None:
        if self._state not in states:
            raise RuntimeError(f"StoreWriter: call out of order in state {self._state.name}")

    def write_dense(self, tensors: dict[str, torch.Tensor]) -> None:
        self._expect(_State.OPEN)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.tmp_dir / DENSE_FILE))
        self._state = _State.DENSE

    def add_expert(self, layer: int, expert: int, blob: bytes, slice_bytes: list[int]) -> None:
        """Append one expert blob; `slice_bytes[i]` is the size of slice min_bits+i."""
        self._expect(_State.DENSE, _State.EXPERTS)
        if sum(slice_bytes) != len(blob):
            raise ValueError(f"expert ({layer},{expert}): slices sum to {sum(slice_bytes)}, blob has {len(blob)}")
        offset = self._experts.tell()
        assert offset % BLOB_ALIGNMENT == 0
        view = memoryview(blob)
        prefix, checksums, pos = [], [], 0
        for n in slice_bytes:
            checksums.append(crc32(view[pos : pos + n]))
            pos += n
            prefix.append(pos)
        self._experts.write(blob)
        self._experts.write(b"\0" * (align_up(len(blob)) - len(blob)))
        self._entries.append(BlobEntry(layer, expert, offset, tuple(prefix), tuple(checksums)))
        self._state = _State.EXPERTS

    def copy_files(self, src_dir: Path, names: tuple[str, ...]) -> list[str]:
        """Copy side files (tokenizer, calibration) that exist in `src_dir`; returns the names copied."""
        copied = []
        for name in names:
            src = Path(src_dir) / name
            if src.is_file():
                shutil.copy2(src, self.tmp_dir / name)
                copied.append(name)
        return copied

    def write_json(self, name: str, data: object) -> None:
        (self.tmp_dir / name).write_text(json.dumps(data, indent=1))

    def commit(self) -> Path:
        """Write the index and config last, fsync, and rename the directory into place."""
        self._expect(_State.EXPERTS, _State.DENSE)
        self._experts.flush()
        os.fsync(self._experts.fileno())
        self._experts.close()
        index = {"blobs": [e.to_dict() for e in self._entries]}
        (self.tmp_dir / INDEX_FILE).write_text(json.dumps(index))
        (self.tmp_dir / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=1))
        if self.out_dir.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.out_dir} appeared during conversion; not replacing it")
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.rename(self.out_dir, old)
            os.rename(self.tmp_dir, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp_dir, self.out_dir)
        self._state = _State.DONE
        return self.out_dir

    def abort(self) -> None:
        if not self._experts.closed:
            self._experts.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._state = _State.DONE
