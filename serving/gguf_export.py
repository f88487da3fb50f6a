"""Writing a transformers Llama checkpoint as a GGUF file llama.cpp loads (Q8_0 by default).

Every promoted version is written once, merged (LoRA folded into the weights), beside its other
files as `model.gguf`, so llama.cpp serves it directly: no parent chain, no adapter at load.
Only what llama.cpp reads is written: the Llama hyper-parameters from the model's config, the
tokenizer and chat template copied from the embedded GGUF file (the model must use that same
vocabulary: checked), and the tensors renamed with `gguf`'s own name map. llama.cpp stores the
q and k projections permuted for its rotary embedding (as its `convert_hf_to_gguf.py` does);
the output head is tied to the embeddings and not written.

Q8_0 rather than the shipped Q4_1: a LoRA round's change to a weight is small, and 4-bit
rounding (an error of up to 1/30 of a block's range) can be as large as the change itself;
8-bit keeps it. Q8_0 is also faster here: llama.cpp multiplies Q8_0 weights by a batch of
tokens with its blocked matrix kernels, and Q4_1 one token at a time (measured on 2 cores: one
stream 122 vs 111 tok/s, 8 streams 236 vs 177). So the shipped base is served as Q8_0 too,
re-encoded from its own file in seconds (`requantize`; the 8-bit rounding adds an error about
a tenth of the 4-bit one already in the file). The gate judges the very file users get.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

QUANT = "Q8_0"


class NotConvertible(ValueError):
    """The model cannot be written as GGUF here (not a Llama, or another vocabulary)."""


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def export_gguf(model, out: Path, *, name: str, tokenizer_gguf: Path, quant: str = QUANT) -> Path:
    """Write `model` (a transformers LlamaForCausalLM) to `out` atomically; returns `out`."""
    import gguf

    cfg = model.config
    if cfg.model_type != "llama":
        raise NotConvertible(f"only Llama models are written as GGUF here, not {cfg.model_type}")
    reader = gguf.GGUFReader(tokenizer_gguf)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    if len(tokens.data) != cfg.vocab_size:
        raise NotConvertible(f"the model's vocabulary ({cfg.vocab_size}) is not the embedded "
                             f"tokenizer's ({len(tokens.data)})")
    qtype = gguf.GGMLQuantizationType[quant]
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head

    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType["ALL_F32" if quant == "F32" else f"MOSTLY_{quant}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise NotConvertible(f"no GGUF name for the tensor {hf_name}")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        if (quant != "F32" and data.ndim == 2
                and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0):
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, data.astype(np.float32))
    return _finish(writer, tmp, out)


def requantize(src: Path, out: Path, quant: str = QUANT) -> Path:
    """Copy a GGUF file with its 4/5-bit tensors re-encoded as `quant` (metadata kept)."""
    import gguf

    reader = gguf.GGUFReader(src)
    qtype = gguf.GGMLQuantizationType[quant]
    arch = reader.fields["general.architecture"].contents()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(tmp, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType["ALL_F32" if quant == "F32" else f"MOSTLY_{quant}"])
    keep = {gguf.GGMLQuantizationType.F32, qtype}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        if t.tensor_type in keep:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
            continue
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        if quant == "F32" or data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            writer.add_tensor(t.name, data.astype(np.float32))
        else:
            writer.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    return _finish(writer, tmp, out)


def _finish(writer, tmp: Path, out: Path) -> Path:
    """Write the file under its temporary name, then rename it into place (atomic)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out
