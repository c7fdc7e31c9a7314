"""Store writer/reader: atomic commit, prefix reads, and clear errors on damage."""

from __future__ import annotations

import json
import os

import pytest
import torch

from d2moe.config import ModelConfig, MWQConfig
from d2moe.storage.format import BLOB_ALIGNMENT, EXPERTS_FILE, INDEX_FILE, StoreConfig, StoreError
from d2moe.storage.reader import StoreReader
from d2moe.storage.writer import StoreWriter

MODEL = ModelConfig(
    family="test", vocab_size=16, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
    num_experts=3, top_k=2, expert_intermediate=8, dense_layers=(0,), dense_intermediate=8,
)
SLICES = [40, 10, 10, 10, 10, 10, 10]  # bytes of slices 2..8


def _blob(layer, expert):
    g = torch.Generator().manual_seed(layer * 10 + expert)
    return bytes(torch.randint(0, 256, (sum(SLICES),), generator=g, dtype=torch.uint8).tolist())


def _write(path, commit=True):
    cfg = StoreConfig(MODEL, MWQConfig(), (("w1", 8, 8),))
    w = StoreWriter(path, cfg)
    w.write_dense({"embed": torch.zeros(16, 8)})
    for e in range(MODEL.num_experts):
        w.add_expert(1, e, _blob(1, e), SLICES)
    if commit:
        w.commit()
    return w


def test_prefix_reads_and_alignment(tmp_path):
    _write(tmp_path / "s")
    r = StoreReader(tmp_path / "s")
    for e in range(3):
        assert r.entry(1, e).offset % BLOB_ALIGNMENT == 0
        for bits in range(2, 9):
            got = bytes(r.read_expert(1, e, bits).tolist())
            assert got == _blob(1, e)[: sum(SLICES[: bits - 1])]
    # upgrading 3 -> 6 bits reads only slices 4..6
    buf = torch.empty(r.prefix_bytes(1, 0, 6), dtype=torch.uint8)
    buf[: r.prefix_bytes(1, 0, 3)] = r.read_expert(1, 0, 3)
    before = r.stats.bytes_read
    r.read_into(1, 0, buf, 3, 6)
    assert r.stats.bytes_read - before == 30
    assert bytes(buf.tolist()) == _blob(1, 0)[: sum(SLICES[:5])]
    assert r.total_expert_bytes(2) == 3 * 40


def test_uncommitted_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with _write(tmp_path / "s", commit=False):
            raise RuntimeError("conversion failed midway")
    assert not (tmp_path / "s").exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path):
    _write(tmp_path / "s")
    with pytest.raises(FileExistsError):
        _write(tmp_path / "s")


def test_out_of_order_calls_raise(tmp_path):
    w = StoreWriter(tmp_path / "s", StoreConfig(MODEL, MWQConfig(), ()))
    with pytest.raises(RuntimeError, match="out of order"):
        w.add_expert(1, 0, b"x" * 100, SLICES)
    w.abort()


def test_corrupted_plane_names_file_and_expert(tmp_path):
    _write(tmp_path / "s")
    r0 = StoreReader(tmp_path / "s")
    start, _ = r0.slice_range(1, 2, 5)
    off = r0.entry(1, 2).offset + start
    with open(tmp_path / "s" / EXPERTS_FILE, "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = StoreReader(tmp_path / "s")
    r.read_expert(1, 2, 4)  # slices below the damage still read fine
    with pytest.raises(StoreError, match=r"experts\.bin.*expert 2 of layer 1.*slice 5"):
        r.read_expert(1, 2, 8)


def test_truncated_file_is_a_clear_error(tmp_path):
    _write(tmp_path / "s")
    path = tmp_path / "s" / EXPERTS_FILE
    os.truncate(path, BLOB_ALIGNMENT + 20)
    with pytest.raises(StoreError, match=r"experts\.bin: truncated.*expert 1 of layer 1"):
        StoreReader(tmp_path / "s")


def test_missing_index_entry_and_version(tmp_path):
    _write(tmp_path / "s")
    idx = json.loads((tmp_path / "s" / INDEX_FILE).read_text())
    idx["blobs"] = idx["blobs"][:2]
    (tmp_path / "s" / INDEX_FILE).write_text(json.dumps(idx))
    with pytest.raises(StoreError, match="no entry for expert 2 of layer 1"):
        StoreReader(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreError, match="version 99 is not supported"):
        StoreReader(tmp_path / "s")


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no such model directory"):
        StoreReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="config.json: missing"):
        StoreReader(tmp_path / "empty")
