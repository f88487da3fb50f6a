"""Which form of (b) sees most for the replies it can afford? Replayed from `bench.b_sample`.

    python -m bench.b_budget [--results bench/results/b_sample/b_sample.json] [--draws 200]
        [--budgets 8,16,32,64]

(b) pays per reply written and judged, so its time buys a number of replies per version: one
greedy reply to each of that many prompts (today's default), or `k` sampled replies to each
of a k-th as many (`gate.judged_samples`). `bench.b_sample` kept every reply's judge score and
simulated-user vote (`per_reply`) for 16 prompts: greedy, and 4 sampled at the page's settings.
For each round and reply budget (`--budgets`: replies per version), every form that fits:
greedy on n prompts, sampled k x n/k (seeds 0..k-1, as the gate draws them), the prompts drawn
`--draws` times where fewer than all are used. Per form: the judge's mean one-sided confidence
that the candidate is better (its win share's, as (b) computes it: what (b) gives the pooling
with (a)), how often that confidence reaches the gate's (0.95: the direction alone calls the
candidate better) and how often it falls to 0.05 (the direction against it); and the user's
own approval of each version on the same replies: the truth the judge stands in for. Prints a
table and writes `b_budget.json` beside the results. Seconds; no model runs.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

def forms(prompts: int, samples: int, budget: int) -> list[tuple[str, int, int]]:
    """(form, prompts, replies per prompt) spending `budget` replies per version, from what a
    row holds: greedy (one per prompt) and sampled (k per prompt, k > 1)."""
    out = [("greedy", budget, 1)] if budget <= prompts else []
    return out + [("sampled", budget // k, k) for k in range(2, samples + 1)
                  if budget % k == 0 and budget // k <= prompts]


def replay(row: dict, form: str, n: int, k: int, *, draws: int, confidence: float,
           resamples: int, seed: int) -> dict:
    """One form of (b) on `n` of the row's prompts, `k` replies each, the prompts drawn `draws`
    times (once where all are used)."""
    from training.stats import win_share

    data = row[form]["per_reply"]
    per = row["samples"] if form == "sampled" else 1
    prompts = len(data["current"]["judge"]) // per

    def take(values: list, chosen: list[int]) -> list[list[float]]:
        return [values[i * per:i * per + k] for i in chosen]

    rng = random.Random(seed)
    confidences, users = [], []
    for _ in range(draws if n < prompts else 1):
        chosen = sorted(rng.sample(range(prompts), n))
        judged = win_share(take(data["candidate"]["judge"], chosen),
                           take(data["current"]["judge"], chosen),
                           confidence=confidence, samples=resamples, seed=seed)
        confidences.append(judged.p_better)
        users.append([sum(map(sum, take(data[v]["user"], chosen))) / (n * k)
                      for v in ("current", "candidate")])
    return {"form": form, "prompts": n, "replies_per_prompt": k, "draws": len(confidences),
            "confidence": sum(confidences) / len(confidences),
            "alone": sum(c >= confidence for c in confidences) / len(confidences),
            "against": sum(c <= 1 - confidence for c in confidences) / len(confidences),
            "user_approval": [sum(u[i] for u in users) / len(users) for i in (0, 1)]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path,
                        default=Path(__file__).parent / "results" / "b_sample" / "b_sample.json",
                        help="bench.b_sample's output")
    parser.add_argument("--draws", type=int, default=200,
                        help="prompt draws per form where it uses fewer than all")
    parser.add_argument("--budgets", default="8,16,32,64", help="replies per version")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error("--draws must be at least 1")
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
        assert all(b >= 1 for b in budgets)
    except (ValueError, AssertionError):
        parser.error(f"--budgets: whole numbers of at least 1, comma-separated, not "
                     f"{args.budgets!r}")
    try:
        results = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        parser.error(f"cannot read {args.results}: {e}")
    from training.config import GateConfig

    gate = GateConfig()
    out = {}
    for user, rows in results.items():
        for row in rows:
            if "per_reply" not in row.get("sampled", {}):
                print(f"{user} {row['round']}: no per-reply figures (run bench.b_sample again)")
                continue
            key = f"{user} {row['round']}"
            out[key] = []
            stats = {"confidence": gate.confidence, "bootstrap_samples": gate.bootstrap_samples,
                     "seed": gate.seed, **row.get("stats", {})}  # the round's, where kept
            for budget in budgets:
                for form, n, k in forms(row["prompts"], row["samples"], budget):
                    r = replay(row, form, n, k, draws=args.draws,
                               confidence=stats["confidence"],
                               resamples=stats["bootstrap_samples"], seed=stats["seed"])
                    out[key].append({"budget": budget, **r})
                    print(f"{key} {budget:>2} replies: {form:>7} {n:>2} x {k}: confidence "
                          f"{r['confidence']:.2f}, better {r['alone']:.0%}, against "
                          f"{r['against']:.0%}; user {r['user_approval'][0]:.0%} -> "
                          f"{r['user_approval'][1]:.0%}", flush=True)
    (args.results.parent / "b_budget.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
