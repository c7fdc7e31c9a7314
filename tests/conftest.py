"""Shared fixtures. The tests directory is on sys.path (pytest inserts a rootless conftest's folder)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> path of a tiny random HF checkpoint, built once per session."""
    from tiny_hf import FAMILIES, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("hf")
    return {f: save_tiny_checkpoint(f, root / f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture
def one_thread():
    """Tiny tensors: torch's OpenMP barriers only cost time here (and stall when another job holds a core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def kernel():
    """The compiled CPU kernel; tests of its fast paths skip where it cannot be built."""
    from d2moe.quant.kernels import load_kernel

    k = load_kernel()
    if k is None:
        pytest.skip("no C++ compiler: the torch path is the only path")
    return k
