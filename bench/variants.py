"""Which round config learns more from the same votes? Several rounds on one store, side by side.

    python -m bench.variants --user tips --store bench/results/loop/tips/data \\
        --variants '{"default": {}, "lr 1.5e-3": {"tune": {"learning_rate": 1.5e-3}}}' \\
        [--round-config JSON] [--max-minutes 10] [--test-prompts 62] [--test-samples 2]
        [--no-prepare] [--prepare-minutes 20] [--synthetic-by-user] [--no-retention] [--out DIR]

`--store` is a data folder a `bench.loop` run left behind (its `feedback.db`: the simulated
user's votes; its `models` link: the base checkpoint). For each variant (a name and its
`RoundConfig` overrides, on top of `--round-config`) the votes are copied into a fresh folder
where the base model serves, and the real `python -m training run` trains, gates and registers
a candidate there, after `python -m training prepare` computed the base model's half of its
gate (as `bench.loop` does; `--no-prepare` skips it). Then each candidate, promoted or
rejected, answers the test prompts (as in `bench.loop`) and the user judges: approval with its
95% interval beside the base model's, and the round's decision, minutes, stage times, steps,
judge AUC and synthetic pairs, and (unless `--no-retention`) the candidate's answers to all
240 regression questions against the base's (bench.loop's `retention_all`). Same votes, same
clock: what differs is the config.
The synthetic pairs `training prepare` made are read by the user's own rule (`synthetic_by_user`:
how many its chosen reply is liked and its rejected one not, the reverse, both liked, neither);
`--synthetic-by-user` replaces them, before the round, with pairs the user picks from fresh
samples of the same prompts (a reward model that is always right: what a better judge could
gain; bench only).
`CHAT_DTYPE=float32` in the environment runs every stage as on a CPU without native bfloat16.
Writes `variants.json` (rows of earlier runs of other users or variants are kept). A
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

from bench import earlier_results
from bench.loop import (judged, load_prompts, prepare_next_gate, replies, retention_all,
                        run_settings, run_training_round)


def merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def fresh_store(store: Path, data: Path) -> None:
    """`data` holds a copy of `store`'s votes and a link to its models, and no versions: the
    base model serves."""
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    with sqlite3.connect(store / "feedback.db") as src, \
            sqlite3.connect(data / "feedback.db") as dst:
        src.backup(dst)  # a consistent copy, write-ahead log included
    (data / "models").symlink_to((store / "models").resolve())


class UserAsJudge:
    """The simulated user's own rule in place of a reward model: 1 for a reply it likes."""

    def __init__(self, user) -> None:
        self.user = user

    def score(self, conversations: list[list[dict]]) -> list[float]:
        return [float(self.user.judge(c[-1]["content"])[0]) for c in conversations]


def counted_by_user(user, pairs: list[dict]) -> dict:
    """Synthetic pairs as the simulated user judges their two replies: right (the chosen
    liked, the rejected not), wrong, both liked, neither liked."""
    counts = {"pairs": len(pairs), "right": 0, "wrong": 0, "both liked": 0, "neither liked": 0}
    for pair in pairs:
        chosen, rejected = (user.judge(pair[k][-1]["content"])[0] for k in ("chosen", "rejected"))
        counts["both liked" if chosen and rejected else "right" if chosen else
               "wrong" if rejected else "neither liked"] += 1
    return counts


def synthetic_by_user(user, path: Path) -> dict | None:
    """The kept synthetic pairs at `path` as the simulated user judges them; None if none."""
    try:
        pairs = json.loads(path.read_text())["pairs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return counted_by_user(user, pairs)


def user_picked_pairs(user, config: dict) -> dict:
    """Replaces the synthetic pairs `training prepare` made (the serving version's samples,
    picked by its reward model) with pairs the simulated user picks from new samples of the
    same training prompts, under the same header (version, judge, settings), so that the round
    takes them as prepare's. Their reference log-probabilities are computed by the next
    `training prepare`."""
    from serving.backends import open_engine
    from serving.config import ServingConfig
    from serving.registry import Registry
    from training.config import RoundConfig
    from training.dataset import load_feedback, split
    from training.round import synthetic_path
    from training.synthetic import PreparedPairs, synthetic_pairs

    cfg = RoundConfig.from_dict(config)
    registry = Registry()
    kept = PreparedPairs(synthetic_path(registry))
    if kept.record is None:
        return {"why": "`training prepare` kept no synthetic pairs to replace"}
    train, _ = split(load_feedback(cfg.data), cfg.data)
    fluent = cfg.data.drop_disfluent
    start = time.monotonic()
    engine = open_engine(registry, kept.record["version"], ServingConfig(slots=16))
    try:
        pairs, summary = synthetic_pairs(engine, UserAsJudge(user), train, cfg.synthetic,
                                         start + 3600, fluent_chosen=fluent)
    finally:
        engine.close()
    summary["picked_by"] = f"the simulated user {user.name}"
    PreparedPairs.write(kept.path, version=kept.record["version"],
                        judge_made=kept.record["judge"], cfg=cfg.synthetic, fluent_chosen=fluent,
                        pairs=pairs, summary=summary, seconds=time.monotonic() - start)
    print(f"synthetic pairs picked by the user: {len(pairs)} from {summary['prompts_finished']} "
          f"of {summary['prompts']} prompts", flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--user", required=True, help="the simulated user who cast the votes")
    parser.add_argument("--store", type=Path, required=True,
                        help="a data folder with the votes (feedback.db) and the models link")
    parser.add_argument("--variants", type=json.loads, required=True,
                        help='JSON: {"name": {RoundConfig overrides}, ...}')
    parser.add_argument("--round-config", type=json.loads, default={},
                        help="JSON overrides every variant starts from")
    parser.add_argument("--max-minutes", type=float, default=10.0)
    parser.add_argument("--test-prompts", type=int, default=62)
    parser.add_argument("--test-samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=True,
                        help="before each variant's round, `python -m training prepare` (the "
                             "base model's half of its gate, off the round's clock, as "
                             "bench.loop and `training schedule` do)")
    parser.add_argument("--prepare-minutes", type=float, default=20.0,
                        help="`training prepare`'s own budget (it runs between rounds, off "
                             "their clock: its reward model, synthetic pairs and reference "
                             "took 648-701 s for 300 votes on 2 cores, session 49)")
    parser.add_argument("--synthetic-by-user", action="store_true",
                        help="after `training prepare`, replace its synthetic pairs with "
                             "pairs the simulated user picks from fresh samples (an always-"
                             "right judge), then prepare again for their reference")
    parser.add_argument("--retention", action=argparse.BooleanOptionalAction, default=True,
                        help="each candidate and the base answer all 240 regression questions "
                             "(bench.loop's `retention_all`, about 1-2 min a variant)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "variants")
    args = parser.parse_args(argv)
    from bench.users import make_users, unknown_users, words
    if message := unknown_users([args.user]):
        parser.error(f"--user: {message}")
    if not (args.store / "feedback.db").is_file() or not (args.store / "models").exists():
        parser.error(f"{args.store} holds no feedback.db and models link: give the data "
                     "folder of a bench.loop run (bench/results/loop/USER/data)")
    if not isinstance(args.variants, dict) or not args.variants or not all(
            isinstance(v, dict) for v in args.variants.values()):
        parser.error('--variants must be a JSON object of named overrides, e.g. '
                     '{"default": {}, "lr": {"tune": {"learning_rate": 1e-3}}}')
    if args.synthetic_by_user and not args.prepare:
        parser.error("--synthetic-by-user replaces the pairs `training prepare` makes: drop "
                     "--no-prepare")

    from serving.config import GenerationSettings

    args.out.mkdir(parents=True, exist_ok=True)
    _, test = load_prompts()
    test = test[:args.test_prompts]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=None)
    path = args.out / "variants.json"
    results = earlier_results(path)
    row = results.setdefault("users", {}).setdefault(args.user, {"variants": {}})
    row["args"] = run_settings({k: str(v) for k, v in vars(args).items()
                                if k not in ("user", "store", "variants")})
    user = None
    for name, overrides in args.variants.items():
        data = args.out / args.user / "".join(c if c.isalnum() else "-" for c in name) / "data"
        fresh_store(args.store, data)
        os.environ["CHAT_DATA_DIR"] = str(data)
        if user is None:  # the base model's test replies, once
            before, base = replies(test, args.test_samples, settings)
            [user] = make_users([args.user], [words(x) for xs in before for x in xs])
            row["base"] = {"version": base, **judged(user, before)}
            print(f"{args.user}: base approval {row['base']['approval']:.0%}", flush=True)
        config = merged(args.round_config, overrides)
        prepared = prepare_next_gate(config, args.prepare_minutes) if args.prepare else None
        picked = None
        if args.synthetic_by_user:
            picked = {"judge's": synthetic_by_user(user, data / "training" / "synthetic.json"),
                      "sampled": user_picked_pairs(user, config)}
            picked["prepare_again"] = prepare_next_gate(config, args.prepare_minutes)
        training = run_training_round(config, args.max_minutes)
        # the base's approval of this run beside each variant: a later run of the same user
        # measures the base again (sampled replies: 30-38% for one user in three runs)
        out = {"config": config, "store": str(args.store),
               "dtype": os.environ.get("CHAT_DTYPE", "auto"), "base": row["base"],
               "prepare": prepared, "training": training,
               "synthetic_by_user": synthetic_by_user(user, data / "training" / "synthetic.json")}
        if picked:
            out["synthetic_picked_by_user"] = picked
        if training["candidate"] and (data / "versions" / training["candidate"]).is_dir():
            t = time.monotonic()
            theirs, _ = replies(test, args.test_samples, settings, training["candidate"])
            out["candidate"] = {**judged(user, theirs),
                                "eval_seconds": round(time.monotonic() - t, 1)}
            if args.retention and (full := retention_all(data)):
                out["retention_all"] = full
        row["variants"][name] = out
        path.write_text(json.dumps(results, indent=2) + "\n")  # so far
        print_row(name, out)
    return results


def print_row(name: str, v: dict) -> None:
    t = v["training"]
    times = t.get("timings_s") or {}
    rm = t.get("reward_model") or {}
    auc = ((rm.get("judge") or {}).get("auc") or {}).get("estimate")
    pooled = ((t.get("gate") or {}).get("pooled") or {}).get("confidence")
    cand = v.get("candidate")
    shown = (f"{cand['approval']:.0%} [{cand['approval_interval'][0]:.0%},"
             f"{cand['approval_interval'][1]:.0%}]") if cand else "-"
    print(f"{name:<24} candidate {shown:<16} {t.get('decision') or '-':>9} "
          f"{t.get('seconds', 0) / 60:4.1f} min  RM {times.get('reward_model', 0):.0f}s "
          f"{rm.get('steps', 0)} st AUC {'-' if auc is None else f'{auc:.2f}'}  "
          f"synth {(t.get('synthetic') or {}).get('pairs', 0)}"
          + (f" ({by['right']} right, {by['wrong']} wrong by the user)"
             if (by := v.get("synthetic_by_user")) else "") + "  "
          f"tune {times.get('tuning', 0):.0f}s {(t.get('tuning') or {}).get('steps', 0)} st  "
          f"gate {times.get('gate', 0):.0f}s, (a)+(b) pooled "
          f"{'-' if pooled is None else f'{pooled:.2f}'}"
          + (f"  all {full['questions']} Qs: {full['candidate']} vs {full['current']} "
             f"({full['retention']:.0%})" if (full := v.get("retention_all")) else ""),
          flush=True)


if __name__ == "__main__":
    main()
