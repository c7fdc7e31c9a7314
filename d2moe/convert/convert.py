"""Conversion: a local Hugging Face checkpoint (or a canonical d2moe checkpoint) -> a bit-nested store.

Streams safetensors shards tensor by tensor, maps names through the family's table, quantizes each
expert once into its MWQ blob and writes everything through the atomic StoreWriter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from d2moe.config import ModelConfig, MWQConfig
from d2moe.convert.dequant import dequantize_fp8_blocks, dequantize_mxfp4
from d2moe.convert.families import ConversionError, Part, family_for, tensor_parts
from d2moe.convert.hessians import LayerHessians, calibration_windows, collect_hessians
from d2moe.models.decoder import MoEDecoder
from d2moe.models.dense import DenseWeight, quantize_int8, to_stored, wants_int8
from d2moe.models.expert_provider import TensorExpertProvider
from d2moe.models.names import EXPERT_MATRICES, attention_names, expert_name, is_expert_name, top_names
from d2moe.quant.gptq import quantize_gptq
from d2moe.quant.mwq import NestedWeight, quantize
from d2moe.quant.pack import ExpertLayout, pack_expert
from d2moe.storage.format import BLOB_ALIGNMENT, TOKENIZER_FILES, StoreConfig
from d2moe.storage.writer import StoreWriter

log = logging.getLogger(__name__)

CANONICAL_MARKER = "d2moe_checkpoint.json"
CALIBRATION_FILE = "calibration.safetensors"


@dataclass(frozen=True)
class TensorRef:
    """Where a canonical tensor lives: a shard, the name in it, and which part of that tensor (with the
    shard of its MXFP4 scales when it has them)."""

    shard: Path
    name: str
    part: Part | None = None
    scales_shard: Path | None = None


@dataclass(frozen=True)
class Source:
    """A checkpoint opened for conversion: its canonical config and where each canonical tensor lives."""

    path: Path
    model: ModelConfig
    tensors: dict[str, TensorRef]  # canonical name -> where it is stored
    fix: Callable[[str, torch.Tensor], torch.Tensor] | None = None  # the family's per-tensor rewrite


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None


def _shard_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise ConversionError(f"{src}: missing shard(s) {', '.join(missing)} listed in {index.name}")
        return [src / n for n in names]
    shards = sorted(src.glob("*.safetensors"))
    shards = [s for s in shards if s.name != CALIBRATION_FILE]
    if not shards:
        hint = " (only PyTorch .bin files; re-save with safetensors)" if list(src.glob("*.bin")) else ""
        raise ConversionError(f"{src}: no safetensors weights found{hint}")
    return shards


def open_source(src: Path) -> Source:
    """Identify the checkpoint's family and index its tensors under canonical names."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such directory")
    fix, fp8_block = None, None
    if (src / CANONICAL_MARKER).is_file():
        meta = _read_json(src / CANONICAL_MARKER)
        model = ModelConfig.from_dict(meta["model"])
        rename = lambda n: [(n, None)]  # noqa: E731 - canonical checkpoints already use canonical names
    else:
        if not (src / "config.json").is_file():
            raise ConversionError(f"{src}: no config.json; is this a Hugging Face checkpoint directory?")
        hf = _read_json(src / "config.json")
        fam = family_for(hf)
        model = fam.config_fn(hf, fam.name)
        rename = lambda n: tensor_parts(fam, model, n)  # noqa: E731
        fp8_block = _fp8_block(hf)
        if fam.fix is not None:
            fix = lambda name, t: fam.fix(hf, model, name, t)  # noqa: E731
    stored: dict[str, Path] = {}  # HF name -> its shard
    for shard in _shard_files(src):
        try:
            with safe_open(str(shard), "pt") as f:
                stored.update((name, shard) for name in f.keys())
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise ConversionError(f"{shard}: cannot read safetensors header ({e})") from None
    tensors: dict[str, TensorRef] = {}
    for name, shard in stored.items():
        for canon, part in rename(name):
            fp8_scales = name.removesuffix("weight") + "weight_scale_inv"
            if fp8_block is not None and part is None and fp8_scales in stored:
                part = Part(fp8_scales=fp8_scales, fp8_block=fp8_block)
            scales = (part.mxfp4_scales or part.fp8_scales) if part is not None else None
            if scales is not None and scales not in stored:
                raise ConversionError(f"{src}: quantized tensor {name} has no {scales}")
            tensors[canon] = TensorRef(shard, name, part, stored[scales] if scales else None)
    _check_complete(model, tensors, src)
    return Source(src, model, tensors, fix)


def _fp8_block(hf: dict) -> tuple[int, int] | None:
    """The weight block of a block-FP8 checkpoint (DeepSeek-V3's release), None for others."""
    qc = hf.get("quantization_config") or {}
    if qc.get("quant_method") != "fp8":
        return None
    if qc.get("activation_scheme", "dynamic") != "dynamic" or qc.get("fmt", "e4m3") != "e4m3":
        raise ConversionError(f"FP8 checkpoints with {qc} are not supported (block e4m3 weights are)")
    bo, bi = qc.get("weight_block_size") or (128, 128)
    return int(bo), int(bi)


def _check_complete(model: ModelConfig, tensors: dict, src: Path) -> None:
    need = list(top_names(model))
    for L in range(model.num_layers):
        p = f"layers.{L}."
        need += [p + n for n in attention_names(model)]
        if L in model.dense_layers:
            need += [p + "ffn." + m for m in EXPERT_MATRICES]
        else:
            need.append(p + "router")
            need += [p + "router_bias"] if model.router_bias else []
            need += [p + "router_b"] if model.router_linear_bias else []
            need += [p + n for n in ("expert_b1", "expert_b3", "expert_b2")] if model.expert_bias else []
            need += [expert_name(L, e, m) for e in range(model.num_experts) for m in EXPERT_MATRICES]
            if model.shared_expert_intermediate:
                need += [p + "shared." + m for m in EXPERT_MATRICES]
    missing = [n for n in need if n not in tensors]
    if missing:
        raise ConversionError(f"{src}: checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")


def expert_layout(model: ModelConfig, mwq: MWQConfig) -> ExpertLayout:
    H, I = model.hidden_size, model.expert_intermediate
    for dim, what in ((H, "hidden size"), (I, "expert intermediate size")):
        if dim % mwq.group_size:
            raise ConversionError(f"group size {mwq.group_size} does not divide the {what} {dim}; pass --group-size")
    return ExpertLayout((("w1", I, H), ("w3", I, H), ("w2", H, I)), mwq, slice_align=BLOB_ALIGNMENT)


class _TensorReader:
    """Keeps shard files open for the duration of a conversion."""

    def __init__(self, stack: ExitStack, source: Source) -> None:
        self.source = source
        shards = {ref.shard for ref in source.tensors.values()}
        shards |= {ref.scales_shard for ref in source.tensors.values() if ref.scales_shard is not None}
        self._files = {s: stack.enter_context(safe_open(str(s), "pt")) for s in shards}

    def get(self, canon: str) -> torch.Tensor:
        ref = self.source.tensors[canon]
        t = self._read(ref) if ref.part is not None else self._files[ref.shard].get_tensor(ref.name)
        return t if self.source.fix is None else self.source.fix(canon, t)

    def _read(self, ref: TensorRef) -> torch.Tensor:
        """The part of a stored tensor (reads one expert's slice when the part names one)."""
        part = ref.part
        f = self._files[ref.shard]
        t = f.get_tensor(ref.name) if part.expert is None else f.get_slice(ref.name)[part.expert]
        if part.mxfp4_scales is not None:
            sf = self._files[ref.scales_shard]
            s = sf.get_tensor(part.mxfp4_scales) if part.expert is None else sf.get_slice(part.mxfp4_scales)[
                part.expert]
            t = dequantize_mxfp4(t, s)
        if part.fp8_scales is not None:
            t = dequantize_fp8_blocks(t, self._files[ref.scales_shard].get_tensor(part.fp8_scales), part.fp8_block)
        if part.rows is not None:
            t = t[slice(*part.rows)]
        if part.cols is not None:
            t = t[:, slice(*part.cols)]
        return (t.T if part.transposed else t).contiguous()


def load_tensors(source: Source) -> dict[str, torch.Tensor]:
    """Every canonical tensor of `source` in memory (reference paths and tests; conversion streams instead)."""
    with ExitStack() as stack:
        reader = _TensorReader(stack, source)
        return {name: reader.get(name) for name in source.tensors}


def reference_decoder(src: Path) -> MoEDecoder:
    """An unquantized fp32 decoder straight from a checkpoint: the reference every store is measured against."""
    source = open_source(src)
    tensors = {k: v.float() for k, v in load_tensors(source).items()}
    dense = {k: v for k, v in tensors.items() if not is_expert_name(k)}
    return MoEDecoder(source.model, dense, TensorExpertProvider(tensors))


def _calibration(src: Path) -> dict[str, torch.Tensor]:
    """Mean squared input activation per column of each expert matrix, when the source ships them."""
    path = src / CALIBRATION_FILE
    return load_file(str(path)) if path.is_file() else {}


def _dense_tensor(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> DenseWeight:
    """Vectors in fp32; matrices in `dtype` (None: as stored). torch.int8 means int8 per row and 64 columns
    (dense.py) for the matrices that go through `linear`/`embedding`, and fp32 for the small rest (routers, gates)."""
    if t.dim() < 2:
        return t.float()
    if dtype == torch.int8:
        return quantize_int8(t) if wants_int8(name, t) else t.float()
    return t if dtype is None else t.to(dtype)


def _rows(q: NestedWeight, lo: int, hi: int) -> NestedWeight:
    """Output rows lo:hi of a quantized matrix (w1 and w3 are quantized together: they share their input)."""
    return NestedWeight(q.offset[lo:hi].contiguous(), q.base_scale[lo:hi].contiguous(), q.base[lo:hi].contiguous(),
                        q.plane_scales[:, lo:hi].contiguous(), q.planes[:, lo:hi].contiguous())


def quantize_layer_gptq(ws: dict[str, list[torch.Tensor]], hess: LayerHessians, mwq: MWQConfig
                        ) -> list[dict[str, NestedWeight]]:
    """One layer's experts (ws[m][e] float32) by multi-width GPTQ, batched over the experts."""
    n_exp, inter = len(ws["w1"]), ws["w1"][0].shape[0]
    w13 = torch.stack([torch.cat([ws["w1"][e], ws["w3"][e]]) for e in range(n_exp)])  # [E, 2I, H]
    q13 = quantize_gptq(w13, torch.stack([hess[e][0] for e in range(n_exp)]), mwq)
    q2 = quantize_gptq(torch.stack(ws["w2"]), torch.stack([hess[e][1] for e in range(n_exp)]), mwq)
    return [{"w1": _rows(q13[e], 0, inter), "w3": _rows(q13[e], inter, 2 * inter), "w2": q2[e]} for e in range(n_exp)]


def convert(
    src: Path,
    out: Path,
    mwq: MWQConfig = MWQConfig(),
    *,
    dense_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    calib_texts: list[Path] | None = None,
    calib_tokens: int = 4096,
) -> Path:
    """Convert `src` into a store at `out` (atomically). Returns `out`.

    Dense matrices are stored in `dense_dtype` (None: as the source stores them; torch.int8: int8 with a bf16
    scale per row and 64 columns, or per row where the width is not a multiple of 64; models/dense.py);
    vectors (norms, biases) always in fp32, since they are tiny and feed the fp32 residual stream.

    `mwq.method == "gptq"` needs `calib_texts` (never the evaluation text): about `calib_tokens` tokens of
    them run through the fp32 source model, and each layer's experts are quantized from their inputs'
    Hessians as soon as that layer has run (convert/hessians.py, quant/gptq.py).
    """
    if mwq.method == "gptq" and not calib_texts:
        raise ConversionError("--mwq gptq needs calibration text (--calib-text FILE...; never the evaluation text)")
    source = open_source(src)
    model = source.model
    layout = expert_layout(model, mwq)
    shapes = tuple((n, o, i) for n, o, i in layout.shapes)
    store_cfg = StoreConfig(model=model, mwq=mwq, expert_shapes=shapes, source=str(Path(src).resolve()))
    calib = _calibration(Path(src))
    total = len(model.moe_layers) * model.num_experts
    with ExitStack() as stack:
        reader = _TensorReader(stack, source)
        writer = stack.enter_context(StoreWriter(Path(out), store_cfg, overwrite=overwrite))
        dense = {n: _dense_tensor(n, reader.get(n), dense_dtype) for n in source.tensors if not is_expert_name(n)}
        writer.write_dense(to_stored(dense))
        del dense
        slice_bytes = [layout.slice_bytes(b) for b in mwq.widths]
        bar = tqdm(total=total, desc="quantizing experts", unit="expert", disable=not progress, leave=False)

        def expert_weights(L: int, e: int) -> tuple[torch.Tensor, ...]:
            return tuple(reader.get(expert_name(L, e, m)).float() for m in EXPERT_MATRICES)

        def write_layer(L: int, hess: LayerHessians | None) -> None:
            if hess is not None:
                ws = [expert_weights(L, e) for e in range(model.num_experts)]
                quantized = quantize_layer_gptq({m: [w[i] for w in ws] for i, m in enumerate(EXPERT_MATRICES)},
                                                hess, mwq)
            else:
                quantized = ({m: quantize(reader.get(expert_name(L, e, m)).float(), mwq, calib.get(expert_name(L, e, m)))
                              for m in EXPERT_MATRICES} for e in range(model.num_experts))
            for e, weights in enumerate(quantized):
                writer.add_expert(L, e, pack_expert(layout, weights), slice_bytes)
                bar.update()

        if mwq.method == "gptq":
            windows = calibration_windows(Path(src) / "tokenizer.json", list(calib_texts), calib_tokens)
            fp32 = {n: reader.get(n).float() for n in source.tensors if not is_expert_name(n)}
            collect_hessians(model, fp32, expert_weights, windows, write_layer)
            del fp32
        else:
            for L in model.moe_layers:
                write_layer(L, None)
        bar.close()
        copied = writer.copy_files(Path(src), TOKENIZER_FILES)
        if "tokenizer.json" not in copied:
            log.warning("%s has no tokenizer.json: `run` and `eval` will need one in the store", src)
        return writer.commit()
