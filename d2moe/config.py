"""Frozen configs shared by conversion, storage and runtime.

`ModelConfig` is d2moe's canonical description of an MoE decoder: every family (the rows of
convert/families.py: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4.5, ERNIE-4.5, GPT-OSS, Llama 4, ...;
and the built-in MoEfied SmolLM2) maps its own config onto it, so the runtime has one code path. It is
stored verbatim in a store's `config.json` under "model"; fields added later have defaults that mean "as
before", so older stores keep loading.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from d2moe.engine.policies import policy_spec

QkNorm = Literal["none", "head", "full", "l2", "head_rope"]
RouterScoring = Literal["softmax", "linear", "sigmoid", "sparsemixer"]
AttentionKind = Literal["gqa", "mla"]
GroupScore = Literal["max", "top2"]
NormKind = Literal["rms", "layer"]
ExpertAct = Literal["swiglu", "clamped_swiglu"]


@dataclass(frozen=True)
class RopeScaling:
    """Scaled RoPE. yarn (arXiv 2309.00071): each frequency is blended between its original value
    (extrapolation, fast-rotating dims) and value / factor (interpolation, slow dims) by a linear ramp over
    the dims whose wavelength lies between beta_fast and beta_slow rotations of the original context.
    longrope (PhiMoE): frequency i is divided by dim_factors[i] (the checkpoint's short factors).
    llama3 (Llama 4): wavelengths longer than original / low_freq_factor are interpolated, shorter than
    original / high_freq_factor kept, and those between blended by where original / wavelength falls.
    Either way cos and sin are multiplied by `attention_factor`."""

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = field(default=True, metadata={"help": "round the ramp's ends to whole dims"})
    kind: Literal["yarn", "longrope", "llama3"] = "yarn"
    dim_factors: tuple[float, ...] = field(default=(), metadata={"help": "longrope: one divisor per frequency"})
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


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
    rope_scaling: RopeScaling | None = field(default=None, metadata={"help": "None: plain RoPE"})
    rms_norm_eps: float = 1e-6
    max_position: int = 4096
    tie_word_embeddings: bool = False
    attn_bias: bool = field(default=False, metadata={"help": "q/k/v projections carry biases (Qwen2-MoE)"})
    qk_norm: QkNorm = field(
        default="none", metadata={"help": "RMSNorm on q/k: per head (Qwen3-MoE), over all heads (OLMoE), l2: "
                                          "weightless per head after RoPE, RoPE layers only (Llama 4), or "
                                          "head_rope: per head with weights, after RoPE (HunYuan)"}
    )
    attention: AttentionKind = field(
        default="gqa",
        metadata={"help": "gqa: grouped-query attention; mla: multi-head latent attention (DeepSeek-V2/V3, "
                          "models/mla.py), whose head_dim is the q/k head dim qk_nope + qk_rope"},
    )
    q_lora_rank: int = field(default=0, metadata={"help": "MLA: rank of the query down-projection (0: full wq)"})
    kv_lora_rank: int = field(default=0, metadata={"help": "MLA: width of the cached key/value latent"})
    qk_rope_head_dim: int = field(default=0, metadata={"help": "MLA: rotary dims per q/k head (shared by heads)"})
    v_head_dim: int = field(default=0, metadata={"help": "MLA: value dims per head (0: head_dim)"})
    latent_norm_eps: float = field(
        default=0.0, metadata={"help": "MLA: eps of the q/kv latent RMSNorms (0: rms_norm_eps). GLM-4.7-Flash's "
                                       "are 1e-6 while its other norms use rms_norm_eps 1e-5"}
    )
    rotary_dim: int = field(default=0, metadata={"help": "leading dims of each head RoPE rotates (0: all; GLM: half)"})
    softmax_scale: float = field(default=0.0, metadata={"help": "attention scale (0: 1/sqrt(q/k head dim))"})
    attention_sinks: bool = field(
        default=False, metadata={"help": "a learned logit per head joins each softmax, attending to nothing (GPT-OSS)"}
    )
    sliding_window: int = field(default=0, metadata={"help": "keys per query on the sliding layers (0: none)"})
    sliding_layers: tuple[int, ...] = field(default=(), metadata={"help": "layers whose attention slides"})
    attention_chunk: int = field(default=0, metadata={"help": "chunked layers attend within chunks this long"})
    chunked_layers: tuple[int, ...] = field(default=(), metadata={"help": "layers attending within chunks"})
    nope_layers: tuple[int, ...] = field(default=(), metadata={"help": "layers without RoPE (Llama 4)"})
    temperature_floor: int = field(
        default=0, metadata={"help": "NoPE layers scale q by 1 + temperature_scale * log1p(floor((pos + 1) / "
                                     "temperature_floor)) (Llama 4; 0: off)"}
    )
    temperature_scale: float = 0.1
    post_norm: bool = field(
        default=False, metadata={"help": "each block's norm sits on its output before the residual add, not on "
                                         "its input (OLMo 2 / FlexOlmo): attn_norm / ffn_norm norm the outputs"}
    )
    norm: NormKind = field(default="rms", metadata={"help": "rms: RMSNorm; layer: LayerNorm with bias (PhiMoE)"})
    embedding_multiplier: float = field(default=1.0, metadata={"help": "scales the embeddings (Granite)"})
    residual_multiplier: float = field(default=1.0, metadata={"help": "scales each block's output (Granite)"})
    logit_scale: float = field(default=1.0, metadata={"help": "multiplies the logits (Granite: 1/logits_scaling)"})
    lm_head_bias: bool = field(default=False, metadata={"help": "the output head carries a bias (PhiMoE)"})
    # --- MoE layout ---
    num_experts: int = 8
    top_k: int = 2
    expert_intermediate: int = 0
    norm_topk_prob: bool = field(default=True, metadata={"help": "renormalise the top-k gate weights to sum 1"})
    router_scoring: RouterScoring = field(
        default="softmax",
        metadata={"help": "softmax: gate weights are softmax probs; linear: top-k of raw scores, plain sum; "
                          "sigmoid: per-expert sigmoid scores (DeepSeek-V3); sparsemixer: PhiMoE's masked "
                          "softmax per choice (models/moe.py)"},
    )
    router_bias: bool = field(
        default=False, metadata={"help": "a per-expert bias added to the scores for choosing only (DeepSeek-V3)"}
    )
    expert_groups: int = field(default=1, metadata={"help": "experts split in this many groups (DeepSeek)"})
    topk_groups: int = field(default=1, metadata={"help": "tokens choose experts within this many best groups"})
    group_score: GroupScore = field(
        default="max", metadata={"help": "a group's score: its best expert (V2) or its best two summed (V3)"}
    )
    routed_scaling_factor: float = field(default=1.0, metadata={"help": "multiplies the routed experts' weights"})
    expert_input_weighted: bool = field(
        default=False, metadata={"help": "the router's weight scales each expert's input, not its output (Llama 4)"}
    )
    sparsemixer_eps: float = field(
        default=0.01, metadata={"help": "sparsemixer: experts within 2*eps (relative) of the best one share "
                                        "its softmax"}
    )
    router_linear_bias: bool = field(default=False, metadata={"help": "the router has a bias (GPT-OSS)"})
    expert_act: ExpertAct = field(
        default="swiglu",
        metadata={"help": "swiglu: w2(silu(w1 x) * w3 x); clamped_swiglu (GPT-OSS): gate clamped above, up "
                          "clamped both ways at swiglu_limit, w2((up + 1) * gate * sigmoid(alpha * gate))"},
    )
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = field(
        default=False, metadata={"help": "experts' projections carry biases (held resident as expert_b1/b3/b2)"}
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
        if self.num_experts % self.expert_groups or self.topk_groups > self.expert_groups:
            raise ValueError(f"{self.num_experts} experts cannot form {self.expert_groups} groups "
                             f"with {self.topk_groups} chosen")
        if self.attention == "mla" and not (0 < self.qk_rope_head_dim < self.head_dim and self.kv_lora_rank > 0):
            raise ValueError("mla needs 0 < qk_rope_head_dim < head_dim and kv_lora_rank > 0")

    @property
    def rope_dim(self) -> int:
        """Dims each q/k head rotates: all of them, the leading `rotary_dim`, or MLA's decoupled rotary part."""
        return self.qk_rope_head_dim if self.attention == "mla" else (self.rotary_dim or self.head_dim)

    @property
    def latent_eps(self) -> float:
        return self.latent_norm_eps or self.rms_norm_eps

    @property
    def value_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def attn_scale(self) -> float:
        return self.softmax_scale or self.head_dim**-0.5

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in _TUPLE_FIELDS:
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        d = dict(d)
        for name in _TUPLE_FIELDS:
            if name in d:
                d[name] = tuple(d[name])
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**{**d["rope_scaling"],
                                              "dim_factors": tuple(d["rope_scaling"].get("dim_factors", ()))})
        return cls(**d)


_TUPLE_FIELDS = ("dense_layers", "eos_token_ids", "sliding_layers", "chunked_layers", "nope_layers")


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
    kv_slots: int = field(default=1, metadata={"help": "sequences served at once, each with `context` positions"})
    prefix_cache: int = field(default=0, metadata={"help": "KV positions kept for prompt prefixes other requests "
                                                           "reuse (engine/prefix_cache.py); 0: none"})
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
    adaptive_threads: bool = field(default=False, metadata={
        "help": "pick each step's compute threads from measured step times, up to torch's count (--threads auto; "
                "engine/threads.py)"})

    def __post_init__(self) -> None:
        policy_spec(self.policy)  # a clear error for an unknown name
        if self.context < 1 or self.step_tokens < 1 or self.loader_threads < 1 or self.kv_slots < 1:
            raise ValueError("context, kv_slots, step_tokens and loader_threads must be at least 1")
        if self.prefix_cache < 0:
            raise ValueError("prefix_cache must be >= 0")
        if self.max_wait is not None and self.max_wait < 0:
            raise ValueError("max_wait must be >= 0")
