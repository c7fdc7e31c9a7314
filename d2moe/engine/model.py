"""Opens a store as a runnable model: dense weights resident, experts through a policy's provider, and the
memory budget split between them (engine/memory.py)."""

from __future__ import annotations

import json
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from d2moe.cache.expert_cache import BudgetError, ExpertCache
from d2moe.cache.pipelined_provider import PipelinedProvider
from d2moe.cache.plane_cache import PlaneCache
from d2moe.cache.policy import CachePolicy
from d2moe.cache.store_provider import StoreExpertProvider
from d2moe.config import EngineConfig, ModelConfig
from d2moe.engine.memory import MemoryPlan, plan_memory
from d2moe.engine.policies import PolicySpec, policy_spec
from d2moe.io.loader import SliceLoader
from d2moe.models.decoder import MoEDecoder
from d2moe.models.dense import DenseWeight, block_dense_matrices, dense_nbytes, load_dense
from d2moe.models.moe import WidthRule
from d2moe.models.widths import HobbitRule, RoutedWidths, static_widths
from d2moe.routing.calibration import Calibration, load_calibration
from d2moe.routing.tiers import WidthChoice
from d2moe.quant.kernels import load_kernel
from d2moe.storage.format import DENSE_FILE, StoreError
from d2moe.storage.reader import StoreReader

log = logging.getLogger(__name__)
@dataclass
class LoadedModel:
    path: Path
    decoder: MoEDecoder
    reader: StoreReader
    provider: StoreExpertProvider | PipelinedProvider
    tokenizer: Tokenizer | None
    dense_bytes: int
    eos_ids: frozenset[int]  # from the model config and the tokenizer's eos_token
    plan: MemoryPlan
    engine: EngineConfig
    calibration: Calibration | None = None  # tiers and router two (`d2moe calibrate`)

    @property
    def config(self) -> ModelConfig:
        return self.decoder.cfg

    @property
    def cache(self) -> ExpertCache | PlaneCache:
        return self.provider.cache

    def width_choice(self, bits: int | None = None, tier: str | None = None,
                     avg_bits: float | None = None) -> WidthChoice:
        """What a request's --bits / --tier / --avg-bits runs as: a fixed width or a router-two price."""
        max_bits = self.reader.max_bits
        if tier is None and avg_bits is None:
            return WidthChoice(bits if bits is not None else max_bits)
        if avg_bits is not None and not 2 <= avg_bits <= max_bits:
            raise ValueError(f"--avg-bits must be within 2..{max_bits}")
        if self.calibration is None:
            if avg_bits is None and tier in ("max", "min"):
                return WidthChoice(max_bits if tier == "max" else 2)
            what = "--avg-bits" if avg_bits is not None else f"tier {tier!r}"
            raise StoreError(f"{what} needs a calibrated width router, and {self.path} has none: run "
                             f"`d2moe calibrate --model {self.path} --text FILE...` (or use --bits)")
        return self.calibration.choice(max_bits=max_bits, tier=tier, avg_bits=avg_bits)

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise StoreError(f"{self.path}: no tokenizer.json in the store; convert from a checkpoint that has one")
        return self.tokenizer

    def widths_report(self, tokens: int) -> dict:
        """avg_bits: mean width over every chosen expert of every token since the model opened (0 = skipped,
        not counted); expert_bytes_per_token: bytes those widths need per token, whatever was cached."""
        hist = self.decoder.width_hist
        layout = self.reader.config.layout
        n = int(hist[2:].sum())
        bits = sum(b * int(hist[b]) for b in range(2, hist.numel()))
        nbytes = sum(layout.prefix_bytes(b) * int(hist[b]) for b in range(2, self.reader.max_bits + 1))
        return {"avg_bits": bits / n if n else None, "expert_bytes_per_token": nbytes / tokens if tokens else None,
                "widths": {b: int(hist[b]) for b in range(hist.numel()) if hist[b]}}

    def expert_bytes_read(self) -> int:
        if isinstance(self.provider, PipelinedProvider):
            return self.provider.loader.stats.bytes_read
        return self.reader.stats.bytes_read

    def close(self) -> None:
        """Stop the loader threads and close files (idempotent)."""
        if isinstance(self.provider, PipelinedProvider):
            self.provider.close()
        self.reader.close()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_tokenizer(path: Path) -> Tokenizer | None:
    tok_file = Path(path) / "tokenizer.json"
    if not tok_file.is_file():
        return None
    try:
        return Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise StoreError(f"{tok_file}: cannot load tokenizer ({e})") from None


def _eos_from_tokenizer_config(path: Path, tok: Tokenizer | None) -> set[int]:
    cfg_file = path / "tokenizer_config.json"
    if tok is None or not cfg_file.is_file():
        return set()
    eos = json.loads(cfg_file.read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    tid = tok.token_to_id(eos) if isinstance(eos, str) else None
    return {tid} if tid is not None else set()


def _load_dense(path: Path) -> dict[str, DenseWeight]:
    dense_path = path / DENSE_FILE
    try:
        dense = load_dense(dense_path)
    except FileNotFoundError:
        raise StoreError(f"{dense_path}: missing; the store is incomplete") from None
    except Exception as e:
        raise StoreError(f"{dense_path}: cannot read ({e})") from None
    _drop_page_cache(dense_path)  # the tensors are copies: keep the file's pages out of a memory cgroup
    return block_dense_matrices(dense)


def _drop_page_cache(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _provider(reader: StoreReader, engine: EngineConfig, plan: MemoryPlan) -> StoreExpertProvider | PipelinedProvider:
    cfg = reader.config.model
    spec = policy_spec(engine.policy)
    if spec.provider == "sync":
        return StoreExpertProvider(reader, ExpertCache(plan.experts))
    layout = reader.config.layout
    cache = PlaneCache(
        plan.experts, len(cfg.moe_layers), cfg.num_experts, reader.max_bits, layout.slice_bytes(2),
        max(layout.slice_bytes(b) for b in range(3, reader.max_bits + 1)) if reader.max_bits > 2 else 4096,
        CachePolicy(spec.eviction),
    )
    loader = SliceLoader(str(reader.experts_path), engine.loader_threads, engine.direct_io, engine.record_timeline)
    cls = HoldProvider if spec.provider == "hold" else PipelinedProvider
    max_wait = engine.max_wait if spec.degrade else None
    return cls(reader, cache, loader, load_kernel(), max_wait, spec)


def _width_rule(spec: PolicySpec, provider: object, calibration: Calibration | None) -> WidthRule | None:
    """The policy's per-(token, expert) width rule (models/widths.py), or None: every chosen expert at its
    token's width."""
    if spec.widths == "hobbit" and isinstance(provider, PipelinedProvider):
        rule = HobbitRule()
        return lambda layer, x, r, token_bits, price: rule(r.idx, r.weight, token_bits, provider.resident_widths(layer))
    if spec.widths == "static":
        tables = calibration.static_widths if calibration is not None else None
        if not tables:
            log.info("policy %s: the store has no calibrated per-expert widths (d2moe calibrate); "
                     "every expert runs at the request's width", spec.name)
            return None
        return lambda layer, x, r, token_bits, price: static_widths(r.idx, token_bits, tables[layer])
    router = calibration.router if calibration is not None else None
    if router is None:
        return None
    return RoutedWidths(router)


class HoldProvider(PipelinedProvider):
    """The `hold` policy: every expert read once at the request's width before the first step."""

    def check_budget(self, bits: int) -> None:
        total = self.cache.E * len(self.layers)
        if self.preload(bits) < total:
            need = total * (self.layout.prefix_bytes(bits))
            raise BudgetError(
                f"policy hold: every expert at {bits} bits needs {need / 2**20:.1f} MiB of expert cache, the budget "
                f"leaves {self.cache.budget_bytes / 2**20:.1f} MiB; raise --memory-budget or use --policy d2moe"
            )


def open_model(path: Path, engine: EngineConfig | None = None) -> LoadedModel:
    """Open a store under `engine` (default: every expert fits at 8 bits, pipelined d2moe policy)."""
    engine = engine or EngineConfig()
    path = Path(path)
    spec = policy_spec(engine.policy)
    reader = StoreReader(path)
    try:
        dense = _load_dense(path)
        cfg = reader.config.model
        calibration = load_calibration(path, cfg)
        if calibration is not None and spec.prefetch == "fitted":
            dense.update(calibration.next_guess)  # the fitted next-layer guess (routing/next_guess.py)
        dense_bytes = dense_nbytes(dense)
        layout = reader.config.layout
        all_experts = len(cfg.moe_layers) * cfg.num_experts * layout.prefix_bytes(reader.max_bits)
        plan = plan_memory(cfg, engine, dense_bytes, layout, all_experts)
        provider = _provider(reader, engine, plan)
    except BaseException:
        reader.close()
        raise
    decoder = MoEDecoder(cfg, dense, provider, prefetch=engine.prefetch and spec.prefetch in ("fitted", "router"),
                         widths=_width_rule(spec, provider, calibration))
    tokenizer = load_tokenizer(path)
    model = LoadedModel(
        path=path,
        decoder=decoder,
        reader=reader,
        provider=provider,
        tokenizer=tokenizer,
        dense_bytes=dense_bytes,
        eos_ids=frozenset(cfg.eos_token_ids) | _eos_from_tokenizer_config(path, tokenizer),
        plan=plan,
        engine=engine,
        calibration=calibration,
    )
    if isinstance(provider, PipelinedProvider):  # no loader thread outlives a model nobody closed
        weakref.finalize(model, provider.loader.close)
    return model
