"""On-policy pairs judged by the round's reward model (rejection sampling, as in iterative DPO).

300 votes are a thin signal, and each is used once. Once the reward model has learned the users'
votes, it can judge replies nobody voted on: the serving version answers each training prompt
several times (batched, through the serving engine: what users would get), the reward model
scores every reply, and the best and the worst become a preference pair when they are far
enough apart (`margin`, in standard deviations of all the scores). Those pairs join the users'
own for preference tuning.

Only a judge that has shown it agrees with users is trusted: its ranking of the held-out votes
(AUC, a label-stratified bootstrap interval) must lie above chance, else no synthetic pair is
made and the report says why. Generation stops at its deadline; prompts whose replies did not
all finish are left out.
"""

from __future__ import annotations

import time
from dataclasses import replace
from statistics import pstdev

from serving.chat import PromptTooLong, split_system
from serving.config import GenerationSettings
from training.config import SyntheticConfig
from training.dataset import FeedbackData, fluency_failure
from training.evaluate import alternating
from training.stats import Calibration, platt


def judged_conversations(heldout: FeedbackData) -> list[list[dict]]:
    """What `judge_quality` scores: each held-out vote's conversation, then each held-out pair's
    chosen and rejected ones."""
    return ([v["prompt"] + v["completion"] for v in heldout.votes]
            + [p["prompt"] + p["chosen"] for p in heldout.pairs]
            + [p["prompt"] + p["rejected"] for p in heldout.pairs])


def check_sample(heldout: FeedbackData, limit: int, seed: int) -> FeedbackData:
    """What the judge's check scores, at most `limit` conversations whatever the store holds:
    up to three quarters held-out votes (both labels spread evenly), the rest held-out pairs
    (two conversations each)."""
    votes = alternating(heldout.votes, seed)[:limit * 3 // 4]
    return FeedbackData(votes=votes, pairs=heldout.pairs[:(limit - len(votes)) // 2])


def judge_quality(judge, heldout: FeedbackData, *, confidence: float, samples: int,
                  seed: int = 0) -> tuple[dict, Calibration | None]:
    """How well the reward model ranks held-out votes it never saw: AUC with its interval,
    and its accuracy on held-out pairs (where there are any); and those votes' scores and
    labels, which calibrate its scores for the gate's (b) (None without both labels)."""
    votes, n = heldout.votes, len(heldout.pairs)
    labels = [bool(v["label"]) for v in votes]
    out: dict = {"heldout_votes": len(votes), "heldout_pairs": n}
    both = len(set(labels)) == 2
    calibration = None
    if not both and not n:
        out["trusted"] = False
        return out, calibration
    scores = judge.score(judged_conversations(heldout) if both else
                         judged_conversations(FeedbackData(pairs=heldout.pairs)))
    if both:
        calibration = Calibration.of(scores[:len(votes)], labels, confidence=confidence,
                                     samples=samples, seed=seed)
        out["auc"] = calibration.auc.to_dict()
        slope, intercept = platt(calibration.scores, calibration.labels)
        out["calibration"] = {"votes": len(votes), "slope": slope, "intercept": intercept}
        scores = scores[len(votes):]
    if n:
        out["pair_accuracy"] = sum(c > r for c, r in zip(scores[:n], scores[n:])) / n
    out["trusted"] = bool(calibration and calibration.trusted)
    return out, calibration


def training_prompts(train: FeedbackData, limit: int) -> list[list[dict]]:
    """The distinct prompts of the training votes, at most `limit`, spread over the data."""
    seen, prompts = set(), []
    for v in train.votes:
        key = repr(v["prompt"])
        if key not in seen:
            seen.add(key)
            prompts.append(v["prompt"])
    step = max(1, len(prompts) // max(limit, 1))
    return prompts[::step][:limit]


def synthetic_pairs(engine, judge, train: FeedbackData, cfg: SyntheticConfig,
                    deadline: float, log=lambda line: None, *,
                    fluent_chosen: bool = False) -> tuple[list[dict], dict]:
    """(pairs for DPO, what was done): `cfg.samples_per_prompt` replies to each training prompt
    from `engine`, scored by `judge`; best vs worst where they differ by `cfg.margin` s.d.
    With `fluent_chosen`, the best is the best-scored reply that passes `fluency_failure`
    (a judge that likes lists may score a list looping to the token cap highest)."""
    start = time.monotonic()
    prompts = training_prompts(train, cfg.max_prompts)
    settings = GenerationSettings(temperature=cfg.temperature, top_p=0.95,
                                  max_new_tokens=cfg.max_new_tokens)
    sampled, handles, too_long = [], [], 0
    for prompt in prompts:
        system, turns = split_system(prompt)
        s = replace(settings, system_prompt=system)
        try:  # the same prompt each time: the first submit refuses before anything is queued
            group = [engine.submit(turns, s) for _ in range(cfg.samples_per_prompt)]
        except PromptTooLong:  # no room for a reply in the context window: not sampled
            too_long += 1
            continue
        sampled.append(prompt)
        handles.append(group)
    for group in handles:
        for reply in group:
            left = deadline - time.monotonic()
            if left <= 0 or not _wait(reply, left):
                break
    for group in handles:  # past the deadline: what is unfinished is dropped
        for reply in group:
            if not reply.done:
                reply.cancel()
    done = [(p, [r.text for r in g]) for p, g in zip(sampled, handles)
            if all(r.done and r.finish_reason in ("stop", "length") for r in g)]
    generated_s = time.monotonic() - start
    flat = [(p, t) for p, texts in done for t in texts if t.strip()]
    scores = judge.score([p + [{"role": "assistant", "content": t}] for p, t in flat]) \
        if flat else []
    pairs, gaps, passed_over = judged_pairs(
        [(p, t, score) for (p, t), score in zip(flat, scores)], cfg.margin, fluent_chosen)
    report = {"prompts": len(sampled), "prompts_too_long": too_long,
              "prompts_finished": len(done),
              "replies": len(flat), "pairs": len(pairs),
              "pairs_below_margin": len(gaps) - len(pairs), "margin_sd": cfg.margin,
              "best_disfluent": passed_over,
              "generate_and_score_s": round(time.monotonic() - start, 1),
              "generate_s": round(generated_s, 1)}
    log(f"synthetic pairs: {len(pairs)} of {len(gaps)} prompts past the {cfg.margin} s.d. "
        f"margin ({len(flat)} replies in {report['generate_and_score_s']:.0f}s)")
    return pairs, report


def judged_pairs(scored: list[tuple[list[dict], str, float]], margin: float,
                 fluent_chosen: bool) -> tuple[list[dict], list[float], int]:
    """(pairs, each prompt's best-minus-worst gap in s.d. of all the scores, how many prompts'
    best-scored reply was passed over for failing `fluency_failure`) from (prompt, reply,
    judge's score) rows: per prompt with two replies or more, its best (the best fluent one
    with `fluent_chosen`, none if none is) against its worst, where they differ by `margin`."""
    scores = [score for _, _, score in scored]
    sd = pstdev(scores) if len(scores) > 1 else 0.0
    by_prompt: dict[str, list[tuple[float, str, list[dict]]]] = {}
    for p, t, score in scored:
        by_prompt.setdefault(repr(p), []).append((score, t, p))
    pairs, gaps, passed_over = [], [], 0
    for group in by_prompt.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda x: x[0])
        (low, worst, prompt), top = group[0], group[1:]
        fluent = [g for g in top if not fluency_failure(g[1])] if fluent_chosen else top
        passed_over += fluent[-1:] != top[-1:]
        if not fluent:
            continue
        high, best, _ = fluent[-1]
        gap = (high - low) / sd if sd > 0 else 0.0
        gaps.append(gap)
        if gap >= margin and best.strip() != worst.strip():
            pairs.append({"prompt": prompt,
                          "chosen": [{"role": "assistant", "content": best}],
                          "rejected": [{"role": "assistant", "content": worst}],
                          "source": "synthetic", "reward_gap_sd": round(gap, 3)})
    return pairs, gaps, passed_over


def _wait(reply, timeout: float) -> bool:
    try:
        reply.wait(timeout)
        return True
    except TimeoutError:
        return False
