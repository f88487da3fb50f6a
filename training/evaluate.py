"""The gate: a candidate serves only if, against the serving version, it is better and no worse.

(a) Held-out feedback: each model's implicit reward for a reply is its mean token log-probability
    minus the base model's (the quantity DPO and KTO raise for liked replies). The AUC of that
    reward for liked vs disliked held-out replies must beat the current model's AUC by more than
    `min_auc_gain`. (The base model's own AUC is 0.5: its implicit reward is zero everywhere.)
(b) Held-out prompts: both models answer greedily; the reward model must prefer the candidate's
    reply on more than `min_reward_win_rate` of them (ties count half).
(c) What the model knew: `regression_set.jsonl` (short questions with known answers, shipped
    here) answered greedily; accuracy must keep `min_retention` of the current model's, and the
    candidate may not add empty or looping replies (fluency) beyond the allowance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from serving.config import GenerationSettings, ServingConfig
from serving.engine import Engine
from serving.model import LoadedModel
from training.config import GateConfig
from training.dataset import FeedbackData

REGRESSION_SET = Path(__file__).resolve().parent / "regression_set.jsonl"


def load_regression_set(path: Path = REGRESSION_SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.inference_mode()
def mean_logps(loaded: LoadedModel, rows: list[dict]) -> list[float]:
    """Mean log-probability of each row's reply given its prompt (chat template applied)."""
    tok, model = loaded.tokenizer, loaded.model
    out = []
    for r in rows:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"][:loaded.context_window]
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        reply = logp[len(p_ids) - 1:]
        out.append(float(reply.mean()) if len(reply) else 0.0)
    return out


def auc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a liked reply > score of a disliked one), ties counting half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    assert pos and neg
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def fluency_failure(text: str) -> str | None:
    """Why a reply is not fluent ("empty", "repetition loop"), or None."""
    words = re.findall(r"\w+", text.lower())
    if not words:
        return "empty"
    grams = [" ".join(words[i:i + 4]) for i in range(len(words) - 3)]
    if grams and max(grams.count(g) for g in set(grams)) >= 4:
        return "repetition loop"
    if len(words) >= 40 and len(set(words)) / len(words) < 0.3:
        return "repetition loop"
    return None


def answers(loaded: LoadedModel, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy replies through the serving engine, batched."""
    engine = Engine(loaded, ServingConfig())
    try:
        settings = GenerationSettings(temperature=0, max_new_tokens=max_new_tokens,
                                      repetition_penalty=1.0)
        return [r.text for r in engine.generate(conversations, settings)]
    finally:
        engine.close()


def regression(loaded: LoadedModel, cfg: GateConfig, items: list[dict]) -> dict:
    replies = answers(loaded, [[{"role": "user", "content": it["question"]}] for it in items],
                      cfg.reply_max_new_tokens)
    correct = [any(a in r.lower() for a in it["answers"]) for it, r in zip(items, replies)]
    failures = [fluency_failure(r) for r in replies]
    return {"accuracy": sum(correct) / len(items), "correct": sum(correct),
            "fluency_failures": sum(f is not None for f in failures),
            "examples": [{"question": it["question"], "reply": r, "correct": c, "fluency": f}
                         for it, r, c, f in zip(items, replies, correct, failures)][:10]}


def gate(*, current: LoadedModel, candidate: LoadedModel, base: LoadedModel,
         heldout: FeedbackData, reward_model, cfg: GateConfig) -> dict:
    """Run (a), (b), (c); returns the numbers, each check's verdict and the decision."""
    checks: dict[str, dict] = {}

    # (a) implicit reward ranking on held-out votes
    labels = [r["label"] for r in heldout.votes]
    if len(labels) < cfg.min_heldout_votes or len(set(labels)) < 2:
        checks["a_heldout_ranking"] = {
            "passed": False, "why": f"{len(labels)} held-out votes "
            f"({sum(labels)} liked); need {cfg.min_heldout_votes} with both labels"}
    else:
        base_lp = mean_logps(base, heldout.votes)
        cur_lp = base_lp if current is base else mean_logps(current, heldout.votes)
        cand_lp = mean_logps(candidate, heldout.votes)
        cur_auc = auc([c - b for c, b in zip(cur_lp, base_lp)], labels)
        cand_auc = auc([c - b for c, b in zip(cand_lp, base_lp)], labels)
        checks["a_heldout_ranking"] = {
            "current_auc": cur_auc, "candidate_auc": cand_auc, "votes": len(labels),
            "passed": cand_auc > cur_auc + cfg.min_auc_gain,
            "why": f"AUC {cand_auc:.3f} vs {cur_auc:.3f} (must beat by > {cfg.min_auc_gain})"}

    # (b) the reward model's verdict on held-out prompts
    prompts, seen = [], set()
    for r in heldout.votes + heldout.pairs:
        key = json.dumps(r["prompt"])
        if key not in seen and r["prompt"][-1]["role"] == "user":
            seen.add(key)
            prompts.append(r["prompt"])
    prompts = prompts[:cfg.max_heldout_prompts]
    if reward_model is None or not prompts:
        checks["b_reward_model"] = {"passed": False, "why": "no reward model or no held-out "
                                    "prompts to judge on"}
    else:
        cur_replies = answers(current, prompts, cfg.reply_max_new_tokens)
        cand_replies = answers(candidate, prompts, cfg.reply_max_new_tokens)
        as_conv = [p + [{"role": "assistant", "content": r}] for p, r in
                   zip(prompts * 2, cur_replies + cand_replies)]
        scores = reward_model.score(as_conv)
        cur_s, cand_s = scores[:len(prompts)], scores[len(prompts):]
        wins = sum((c > o) + 0.5 * (c == o) for c, o in zip(cand_s, cur_s)) / len(prompts)
        pair_accuracy = None
        if heldout.pairs:  # how well the judge itself agrees with held-out user choices
            pair_scores = reward_model.score([p["prompt"] + p["chosen"] for p in heldout.pairs]
                                             + [p["prompt"] + p["rejected"]
                                                for p in heldout.pairs])
            n = len(heldout.pairs)
            pair_accuracy = sum(c > r for c, r in zip(pair_scores[:n], pair_scores[n:])) / n
        checks["b_reward_model"] = {
            "win_rate": wins, "prompts": len(prompts), "heldout_pair_accuracy": pair_accuracy,
            "mean_reward_current": sum(cur_s) / len(cur_s),
            "mean_reward_candidate": sum(cand_s) / len(cand_s),
            "passed": wins > cfg.min_reward_win_rate,
            "why": f"reward model prefers the candidate on {wins:.0%} of {len(prompts)} "
                   f"held-out prompts (must be > {cfg.min_reward_win_rate:.0%})"}

    # (c) regression set and fluency
    items = load_regression_set()
    cur_reg = regression(current, cfg, items)
    cand_reg = regression(candidate, cfg, items)
    retention = cand_reg["accuracy"] / cur_reg["accuracy"] if cur_reg["accuracy"] else 1.0
    extra_failures = cand_reg["fluency_failures"] - cur_reg["fluency_failures"]
    checks["c_regression"] = {
        "current": cur_reg, "candidate": cand_reg, "retention": retention,
        "passed": retention >= cfg.min_retention
        and extra_failures <= cfg.max_fluency_failures_increase,
        "why": f"accuracy {cand_reg['correct']}/{len(items)} vs {cur_reg['correct']}/"
               f"{len(items)} (retention {retention:.0%}, need {cfg.min_retention:.0%}); "
               f"fluency failures {cand_reg['fluency_failures']} vs "
               f"{cur_reg['fluency_failures']}"}
    return {"checks": checks, "passed": all(c["passed"] for c in checks.values())}
