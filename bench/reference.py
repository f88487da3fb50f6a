"""What keeping DPO's reference log-probabilities (`training prepare`) saves a round's steps.

    python -m bench.reference [--pairs 24] [--steps 5] [--batch 4] [--words 220]
        [--out bench/results]

The round's DPO (`training.tune.dpo_trainer`: LoRA on the embedded model, the round's
precision, `sft_weight` and length grouping) on `--pairs` made-up pairs (a 20-word question, a
chosen reply of `--words` words and a rejected one 10% shorter: tips' and example's pairs run
200-300 words) twice from the same start: every step computing its own reference (the
adapter switched off, one more forward of the batch), and with the reference kept, computed
first by `training.tune.reference_forward` as `prepare` does (its seconds a pair reported:
off the round's clock there). Prints the median step of each, their ratio, the losses of both
(they must agree: the same reference) and writes `reference.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from serving.config import ServingConfig
from serving.hardware import threads
from serving.registry import Registry
from training.config import TuneConfig
from training.tune import (ReferenceCache, dpo_trainer, lora_config, reference_forward,
                           use_kept_reference)

WORDS = ("the of and to in is you that it for are as with on be this or by can your make "
         "sure remember water plant light soil day week").split()


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._began = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._began)


def made_up_pairs(n: int, words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"prompt": [{"role": "user", "content": text(20) + "?"}],
             "chosen": [{"role": "assistant", "content": text(words)}],
             "rejected": [{"role": "assistant", "content": text(int(0.9 * words))}]}
            for _ in range(n)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--words", type=int, default=220)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(threads())
    cfg = replace(TuneConfig(), method="dpo", batch_size=args.batch, max_steps=args.steps)
    pairs = made_up_pairs(args.pairs, args.words)
    registry = Registry()
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        kept = ReferenceCache(Path(tmp) / "kept", "bench", cfg)
        for arm in ("every step", "kept"):
            loaded = registry.load(None, ServingConfig(dtype="float32"))
            if arm == "kept":  # as `prepare` does, on a copy of its own
                other = registry.load(None, ServingConfig(dtype="float32"))
                trainer, _ = dpo_trainer(other.model, other.tokenizer, pairs, cfg,
                                         Path(tmp) / "prepare", lora_config(cfg, other.model))
                began = time.perf_counter()
                reference_forward(trainer, pairs, list(range(len(pairs))), kept)
                prepare_s = time.perf_counter() - began
                del other, trainer
            times = StepTimes()
            trainer, _ = dpo_trainer(loaded.model, loaded.tokenizer, pairs, cfg,
                                     Path(tmp) / arm, lora_config(cfg, loaded.model),
                                     callbacks=[times])
            used = use_kept_reference(trainer, pairs, kept if arm == "kept" else None)
            trainer.train()
            runs[arm] = {"reference": used["source"],
                         "step_s": [round(s, 2) for s in times.seconds],
                         "median_step_s": round(statistics.median(times.seconds[1:]), 2),
                         "losses": [round(h["loss"], 4) for h in trainer.state.log_history
                                    if "loss" in h]}
    report = {"pairs": args.pairs, "batch": args.batch, "words": args.words,
              "steps": args.steps, "bf16": cfg.bf16, "threads": threads(),
              "cpu": platform.processor() or platform.machine(), "runs": runs,
              "prepare_s_a_pair": round(prepare_s / len(pairs), 2),
              "speedup": round(runs["every step"]["median_step_s"]
                               / runs["kept"]["median_step_s"], 2),
              "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    report["saved_s_a_pair_reached"] = round(
        (runs["every step"]["median_step_s"] - runs["kept"]["median_step_s"]) / args.batch, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reference.json").write_text(json.dumps(report, indent=2) + "\n")
    for arm, r in runs.items():
        print(f"reference {arm:<11} median step {r['median_step_s']:.2f} s "
              f"(batch {args.batch}, ~{args.words} words a reply), losses {r['losses']}")
    print(f"kept is {report['speedup']:.2f}x as fast a step; keeping it cost "
          f"{report['prepare_s_a_pair']:.2f} s a pair (in `prepare`, off the round's clock), "
          f"and saves {report['saved_s_a_pair_reached']:.2f} s for each pair a step reaches")
    return report


if __name__ == "__main__":
    main()
