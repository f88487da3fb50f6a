"""On-policy pairs judged by the round's reward model (rejection sampling, as in iterative DPO).

300 votes are a thin signal, and each is used once. Once the reward model has learned the users'
votes, it can judge replies nobody voted on: the serving version answers each training prompt
several times (batched, through the serving engine: what users would get), the reward model
scores every reply, and the best and the worst become a preference pair when they are far
enough apart (`margin`, in standard deviations of all the scores). Those pairs join the users'
own for preference tuning.

A judge can only choose among what the model already writes: where the serving version never
gives the form a user wants, no sample holds it. With `hinted_samples`, each prompt is also
answered with answer-form requests added to its last user message (`hints`: a tip, an example,
a list, ...); those replies are scored and paired as replies to the prompt without the request,
like the plain ones, so what the judge prefers is learned unasked (context distillation, the
judge choosing which forms). The report counts how many pairs chose or rejected a hinted reply.

Only a judge that has shown it agrees with users is trusted: its ranking of the held-out votes
(AUC, a label-stratified bootstrap interval) must lie above chance, else no synthetic pair is
made and the report says why. Generation stops at its deadline; prompts whose replies did not
all finish are left out.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from statistics import pstdev

from feedback.config import make_folder

from serving.chat import PromptTooLong, split_system
from serving.config import GenerationSettings
from training.config import SyntheticConfig
from training.dataset import FeedbackData, fluency_failure
from training.evaluate import Kept, alternating
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


def with_hint(turns: list[dict], hint: str | None) -> list[dict]:
    """`turns` with `hint` (an answer-form request) added to the last user message."""
    if not hint:
        return turns
    return turns[:-1] + [{**turns[-1], "content": f"{turns[-1]['content']}\n\n{hint}"}]


def sample_hints(cfg: SyntheticConfig, index: int) -> list[str | None]:
    """What the replies to the `index`-th training prompt are asked besides the prompt: None
    for each plain sample, then `cfg.hinted_samples` requests from `cfg.hints`, rotating."""
    hints = cfg.hint_list
    return [None] * cfg.samples_per_prompt + [
        hints[(index * cfg.hinted_samples + j) % len(hints)] for j in range(cfg.hinted_samples)]


def synthetic_pairs(engine, judge, train: FeedbackData, cfg: SyntheticConfig,
                    deadline: float, log=lambda line: None, *, fluent_chosen: bool = False,
                    scored_out: list | None = None) -> tuple[list[dict], dict]:
    """(pairs for DPO, what was done): `cfg.samples_per_prompt` replies to each training prompt
    from `engine` (and `cfg.hinted_samples` more, each asked for a form: `sample_hints`),
    scored by `judge` as replies to the prompt itself; best vs worst where they differ by
    `cfg.margin` s.d. With `fluent_chosen`, the best is the best-scored reply that passes
    `fluency_failure` (a judge that likes lists may score a list looping to the token cap
    highest). `scored_out`, when given, gets every scored (prompt, reply, score, hint) row."""
    start = time.monotonic()
    prompts = training_prompts(train, cfg.max_prompts)
    settings = GenerationSettings(temperature=cfg.temperature, top_p=0.95,
                                  max_new_tokens=cfg.max_new_tokens)
    sampled, handles, too_long = [], [], 0
    for index, prompt in enumerate(prompts):
        system, turns = split_system(prompt)
        s = replace(settings, system_prompt=system)
        asks, group = sample_hints(cfg, index), []
        try:  # a prompt too long refuses at its first submit, before anything is queued
            for hint in asks:
                group.append((engine.submit(with_hint(turns, hint), s), hint))
        except PromptTooLong:  # no room for a reply in the context window: not sampled
            for reply, _ in group:  # a hint longer than the room the plain prompt left
                reply.cancel()
            too_long += 1
            continue
        sampled.append(prompt)
        handles.append(group)
    for group in handles:
        for reply, _ in group:
            left = deadline - time.monotonic()
            if left <= 0 or not _wait(reply, left):
                break
    for group in handles:  # past the deadline: what is unfinished is dropped
        for reply, _ in group:
            if not reply.done:
                reply.cancel()
    done = [(p, [(r.text, hint) for r, hint in g]) for p, g in zip(sampled, handles)
            if all(r.done and r.finish_reason in ("stop", "length") for r, _ in g)]
    generated_s = time.monotonic() - start
    flat = [(p, t, hint) for p, texts in done for t, hint in texts if t.strip()]
    scores = judge.score([p + [{"role": "assistant", "content": t}] for p, t, _ in flat]) \
        if flat else []
    if scored_out is not None:
        scored_out += [(p, t, score, hint) for (p, t, hint), score in zip(flat, scores)]
    pairs, gaps, passed_over = judged_pairs(
        [(p, t, score) for (p, t, _), score in zip(flat, scores)], cfg.margin, fluent_chosen)
    report = {"prompts": len(sampled), "prompts_too_long": too_long,
              "prompts_finished": len(done),
              "replies": len(flat), "pairs": len(pairs),
              "pairs_below_margin": len(gaps) - len(pairs), "margin_sd": cfg.margin,
              "best_disfluent": passed_over,
              "generate_and_score_s": round(time.monotonic() - start, 1),
              "generate_s": round(generated_s, 1)}
    if cfg.hinted_samples:
        report["hinted"] = hinted_summary(pairs, flat)
    log(f"synthetic pairs: {len(pairs)} of {len(gaps)} prompts past the {cfg.margin} s.d. "
        f"margin ({len(flat)} replies in {report['generate_and_score_s']:.0f}s)")
    return pairs, report


def hinted_summary(pairs: list[dict], flat: list[tuple[list[dict], str, str | None]]) -> dict:
    """Which pairs' chosen and rejected replies were asked for a form (each pair gets its
    `chosen_hint` and `rejected_hint`, None for a plain sample), counted per request."""
    asked = {(repr(p), t): hint for p, t, hint in flat}
    by_hint: dict[str, dict[str, int]] = {}
    for pair in pairs:
        key = repr(pair["prompt"])
        for side in ("chosen", "rejected"):
            hint = pair[f"{side}_hint"] = asked.get((key, pair[side][0]["content"]))
            counts = by_hint.setdefault(hint or "(plain)", {"chosen": 0, "rejected": 0})
            counts[side] += 1
    return {"replies": sum(hint is not None for _, _, hint in flat),
            "chosen": sum(p["chosen_hint"] is not None for p in pairs),
            "rejected": sum(p["rejected_hint"] is not None for p in pairs),
            "by_hint": by_hint}


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


class PreparedPairs:
    """Synthetic pairs `python -m training prepare` makes between rounds, off the round's clock,
    with the reward model it prepared: in a 10-minute round the stage took about 100 s of the
    tuning's time for 19 pairs from 29 of 48 prompts (session 48's tips round); made before
    the round, it samples every prompt and the round's tuning keeps those seconds for steps.
    Kept in one file (`<data>/training/synthetic.json`) with what made them: the version that
    sampled them, the judge that scored them (its `finished_at`) and the settings that shape
    them. A round uses them only with that very judge (the prepared one) while that version
    serves; else it samples its own as before."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.record = json.loads(path.read_text())
            assert isinstance(self.record, dict) and isinstance(self.record.get("pairs"), list)
        except (OSError, ValueError, AssertionError):
            self.record = None

    @staticmethod
    def settings_key(cfg: SyntheticConfig, fluent_chosen: bool) -> str:
        """What shapes the pairs: not the stage's time share nor its reach estimate."""
        shaping = {k: getattr(cfg, k) for k in ("samples_per_prompt", "max_prompts", "margin",
                                                "temperature", "max_new_tokens")}
        if cfg.hinted_samples:  # absent when off: pairs prepared before hints existed still fit
            shaping.update(hinted_samples=cfg.hinted_samples, hints=cfg.hint_list)
        return Kept.key(shaping, fluent_chosen)

    def unusable(self, version: str, judge_made: str | None, cfg: SyntheticConfig,
                 fluent_chosen: bool) -> str | None:
        """Why a round serving `version`, judging with the prepared reward model finished at
        `judge_made` (None: a judge of the round's own), cannot use these pairs; None when it
        can."""
        if self.record is None:
            return "`training prepare` has made none"
        if judge_made is None:
            return "the round trains its own reward model"
        if self.record.get("judge") != judge_made:
            return "made with another reward model"
        if self.record.get("version") != version:
            return f"sampled from {self.record.get('version')}, not {version}"
        if self.record.get("settings") != self.settings_key(cfg, fluent_chosen):
            return "made with other synthetic settings"
        return None

    @property
    def pairs(self) -> list[dict]:
        return list(self.record["pairs"]) if self.record else []

    def summary(self) -> dict:
        """What a round's report says of them: the stage's own report and when it was made."""
        return {**self.record["summary"], "prepared": {
            "finished_at": self.record["finished_at"], "seconds": self.record["seconds"],
            "version": self.record["version"]}}

    @classmethod
    def write(cls, path: Path, *, version: str, judge_made: str, cfg: SyntheticConfig,
              fluent_chosen: bool, pairs: list[dict], summary: dict,
              seconds: float) -> "PreparedPairs":
        make_folder(path.parent)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({
            "version": version, "judge": judge_made,
            "settings": cls.settings_key(cfg, fluent_chosen), "pairs": pairs,
            "summary": summary, "seconds": round(seconds, 1),
            "finished_at": datetime.now(timezone.utc).isoformat()}) + "\n")
        os.replace(tmp, path)
        return cls(path)
