"""Frozen configs shared by conversion, storage and runtime.

`ModelConfig` is d2moe's canonical description of an MoE decoder: every family (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, the built-in MoEfied SmolLM2) maps its own config onto it, so the runtime has one
code path. It is stored verbatim in a store's `config.json` under "model".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from d2moe.engine.policies import policy_spec

QkNorm = Literal["none", "head", "full"]
RouterScoring = Literal["softmax", "linear"]


@dataclass(frozen=True)
class ModelConfig:
    """Canonical MoE decoder description (one code path for all families)."""

    family: str = field(metadata={"help": "source family, e.g. mixtral, qwen2_moe, qwen3_moe, olmoe, moefied_llama"})
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position: int = 4096
    tie_word_embeddings: bool = False
    attn_bias: bool = field(default=False, metadata={"help": "q/k/v projections carry biases (Qwen2-MoE)"})
    qk_norm: QkNorm = field(
        default="none", metadata={"help": "RMSNorm on q/k: per head (Qwen3-MoE) or over all heads (OLMoE)"}
    )
    # --- MoE layout ---
    num_experts: int = 8
    top_k: int = 2
    expert_intermediate: int = 0
    norm_topk_prob: bool = field(default=True, metadata={"help": "renormalise the top-k gate weights to sum 1"})
    router_scoring: RouterScoring = field(
        default="softmax",
        metadata={"help": "softmax: gate weights are softmax probs; linear: top-k of raw scores, plain sum"},
    )
    shared_expert_intermediate: int = field(default=0, metadata={"help": "0: no shared expert"})
    shared_expert_gate: bool = field(default=False, metadata={"help": "sigmoid gate on the shared expert (Qwen2)"})
    dense_layers: tuple[int, ...] = field(default=(), metadata={"help": "layers with a dense FFN instead of MoE"})
    dense_intermediate: int = 0
    absent_expert_bias: bool = field(
        default=False, metadata={"help": "add a learned vector for each expert a token did not choose"}
    )
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        d = dict(d)
        d["dense_layers"] = tuple(d.get("dense_layers", ()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


MWQMethod = Literal["msb", "residual", "gptq"]
MWQ_METHODS: tuple[str, ...] = ("msb", "residual", "gptq")


@dataclass(frozen=True)
class MWQConfig:
    """Matryoshka weight quantization: 2-bit base + sign planes 3..max_bits, groups along the input dim."""

    group_size: int = field(default=64, metadata={"help": "weights per group along the input dimension"})
    method: MWQMethod = field(
        default="msb",
        metadata={"help": "msb: INT8 read by top bits; residual: fitted planes (one more scale per plane); "
                          "gptq: msb's layout, codes by multi-width GPTQ on calibration activations"},
    )
    min_bits: int = 2
    max_bits: int = 8

    def __post_init__(self) -> None:
        if self.method not in MWQ_METHODS:
            raise ValueError(f"unknown MWQ method {self.method!r} (choose one of {', '.join(MWQ_METHODS)})")
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"group size must be a positive multiple of 8, got {self.group_size}")
        if not 2 == self.min_bits <= self.max_bits <= 8:
            raise ValueError("bits must satisfy 2 == min_bits <= max_bits <= 8")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(range(self.min_bits, self.max_bits + 1))

    @property
    def layout(self) -> Literal["msb", "residual"]:
        """How the values are stored and computed: residual stores a scale per plane; msb and gptq derive
        them by halving (gptq only chooses other codes and grids than msb: same bytes, same kernels)."""
        return "residual" if self.method == "residual" else "msb"




@dataclass(frozen=True)
class EngineConfig:
    """How a store is served: memory budget, expert policy, I/O. Built once from the CLI, passed down."""

    memory_budget: int | None = field(
        default=None,
        metadata={"help": "bytes for everything the model holds: dense weights, KV cache, scratch, expert cache "
                          "(None: room for every expert at 8 bits)"},
    )
    context: int = field(default=2048, metadata={"help": "tokens of KV cache reserved (prompt + generated)"})
    step_tokens: int = field(default=512, metadata={"help": "most tokens one forward step runs (scratch size)"})
    full_logits: bool = field(default=False, metadata={"help": "steps return logits for every token (eval)"})
    policy: str = field(
        default="d2moe",
        metadata={"help": "d2moe: pipelined HEBF + plane cache + prefetch; lru: synchronous reads, LRU cache; "
                          "hold: every expert resident at the request's width; matryoshka-free, edgemoe, "
                          "hobbit: the peers' ideas on this engine (see engine/policies.py)"},
    )
    prefetch: bool = field(default=True, metadata={"help": "predict and prefetch the next layer's experts"})
    max_wait: float | None = field(
        default=None,
        metadata={"help": "seconds compute waits for a late high plane before using the planes it has "
                          "(None: always wait; 0: --no-stall)"},
    )
    loader_threads: int = field(default=1, metadata={"help": "I/O threads (one saturates the disks measured here)"})
    direct_io: bool | None = field(default=None, metadata={"help": "O_DIRECT: None = when the filesystem allows"})
    record_timeline: bool = field(default=False, metadata={"help": "keep I/O and compute events for plots"})

    def __post_init__(self) -> None:
        policy_spec(self.policy)  # a clear error for an unknown name
        if self.context < 1 or self.step_tokens < 1 or self.loader_threads < 1:
            raise ValueError("context, step_tokens and loader_threads must be at least 1")
        if self.max_wait is not None and self.max_wait < 0:
            raise ValueError("max_wait must be >= 0")
