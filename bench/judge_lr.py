"""Which learning rate makes a reward model that ranks held-out votes in a round's few steps?

    python -m bench.judge_lr --store bench/results/loop/example/data [--round R]
        [--rates 1e-4,3e-4,1e-3,3e-3] [--seconds S] [--out bench/results/judge_lr]

A round gives its reward model about a fifth of its time (`reward_share`): 11-14 steps on 2 CPU
cores. This trains the judge of one round of a `bench.loop` store (the first that has a gate, or
`--round`) again on the same pairs, from the same base checkpoint and seed, in the same time
(the round's own reward-model seconds, or `--seconds`; as in the round, the learning-rate
schedule spans the whole epoch and the clock stops it, so the rate stays near its setting),
once per learning rate, and checks each on the round's own held-out sample
(`training.synthetic.check_sample`, `judge_quality`): the AUC on held-out votes with its 95%
interval, whether the round would trust it (interval above 0.5), the held-out pair accuracy and
the training loss (a Bradley-Terry loss near ln 2 = 0.693 has learned nothing). Writes
`judge_lr.json` (keyed by store and round; other rows kept). A benchmark, not a test: it reads
the store and writes nothing there.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from bench.gate_replay import fresh_work, gated_rounds, keep_rows, round_data, store_user


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, required=True,
                        help="a data folder with feedback.db and reports/ (a bench.loop run's)")
    parser.add_argument("--round", default="", help="a round id (default: the store's first "
                                                    "round that reached the gate)")
    parser.add_argument("--rates", default="1e-4,3e-4,1e-3,3e-3",
                        help="reward-model learning rates, comma-separated")
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="each judge's time, training and its held-out check (default: "
                             "the round's own reward model's)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "judge_lr")
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates: numbers separated by commas, not {args.rates!r}")
    if not rates or any(r <= 0 for r in rates):
        parser.error("--rates: at least one learning rate, each above 0")
    reports = gated_rounds(args.store, [args.round] if args.round else [])
    if not reports:
        parser.error(f"no round{' ' + args.round if args.round else ''} with a gate among "
                     f"{args.store / 'reports'}")
    report = reports[0]

    args.out.mkdir(parents=True, exist_ok=True)
    work = fresh_work(args.out, args.store)  # the base checkpoint the store's rounds used

    from serving.model import resolve_base
    from serving.registry import Registry, VersionDir
    from training.dataset import reward_pairs
    from training.reward import train_reward_model
    from training.synthetic import check_sample, judge_quality, judged_conversations

    cfg, train, heldout = round_data(args.store, report, work / "feedback.db")
    pairs = reward_pairs(train, cfg.data, cfg.reward.reason_margin)
    checked = check_sample(heldout, cfg.reward.check_conversations, cfg.gate.seed)
    seconds = args.seconds or report["timings_s"]["reward_model"]
    _, source = resolve_base()
    tokenizer = Registry().tokenizer()
    row = {"round": report["round"], "pairs": len(pairs), "seconds": seconds,
           "round_judge": {"learning_rate": cfg.reward.learning_rate,
                           "steps": report["reward_model"]["steps"],
                           "auc": report["reward_model"]["judge"].get("auc"),
                           "train_loss": report["reward_model"].get("train_loss")},
           "checked": checked.counts, "rates": {}}
    print(f"{report['round']}: {len(pairs)} pairs, {seconds:.0f} s per judge; held-out check "
          f"{checked.counts}", flush=True)
    for rate in rates:
        t = time.monotonic()
        judge, summary = train_reward_model(
            source, tokenizer, pairs, replace(cfg.reward, learning_rate=rate),
            VersionDir(work / f"judge-{rate:g}"), t + seconds,
            to_score=judged_conversations(checked))
        quality, calibration = judge_quality(judge, checked, confidence=cfg.gate.confidence,
                                             samples=cfg.gate.bootstrap_samples,
                                             seed=cfg.gate.seed)
        row["rates"][f"{rate:g}"] = {"train_loss": summary.get("train_loss"),
                                     "steps": summary.get("steps"), "judge": quality,
                                     "seconds": round(time.monotonic() - t, 1)}
        auc, nan = quality.get("auc") or {}, float("nan")
        print(f"  lr {rate:g}: {summary.get('steps')} steps, loss "
              f"{summary.get('train_loss'):.3f}, held-out AUC "
              f"{auc.get('estimate', nan):.2f} [{auc.get('low', nan):.2f}, "
              f"{auc.get('high', nan):.2f}] ({'' if quality['trusted'] else 'not '}trusted), "
              f"pair accuracy {quality.get('pair_accuracy', nan):.0%}, "
              f"{time.monotonic() - t:.0f}s", flush=True)
        del judge
    return keep_rows(args.out / "judge_lr.json", f"{store_user(args.store)} {report['round']}",
                     row, work)


if __name__ == "__main__":
    main()
