"""Export as one llama.cpp GGUF file, written with the `gguf` package (the reference writer llama.cpp ships).

Metadata first (architecture hyperparameters as llama.cpp's converter writes them, the tokenizer), then
each tensor streamed in turn: GGUFWriter's header lists every tensor's shape and type before any data, which
export knows from the store's shapes, so no more than one tensor is in memory at a time.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from d2moe.config import ModelConfig
from d2moe.default_model.gguf_llama import permute_rope
from d2moe.export.atomic import atomic_output
from d2moe.export.gguf_arch import Arch, Entry, arch_for, tensor_entries
from d2moe.export.gguf_quant import dense_type, encode, encode_expert, expert_type, file_type, nbytes
from d2moe.export.gguf_vocab import read_vocab
from d2moe.export.names import family_named
from d2moe.export.source import ExportSource

T = gguf.MODEL_TENSOR
_F32 = (T.ATTN_NORM, T.FFN_NORM, T.OUTPUT_NORM, T.ATTN_Q_NORM, T.ATTN_K_NORM, T.FFN_GATE_INP, T.FFN_GATE_INP_SHEXP)


def add_hparams(w: gguf.GGUFWriter, model: ModelConfig, arch: Arch, name: str) -> None:
    """The keys llama.cpp reads for these architectures (the values its converter takes from config.json)."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(model.num_layers)
    w.add_context_length(model.max_position)
    w.add_embedding_length(model.hidden_size)
    w.add_feed_forward_length(model.expert_intermediate)
    w.add_head_count(model.num_heads)
    w.add_head_count_kv(model.num_kv_heads)
    w.add_key_length(model.head_dim)
    w.add_value_length(model.head_dim)
    w.add_rope_dimension_count(model.head_dim)
    w.add_rope_freq_base(model.rope_theta)
    w.add_layer_norm_rms_eps(model.rms_norm_eps)
    w.add_vocab_size(model.vocab_size)
    w.add_expert_count(model.num_experts)
    w.add_expert_used_count(model.top_k)
    if arch.name != "llama":
        w.add_expert_feed_forward_length(model.expert_intermediate)
    if arch.shared_expert:
        w.add_expert_shared_feed_forward_length(model.shared_expert_intermediate)


def _shape(entry: Entry, source: ExportSource) -> tuple[int, ...]:
    shape = source.shape(entry.sources[0])
    if entry.flatten:
        shape = (int(np.prod(shape)),)
    return (len(entry.sources), *shape) if entry.stacked else shape


def _qtype(entry: Entry, source: ExportSource) -> gguf.GGMLQuantizationType:
    if entry.stacked:
        return expert_type(source.bits)
    return dense_type(source.dense_dtype, _shape(entry, source), entry.tensor in _F32)


def _data(entry: Entry, source: ExportSource, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if entry.stacked:  # experts from their packed grids, one at a time
        rows = []
        for canon in entry.sources:
            _, layer, _, expert, matrix = canon.split(".")
            rows.append(encode_expert(source.packed(int(layer), int(expert))[matrix], source.bits, qtype))
        return np.stack(rows)
    t = source.tensor(entry.sources[0]).float()
    if entry.permute_heads:
        t = permute_rope(t, entry.permute_heads)
    return encode(t.reshape(-1) if entry.flatten else t, qtype)


def write_gguf(source: ExportSource, out: Path, *, progress: bool = True) -> Path:
    """Write the store at its export width as the GGUF file `out` (atomically)."""
    model = source.model
    family_named(model.family)  # the built-in model gets its own reason
    arch = arch_for(model)
    vocab = read_vocab(source.path, model)
    entries = tensor_entries(model, arch, set(source.names()))
    qtypes = [_qtype(e, source) for e in entries]
    with atomic_output(out, directory=False) as tmp:
        w = gguf.GGUFWriter(None, arch.name)
        add_hparams(w, model, arch, source.path.name)
        w.add_file_type(file_type(expert_type(source.bits)))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(w)
        for e, q in zip(entries, qtypes):
            shape = _shape(e, source)
            w.add_tensor_info(e.name, shape, np.dtype(np.float32), nbytes(shape, q), raw_dtype=q)
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = tqdm(total=len(entries), desc=f"exporting {source.bits}-bit gguf", unit="tensor",
                   disable=not progress, leave=False)
        for e, q in zip(entries, qtypes):
            w.write_tensor_data(_data(e, source, q))
            bar.update()
        bar.close()
        w.close()
    return Path(out)

