"""Does a round's judge pick the synthetic pairs its user would? The prepared reward model of a
store, read against the simulated user's own rule on the same sampled replies.

    python -m bench.judge_picks --store STORE --user USER [--store ...] [--samples 8]
        [--hinted 0] [--margins 0,0.5,1,1.5,2] [--max-new-tokens 256]
        [--out bench/results/judge_picks]

A round's synthetic pairs (`training.synthetic.synthetic_pairs`) are the serving version's
samples of each training prompt, best against worst by the reward model, where the two differ
by `synthetic.margin` standard deviations. A `bench.variants` run reads the pairs a round took
by its user's rule; this reads the judge itself: each STORE's base model (the version its
round 1 sampled) answers each training prompt `--samples` times, at the round's synthetic
settings, through the serving engine, the store's prepared judge (`training prepare`'s,
`<data>/training/judge`) scores every reply and the simulated user judges it. Reported, per
store:
- the judge's AUC on the samples by the user's thumbs, over all replies and within prompts
  (each prompt's liked replies against its disliked ones, pooled), and every reply's score and
  thumb (`scored`: prompt index, score, liked, what it was asked);
- for the first k replies of each prompt (k = 2, 4, ... up to `--samples`) and each margin, the
  pairs `judged_pairs` makes, counted right (chosen liked, rejected not), wrong, both liked
  and neither liked, beside the pairs the user would make (prompts with a liked and a disliked
  reply among the k);
- with `--hinted N`, N more replies a prompt asked for an answer form (the round's
  `synthetic.hints`, as `synthetic.hinted_samples` asks them): per request, how many the user
  liked and the judge's mean score, and the same pair counts over all the replies.
Writes `judge_picks.json` (one row per store, others kept); reads the store and writes
nothing there. A benchmark, not a test: 48 prompts x 8 replies take about 4-6 minutes on 2
cores, and loading and scoring about 1 more a store.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from bench import earlier_results
from bench.variants import counted_by_user


def overall_auc(rows: list[tuple[float, bool]]) -> float | None:
    """`training.stats.auc` of (score, liked) rows; None without both thumbs."""
    from training.stats import auc

    labels = [ok for _, ok in rows]
    return auc([s for s, _ in rows], labels) if any(labels) and not all(labels) else None


def within_prompt_auc(groups: list[list[tuple[float, bool]]]) -> dict:
    """Each prompt's liked replies against its disliked ones, the comparisons pooled (each
    prompt's AUC weighted by its liked x disliked comparisons)."""
    wins = total = 0.0
    for group in groups:
        if (prompt_auc := overall_auc(group)) is not None:
            liked = sum(ok for _, ok in group)
            comparisons = liked * (len(group) - liked)
            wins += prompt_auc * comparisons
            total += comparisons
    return {"auc": wins / total if total else None, "comparisons": int(total),
            "prompts": sum(any(ok for _, ok in g) and not all(ok for _, ok in g)
                           for g in groups)}


def pick_counts(user, scored: list[tuple[list[dict], str, float]], margin: float,
                fluent: bool) -> dict:
    """The pairs `judged_pairs` makes from (prompt, reply, score) rows, by the user's rule."""
    from training.synthetic import judged_pairs

    pairs, _, _ = judged_pairs(scored, margin, fluent)
    return counted_by_user(user, pairs)


def read_store(store: Path, user, samples: int, margins: list[float],
               max_new_tokens: int, hinted: int = 0) -> dict:
    import os

    from serving.backends import open_engine
    from serving.config import ServingConfig
    from serving.model import resolve_base
    from serving.registry import Registry
    from training.config import RoundConfig
    from training.dataset import load_feedback, split
    from training.reward import PreparedJudge, load_judge
    from training.round import judge_dir
    from training.synthetic import synthetic_pairs

    os.environ["CHAT_DATA_DIR"] = str(store)
    cfg = RoundConfig()
    registry = Registry()
    kept = PreparedJudge(judge_dir(registry))
    if kept.record is None:
        raise SystemExit(f"{store}: `training prepare` kept no reward model there "
                         "(training/judge)")
    train, _ = split(load_feedback(cfg.data), cfg.data)
    synthetic = replace(cfg.synthetic, samples_per_prompt=samples, hinted_samples=hinted,
                        max_new_tokens=max_new_tokens or cfg.synthetic.max_new_tokens)
    _, source = resolve_base()
    t = time.monotonic()
    engine = open_engine(registry, registry.base_name, ServingConfig(slots=16))
    tokenizer = registry.tokenizer()
    scored: list = []
    try:  # sampled and scored as the round's stage does, every score kept
        judge = load_judge(source, tokenizer, kept.folder / "adapter", cfg.reward.max_length)
        synthetic_pairs(engine, judge, train, synthetic, t + 3600, scored_out=scored)
    finally:
        engine.close()
    seconds = time.monotonic() - t
    by_prompt: dict[str, list[Scored]] = {}
    for prompt, reply, score, hint in scored:
        by_prompt.setdefault(repr(prompt), []).append(
            Scored(prompt, reply, score, hint, user.judge(reply)[0]))
    groups = list(by_prompt.values())
    plain = [[row for row in g if row.hint is None] for g in groups]
    fluent = cfg.data.drop_disfluent
    picks = {}
    subsets = [(str(k), [g[:k] for g in plain])
               for k in sorted({*range(2, samples + 1, 2), samples})]
    if hinted:  # every reply, the plain ones and those asked for a form
        subsets.append((f"{samples}+{hinted} hinted", groups))
    for label, subset in subsets:
        rows = [(row.prompt, row.reply, row.score) for g in subset for row in g]
        picks[label] = {  # a prompt with a liked and a disliked reply among them
            "user would make": sum(any(row.liked for row in g)
                                   and not all(row.liked for row in g) for g in subset),
            "judge": {f"{m:g}": pick_counts(user, rows, m, fluent) for m in margins}}
    hints = synthetic.hint_list if hinted else []
    thumbs = [[(row.score, row.liked) for row in g] for g in groups]
    return {"judge": {"finished_at": kept.record["finished_at"],
                      "summary": kept.record.get("summary"),
                      "check": kept.record.get("check")},
            "prompts": len(groups), "replies": len(scored), "hinted": hinted,
            "liked": sum(ok for g in thumbs for _, ok in g), "sample_seconds": round(seconds, 1),
            "auc_all": overall_auc([row for g in thumbs for row in g]),
            "auc_within_prompts": within_prompt_auc(thumbs),
            "by_hint": by_hint(groups, hints),
            "picks": picks,
            # every reply: its prompt's index, the judge's score, liked by the user, and the
            # index in `by_hint`'s requests of what it was asked (-1: nothing, a plain sample)
            "scored": [[i, round(row.score, 4), row.liked,
                        hints.index(row.hint) if row.hint else -1]
                       for i, g in enumerate(groups) for row in g]}


class Scored(NamedTuple):
    """One sampled reply: the judge's score and the simulated user's thumb."""
    prompt: list[dict]
    reply: str
    score: float
    hint: str | None  # the answer form it was asked for; None for a plain sample
    liked: bool


def by_hint(groups: list[list[Scored]], hints: list[str]) -> list[dict]:
    """Per request (the plain samples first): replies, liked by the user, the judge's mean
    score."""
    out = []
    for hint in [None, *hints]:
        rows = [row for g in groups for row in g if row.hint == hint]
        scores = [row.score for row in rows]
        out.append({"request": hint, "replies": len(rows),
                    "liked": sum(row.liked for row in rows),
                    "mean_score": round(sum(scores) / len(scores), 4) if scores else None})
    return out


def print_store(name: str, row: dict) -> None:
    within = row["auc_within_prompts"]
    print(f"{name}: {row['replies']} replies to {row['prompts']} prompts, "
          f"{row['liked']} liked; judge AUC {row['auc_all'] or float('nan'):.2f} over all, "
          f"{within['auc'] or float('nan'):.2f} within {within['prompts']} prompts", flush=True)
    if row.get("hinted"):
        for h in row["by_hint"]:
            print(f"  {h['request'] or '(plain)'}: {h['liked']} of {h['replies']} liked, "
                  f"judge's mean score {h['mean_score']}", flush=True)
    for k, pick in row["picks"].items():
        for m, c in pick["judge"].items():
            print(f"  {k} a prompt, margin {m}: {c['pairs']} pairs, {c['right']} right, "
                  f"{c['wrong']} wrong, {c['both liked']} both liked, {c['neither liked']} "
                  f"neither (the user would make {pick['user would make']})", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, action="append", required=True,
                        help="a data folder where `training prepare` trained a reward model "
                             "(a bench.loop or bench.variants store)")
    parser.add_argument("--user", required=True, help="the simulated user who cast its votes")
    parser.add_argument("--samples", type=int, default=8, help="replies a training prompt")
    parser.add_argument("--hinted", type=int, default=0,
                        help="replies a prompt besides --samples, each asked for an answer "
                             "form (synthetic.hinted_samples, its synthetic.hints), 0-16")
    parser.add_argument("--margins", default="0,0.5,1,1.5,2",
                        help="synthetic.margin values to read, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=0,
                        help="a reply's token cap (default: the round's synthetic setting)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "judge_picks")
    args = parser.parse_args(argv)
    from bench.users import make_users, unknown_users
    if message := unknown_users([args.user]):
        parser.error(f"--user: {message}")
    if args.user == "concise":
        parser.error("--user: concise's word limit comes from a loop run's base replies; "
                     "read another user")
    if not 2 <= args.samples <= 16:
        parser.error(f"--samples: 2 to 16 replies a prompt, not {args.samples}")
    if not 0 <= args.hinted <= 16:
        parser.error(f"--hinted: 0 to 16 replies a prompt, not {args.hinted}")
    try:
        margins = [float(m) for m in args.margins.split(",") if m.strip()]
    except ValueError:
        parser.error(f"--margins: numbers separated by commas, not {args.margins!r}")
    if not margins or any(not 0 <= m < float("inf") for m in margins):
        parser.error("--margins: at least one, each a finite number >= 0")
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens: 0 (the round's setting) or more")
    for store in args.store:
        if not (store / "training" / "judge" / "judge.json").is_file():
            parser.error(f"{store} holds no reward model prepared by `training prepare` "
                         "(training/judge/judge.json)")
    [user] = make_users([args.user], [1])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "judge_picks.json"
    results = earlier_results(path)
    for store in args.store:
        row = {"user": args.user, "samples": args.samples,
               **read_store(store, user, args.samples, margins, args.max_new_tokens,
                            args.hinted)}
        results[str(store)] = row
        path.write_text(json.dumps(results, indent=2) + "\n")
        print_store(str(store), row)
    return results


if __name__ == "__main__":
    main()
