"""Does (b) see more with sampled replies than with one greedy reply per prompt? A round replayed.

    python -m bench.b_sample --store bench/results/loop/example/data [--rounds R1,R2]
        [--samples 4] [--max-prompts 16] [--user example] [--out bench/results/b_sample]

For each round in the store's reports that reached a gate (oldest first; or those named): its
held-out prompts as the round began (`bench.gate_replay.round_data`; at most `--max-prompts`),
answered by both versions the gate compared, through the engine users get, in two forms: one
greedy reply per prompt (what the gate's (b) judges; its settings) and `--samples` replies
sampled at the page's settings (temperature 0.7, top-p 0.9, its repetition penalty, seeds 0..k-1).
The round's own judge (the reward model saved with its candidate) scores every reply, and so
does the simulated user the store was made for (`bench/users.py`: the truth the judge stands
in for). Per form: the share of prompts where the judge scores the candidate higher (sampled: its
mean over the samples; ties half) with its bootstrap interval and one-sided confidence, as (b)
computes it; the share where the user's approval is higher; on how many prompts where the user
tells the versions apart the judge leans the same way; and the seconds each form took (replies,
then scores), and every reply's judge score and user vote (`per_reply`, for replays of other
forms from the same replies: `bench.b_budget`). Prints and writes `b_sample.json` (keyed by
user; other users' rows are kept).
Reads the store, writes nothing there. The concise user's word limit is calibrated, as
`bench.loop` does, on the base model's replies in the store.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def per_prompt(values: list, k: int) -> list[float]:
    """Means of consecutive groups of `k` (a prompt's samples)."""
    return [sum(values[i:i + k]) / k for i in range(0, len(values), k)]


def compare(judge_cur, judge_cand, user_cur, user_cand, cfg) -> dict:
    from training.stats import win_share

    leans = [(jc > jo) == (uc > uo) for jo, jc, uo, uc in
             zip(judge_cur, judge_cand, user_cur, user_cand) if uc != uo and jc != jo]
    return {"judge_prefers_candidate": win_share(
                judge_cand, judge_cur, confidence=cfg.confidence, samples=cfg.bootstrap_samples,
                seed=cfg.seed).to_dict(),
            "user_prefers_candidate": sum((c > o) + 0.5 * (c == o)
                                          for o, c in zip(user_cur, user_cand)) / len(user_cur),
            "user_approval": [sum(user_cur) / len(user_cur), sum(user_cand) / len(user_cand)],
            "user_tells_apart": sum(uc != uo for uo, uc in zip(user_cur, user_cand)),
            "judge_agrees": sum(leans)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, required=True,
                        help="a bench.loop data folder with feedback.db, reports/ and versions/")
    parser.add_argument("--rounds", default="", help="round ids, comma-separated (default: all)")
    parser.add_argument("--samples", type=int, default=4, help="sampled replies per prompt")
    parser.add_argument("--max-prompts", type=int, default=16)
    parser.add_argument("--user",
                        help="the simulated user (default: the store's folder, USER/data)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "b_sample")
    args = parser.parse_args(argv)
    from bench.users import make_users, unknown_users

    from bench.gate_replay import fresh_work, gated_rounds, keep_rows, round_data, store_user
    from training.reward import load_judge

    user_name = args.user or store_user(args.store)
    if message := unknown_users([user_name]):
        parser.error(f"{message} (name it with --user)")
    if args.samples < 1 or args.max_prompts < 1:
        parser.error("--samples and --max-prompts must be at least 1")
    rounds = gated_rounds(args.store, [r for r in args.rounds.split(",") if r])
    if not rounds:
        parser.error(f"no round with a gate among {args.store / 'reports'}")

    args.out.mkdir(parents=True, exist_ok=True)
    work = fresh_work(args.out, args.store)

    from serving.backends import open_engine
    from serving.config import ServingConfig
    from serving.model import resolve_base
    from serving.registry import Registry
    from training.dataset import load_feedback
    from training.evaluate import answers, heldout_prompts
    from training.evaluate import replies as write

    registry = Registry()
    base_name, base_source = resolve_base()
    base_lengths = [len(r["completion"][0]["content"].split()) for r in
                    load_feedback(url=f"sqlite:///{args.store / 'feedback.db'}").votes
                    if r.get("model_version") == base_name]
    user = make_users([user_name], base_lengths or [100])[0]
    rows = []
    for report in rounds:
        names = (report["current_version"], report["round"])
        cfg, _, heldout = round_data(args.store, report, work / f"{report['round']}.db")
        prompts = heldout_prompts(heldout)[:args.max_prompts]
        loaded = registry.load(names[0], ServingConfig(dtype="float32"))
        judge = load_judge(base_source, loaded.tokenizer, registry.get(names[1]).dir.reward,
                           cfg.reward.max_length)
        del loaded
        length, penalty = cfg.gate.judged_max_new_tokens, cfg.gate.repetition_penalty
        replies, seconds = {}, {}
        for name in names:
            engine = open_engine(registry, name, ServingConfig(slots=8))
            try:
                t = time.monotonic()
                replies[name, "greedy"] = answers(engine, prompts, length, penalty)
                seconds[name, "greedy"] = time.monotonic() - t
                t = time.monotonic()  # seeds 0..k-1 at the page's settings, as the gate's (b)
                replies[name, "sampled"] = write(
                    engine, [(c, i) for c in prompts for i in range(args.samples)], length,
                    penalty)
                seconds[name, "sampled"] = time.monotonic() - t
            finally:
                engine.close()
        scores, raw = {}, {}
        for (name, form), texts in replies.items():
            k = 1 if form == "greedy" else args.samples
            convs = [p + [{"role": "assistant", "content": r}]
                     for p, r in zip([p for p in prompts for _ in range(k)], texts)]
            t = time.monotonic()
            raw[name, form] = judge.score(convs)
            scores[name, form] = per_prompt(raw[name, form], k)
            seconds[name, form] += time.monotonic() - t
        row = {"round": names[1], "current": names[0], "prompts": len(prompts),
               "samples": args.samples, "stats": {k: getattr(cfg.gate, k) for k in (
                   "confidence", "bootstrap_samples", "seed")}, "original_b": {
                   k: report["gate"]["checks"]["b_reward_model"].get(k)
                   for k in ("prompts", "win_rate", "p_better", "verdict")}}
        for form in ("greedy", "sampled"):
            k = 1 if form == "greedy" else args.samples
            votes = {n: [float(user.judge(r)[0]) for r in replies[n, form]] for n in names}
            liked = {n: per_prompt(votes[n], k) for n in names}
            row[form] = {**compare(scores[names[0], form], scores[names[1], form],
                                   liked[names[0]], liked[names[1]], cfg.gate),
                         "seconds": round(seconds[names[0], form] + seconds[names[1], form], 3),
                         # per reply, prompt-major (a prompt's samples together): for replays
                         # of other forms (fewer prompts or samples) from the same replies
                         "per_reply": {role: {"judge": raw[n, form], "user": votes[n]}
                                       for role, n in zip(("current", "candidate"), names)}}
        rows.append(row)
        for form in ("greedy", "sampled"):
            f = row[form]
            j = f["judge_prefers_candidate"]
            print(f"{names[1]} {form:>7}: judge prefers the candidate on {j['estimate']:.0%} "
                  f"[{j['low']:.0%}, {j['high']:.0%}] of {len(prompts)} prompts "
                  f"(confidence {j['p_better']:.2f}); the user on {f['user_prefers_candidate']:.0%}"
                  f" (approval {f['user_approval'][0]:.0%} -> {f['user_approval'][1]:.0%}); "
                  f"agrees on {f['judge_agrees']} of {f['user_tells_apart']} prompts the user "
                  f"tells apart; {f['seconds']:.0f} s", flush=True)
        del judge
    return keep_rows(args.out / "b_sample.json", user_name, rows, work)


if __name__ == "__main__":
    main()
