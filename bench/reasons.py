"""Do stated reasons make a better judge? The reward model with and without `reason_margin`.

    python -m bench.reasons [--users concise,bold,tips] [--prompts 150] [--replies-per-prompt 4]
        [--max-steps 40] [--margin 1.0] [--out DIR]

The base model answers the training prompts (`bench/prompts.jsonl`, batched through `serving`);
each simulated user (`bench/users.py`: a reason chip only when the case is clear-cut) votes on
every reply through the page's `ChatSession`, into a store of its own; the real
`training.dataset` makes the pairs (each with its strength) and the held-out split. The reward
model is trained twice on the same pairs, the same steps and seed: every pair alike
(`reason_margin` 0) and with the margin. Reported: each judge's AUC on the held-out votes and its
held-out pair accuracy, and the paired AUC difference with its 95% bootstrap interval.
Writes `reasons.json` into the output folder. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from bench.loop import load_prompts, record_votes, replies


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", default="concise,bold,tips")
    parser.add_argument("--prompts", type=int, default=150)
    parser.add_argument("--replies-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=40, help="reward-model steps, both runs")
    parser.add_argument("--margin", type=float, default=1.0, help="reason_margin of the 2nd run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reasons")
    args = parser.parse_args(argv)
    from bench.users import make_users, unknown_users, words
    if message := unknown_users(args.users.split(",")):
        parser.error(f"--users: {message}")

    from serving.config import GenerationSettings
    from serving.model import resolve_base
    from serving.registry import Registry, VersionDir
    from training.config import DataConfig, RewardModelConfig
    from training.dataset import load_feedback, reward_pairs, split
    from training.reward import train_reward_model
    from training.stats import auc_difference
    from training.synthetic import judge_quality

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    shutil.rmtree(data, ignore_errors=True)
    os.environ["CHAT_DATA_DIR"] = str(data)
    train_pool, _ = load_prompts()
    prompts = train_pool[:args.prompts]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=None)
    texts, version = replies(prompts, args.replies_per_prompt, settings)
    users = make_users(args.users.split(","), [words(t) for ts in texts for t in ts])
    _, source = resolve_base()
    tokenizer = Registry().tokenizer()
    cfg = RewardModelConfig(max_steps=args.max_steps)
    results = {"args": {k: str(v) for k, v in vars(args).items() if k != "out"}, "users": {}}
    for user in users:
        # each user's own store (the base model's replies are shared)
        os.environ["CHAT_DATABASE_URL"] = f"sqlite:///{data / (user.name + '.db')}"
        counts = record_votes(user, prompts, texts, version, settings.to_dict())
        train, heldout = split(load_feedback(), DataConfig())
        row = {"describe": user.describe, "votes": counts, "train": train.counts,
               "heldout": heldout.counts, "runs": {}}
        scores = {}
        for margin in (0.0, args.margin):
            pairs = reward_pairs(train, DataConfig(), margin)
            t = time.monotonic()
            judge, summary = train_reward_model(
                source, tokenizer, pairs, replace(cfg, reason_margin=margin),
                VersionDir(data / f"{user.name}-{margin}"), float("inf"))
            quality, _ = judge_quality(judge, heldout, confidence=0.95, samples=2000)
            scores[margin] = judge.score([v["prompt"] + v["completion"] for v in heldout.votes])
            row["runs"][str(margin)] = {**summary, "judge": quality,
                                        "seconds": round(time.monotonic() - t, 1)}
        labels = [v["label"] for v in heldout.votes]
        row["auc_difference"] = auc_difference(scores[args.margin], scores[0.0], labels,
                                               confidence=0.95, samples=2000).to_dict()
        results["users"][user.name] = row
        (args.out / "reasons.json").write_text(json.dumps(results, indent=2) + "\n")
        print_row(user.name, row, args.margin, flush=True)
    return results


def print_row(name: str, row: dict, margin: float, flush: bool = False) -> None:
    runs = [row["runs"][k]["judge"] for k in ("0.0", str(margin))]
    auc = [f"{j['auc']['estimate']:.3f} [{j['auc']['low']:.2f},{j['auc']['high']:.2f}]"
           if j.get("auc") else "-" for j in runs]
    acc = [f"{j['pair_accuracy']:.0%}" if j.get("pair_accuracy") is not None else "-"
           for j in runs]
    d = row["auc_difference"]
    print(f"{name:<10} votes {row['train']['votes']}+{row['heldout']['votes']} "
          f"(reasons: {row['votes']['with_reason']})  AUC {auc[0]} -> {auc[1]}  "
          f"pair acc {acc[0]} -> {acc[1]}  difference {d['estimate']:+.3f} "
          f"[{d['low']:+.3f}, {d['high']:+.3f}]", flush=flush)


if __name__ == "__main__":
    main()
