"""Training step time by dtype on this machine: what `tune.bf16`'s default should be here.

    python -m bench.train_step [--steps 4] [--batch 4] [--tokens 256]

One LoRA training step of the embedded model (forward, backward, optimizer; the work of a DPO or
KTO step on `--batch` rows of `--tokens` tokens), in float32 and under bfloat16 autocast,
alternating, median of `--steps`. Prints both, the ratio, and what `CHAT_DTYPE=auto` picks here
(bfloat16 only where the CPU has AVX-512 BF16 or AMX). Writes `train_step.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from serving.hardware import detect_dtype, threads
from serving.model import resolve_base


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads())
    _, source = resolve_base()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(100, 40000, (args.batch, args.tokens))
    times: dict[str, list[float]] = {"float32": [], "bfloat16 autocast": []}

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    step(False), step(True)  # warm up both paths
    for _ in range(args.steps):
        times["float32"].append(step(False))
        times["bfloat16 autocast"].append(step(True))
    dtype, why = detect_dtype()
    report = {"batch": args.batch, "tokens": args.tokens, "threads": threads(),
              "median_s": {k: statistics.median(v) for k, v in times.items()},
              "auto_picks": dtype, "why": why,
              "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    report["bf16_speedup"] = report["median_s"]["float32"] / report["median_s"]["bfloat16 autocast"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps(report, indent=2) + "\n")
    for k, v in report["median_s"].items():
        print(f"{k:<18} {v:.2f} s a step (batch {args.batch} x {args.tokens} tokens)")
    print(f"bfloat16 autocast is {report['bf16_speedup']:.2f}x float32 here; "
          f"CHAT_DTYPE=auto picks {dtype}: {why}")
    return report


if __name__ == "__main__":
    main()
