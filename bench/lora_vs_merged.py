"""How llama.cpp should serve a trained LoRA version: merged into a Q8_0 file, or the base
file with a GGUF LoRA adapter applied at load? One stream, greedy, 128 new tokens, alternating.

    python -m bench.lora_vs_merged VERSION_DIR BASE_GGUF [--runs 3]

VERSION_DIR is a trained LoRA version (`<data>/versions/NAME`, with `adapter/` and the
`model.q8_0.gguf` the registry writes); BASE_GGUF the Q8_0 base it was trained on
(`<data>/models/base/<name>.q8_0.gguf`). The adapter is written here in llama.cpp's GGUF LoRA
layout (`<tensor>.lora_a` / `.lora_b`, q/k rows permuted like the weights, `adapter.lora.alpha`).
Prints prefill seconds and decode tokens/s for both. The project serves merged files (README).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path

import gguf
import llama_cpp as ll
import numpy as np
from safetensors.numpy import load_file

from serving.chat import build_prompt
from serving.gguf_export import _permute
from serving.hardware import threads
from serving.llamacpp import model_params
from serving.registry import Registry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("base_gguf", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    base = gguf.GGUFReader(args.base_gguf)
    n_layers = int(base.fields["llama.block_count"].contents())
    n_head = int(base.fields["llama.attention.head_count"].contents())
    n_kv = int(base.fields["llama.attention.head_count_kv"].contents())
    adapter = Path(tempfile.mkdtemp()) / "adapter.gguf"
    config = json.loads((args.version_dir / "adapter" / "adapter_config.json").read_text())
    weights = load_file(args.version_dir / "adapter" / "adapter_model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    writer = gguf.GGUFWriter(adapter, "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(config["lora_alpha"]))
    for key, a in weights.items():
        if "lora_A" not in key:
            continue
        b = weights[key.replace("lora_A", "lora_B")]
        hf = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        if hf.endswith("q_proj.weight"):
            b = _permute(b, n_head)
        elif hf.endswith("k_proj.weight"):
            b = _permute(b, n_kv)
        name = names.get_name(hf, try_suffixes=(".weight",))
        writer.add_tensor(name + ".lora_a", a.astype(np.float32))
        writer.add_tensor(name + ".lora_b", b.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    prompt = build_prompt(Registry().tokenizer(), [{"role": "user", "content":
                          "Write a long story about a dragon."}], context_window=4096,
                          max_new_tokens=128).input_ids
    ll.llama_backend_init()
    setups = [("merged Q8_0 version", args.version_dir / "model.q8_0.gguf", None),
              ("Q8_0 base + GGUF LoRA adapter", args.base_gguf, adapter)]
    results: dict[str, list] = {label: [] for label, _, _ in setups}
    for _ in range(args.runs):  # alternating, so a busy neighbour slows both alike
        for label, path, lora in setups:
            results[label].append(_one_stream(path, lora, prompt))
    for label, runs in results.items():
        print(f"{label:<32} prefill {min(r[0] for r in runs):.3f} s, "
              f"decode {max(r[1] for r in runs):.1f} tok/s")


def _one_stream(path: Path, lora: Path | None, prompt: list[int]) -> tuple[float, float]:
    model = ll.llama_model_load_from_file(str(path).encode(), model_params())
    params = ll.llama_context_default_params()
    params.n_ctx, params.n_batch = 1024, 512
    params.n_threads = params.n_threads_batch = threads()
    ctx = ll.llama_init_from_model(model, params)
    if lora is not None:
        handle = ll.llama_adapter_lora_init(model, str(lora).encode())
        assert ll.llama_set_adapters_lora(ctx, (ll.llama_adapter_lora_p_ctypes * 1)(handle), 1,
                                          (ctypes.c_float * 1)(1.0)) == 0
    batch = ll.llama_batch_init(512, 0, 1)
    sampler = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    ll.llama_sampler_chain_add(sampler, ll.llama_sampler_init_greedy())

    def decode(tokens: list[int], start: int) -> None:
        for j, token in enumerate(tokens):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, start + j, 1
            batch.seq_id[j][0], batch.logits[j] = 0, j == len(tokens) - 1
        batch.n_tokens = len(tokens)
        assert ll.llama_decode(ctx, batch) == 0

    t0 = time.perf_counter()
    decode(prompt, 0)
    t1 = time.perf_counter()
    for i in range(128):
        decode([ll.llama_sampler_sample(sampler, ctx, -1)], len(prompt) + i)
    t2 = time.perf_counter()
    ll.llama_sampler_free(sampler)
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return t1 - t0, 128 / (t2 - t1)


if __name__ == "__main__":
    main()
