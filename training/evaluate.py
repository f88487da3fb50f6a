"""The gate: a candidate serves only if, against the serving version, it is shown to be better
and not shown to be worse. Every check is paired and reports its interval (`training/stats.py`);
no check decides on a difference inside its own noise.

(a) Held-out feedback: the candidate's implicit reward for a reply with the serving version as
    the reference, its mean token log-probability minus the current's (the quantity DPO and KTO
    raise for liked replies), and the AUC of that reward for liked vs disliked held-out
    replies, with a label-stratified bootstrap interval: better above 0.5 (the candidate moved
    towards the replies users liked), worse below. In round 1 the current is the base model
    and this is the candidate's own ranking. Until session 21 (a) compared each version's
    ranking against the base model's (candidate's AUC minus current's): blind to a candidate
    that wants more of what the serving version learned, which ranks the same replies in the
    same order. Replayed on the 21 gates of 10 kept stores (`bench/a_check.py`, from the
    log-probabilities those gates kept), the round-1 gates are unchanged and four held-back
    later candidates now pass (their users rated them +8, +13, +5 and +3 points; (a)'s
    one-sided confidence 0.37 -> 0.99, 0.13 -> 0.79, 0.60 -> 1.00, 0.98 -> 1.00); no gate
    that passed fails. Both versions' AUCs against the base are still reported.
(b) Held-out prompts: both models answer (greedily by default) with the page's repetition penalty
    (`repetition_penalty`), whole replies as users get them (the serving's length cap,
    `judged_max_new_tokens`), and the reward model scores each reply (`judge_verdict`). Its
    direction: the share of prompts where it scores the candidate's reply higher. Its size:
    the approval it expects, its scores made the chance a user likes a reply (Platt scaling,
    `training/stats.py`, on the held-out votes its round checked it on), candidate minus
    current, with an interval that resamples the prompts and refits the calibration. Better:
    the direction above one half beyond the noise, no approval loss shown. Worse: the
    direction below one half beyond the noise and an approval loss shown beyond
    `max_approval_loss`. The direction alone (until session 17) vetoed a candidate its user
    rated 98% against 89% on the judge's quibbles between two liked replies; the size alone
    (session 17) held back one rated 81% against 35% that the judge preferred on 13 of 16
    prompts, and vetoed one rated 99% against 98% on a calibration fitted to older, less
    liked replies. With `judged_samples` k above 1, each version writes k replies per prompt
    sampled at the page's settings (seeds 0..k-1: the same replies in every gate), and the
    judge's mean per prompt is compared (the approval: the mean chance over a prompt's
    replies): what users are served, where one greedy reply can hide what a version does.
    Only for a judge its round trusts: one at chance has no direction to count, and its
    greedy replies leave (a) the time.
(c) What the model knew: `regression_set.jsonl` (240 short questions with known answers,
    shipped here; at 40 a candidate answering 28 against 33 was inside the noise, and at 120
    one candidate's retention read 88% where all 240 read 94%) answered the same way, an
    answer counting as a whole word or number (`answered`); the per-question accuracy
    difference may not show a loss (its interval wholly below zero) whose estimate is beyond
    the allowed one (1 - `min_retention` of the current accuracy), and the candidate's extra
    empty or looping replies (over (b)'s and (c)'s replies) must not be significant by a sign
    test. Without the penalty, greedy
    decoding loops far more than what users are served (temperature 0.7, penalty 1.1), and
    the bold user's +23 candidate was rejected for loops of bold-term lists the page would
    not show as often.

Verdict: better on (a) or (b) (with `require_improvement`), neither significantly worse, and (c)
passed. Better: (a) or (b) alone at the gate's confidence, or both pooled (Stouffer's z of each
bootstrap's one-sided confidence: (a)'s AUC difference, (b)'s direction or, where it shows a
loss, its approval; both must have run) at `pooled_confidence`: with 16 held-out prompts and 64
votes neither check alone saw a candidate that raised the example user's approval 31% -> 69%,
while both leaned its way (about 0.87 and 0.85, pooled 0.94).

The gate works to a deadline: (c) asks at least `min_regression_questions` and more while
`regression_share` of the time allows (140-160 of the 240 in a 10-minute round on 2 cores
with the serving version's replies kept),
and after (a) and (b) more while the rest of the time allows;
(a) scores held-out votes, both labels alternating, while half the time left allows (at least
`min_heldout_votes`); votes that earlier gates scored go first, their base and serving-version
log-probabilities kept (`LogpCache`), so rounds 2 and 3 score more of them in the same time;
(b) answers and judges held-out prompts a chunk at a time while the rest of the time allows
(at least `min_heldout_prompts`). The serving version's greedy replies to (c)'s questions and
(b)'s prompts are kept the same way (`ReplyCache`), from the gate where it was the candidate.
`prepare` computes all of the serving version's half before the round, off its clock (`python
-m training prepare`; `training schedule` runs it between rounds): the gate then computes the
candidate's alone, and what it saves goes to more questions, votes and prompts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import time
import unicodedata
from dataclasses import replace
from pathlib import Path

import torch

from feedback.config import make_folder
from serving.chat import split_system
from serving.config import GenerationSettings
from serving.hardware import autocast, resolve_dtype
from serving.model import LoadedModel
from training.config import GateConfig
from training.dataset import FeedbackData, fluency_failure
from training.stats import (Calibration, Interval, approval_difference, auc, auc_difference,
                            paired_mean, pooled, sign_test, win_share)

REGRESSION_SET = Path(__file__).resolve().parent / "regression_set.jsonl"


def load_regression_set(path: Path = REGRESSION_SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# A list's own numbering or bullet at the start of a line ("1. ", "**2.** ", "- "): not an
# answer, so a reply in a numbered list does not answer "What is 2 + 2?" with its fourth item.
_LIST_MARKER = re.compile(r"^[ \t>]*[*_]{0,2}(?:\d+[.)]|[-*+\u2022])[*_]{0,2}[ \t]+", re.M)


@functools.cache
def _answer_pattern(answer: str) -> re.Pattern:
    """An answer as a whole word or number: no letter or digit on either side, no decimal
    point joining it to more digits, and a word may take a plural ending."""
    plural = "(?:e?s)?" if answer[-1].isalpha() else ""
    return re.compile(rf"(?<!\w)(?<!\d[.,]){re.escape(answer)}{plural}(?!\w)(?![.,]\d)")


def answered(item: dict, reply: str) -> bool:
    """Whether `reply` answers the regression item: it holds one of its (lower-case) answers as
    a whole word or number, its list markers aside (`_LIST_MARKER`), after Unicode's
    compatibility folding ("H\u2082O" is "h2o").

    Until session 43 any substring counted: "ice" in "nice" or "price", "red" in "considered",
    "au" in "because", "0" in "2020", "4" in a list's "4.". Nearly every reply of some length
    answered those questions for both versions, so they told nothing; and a wordier candidate
    gained answers by its length alone, which hid part of what it forgot (`python -m
    bench.c_match` replays kept gates both ways)."""
    text = _LIST_MARKER.sub(" ", unicodedata.normalize("NFKC", reply).lower())
    return any(_answer_pattern(a).search(text) for a in item["answers"])


def mean_logps(loaded: LoadedModel, rows: list[dict]) -> list[float]:
    """Mean log-probability of each row's reply given its prompt (chat template applied), in
    bfloat16 where the machine has it natively; 0 for an empty reply or one the context window
    cut off. One row at a time, and the vocabulary head only over the reply's positions: padded
    batches of 8 took 1.0-1.3 s a row on a 2-core Zen 3 (236 tokens a row), mostly a
    log-softmax over every position's whole vocabulary; this takes 0.74 s for the same figures
    (`python -m bench.logps` measures both)."""
    out = []
    for r in rows:
        lps = reply_token_logps(loaded, r)
        out.append(0.0 if lps is None else float(lps.mean()))
    return out


def chat_ids(tokenizer, prompt: list[dict], completion: list[dict], limit: int,
             finished: bool = True) -> tuple[list[int], int]:
    """`prompt` and its `completion` (messages) as TRL tokenizes a conversation (the chat
    template's text, then the tokenizer), cut at `limit` tokens, and the prompt's length in
    tokens (with the generation prompt). A completion not `finished` (a reply cut at its length
    cap) gets no end of turn: it is the prompt's text and the reply's."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False) if finished \
        else text + "".join(m["content"] for m in completion)
    p_len = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return tokenizer(full, add_special_tokens=False)["input_ids"][:limit], p_len


@torch.inference_mode()
def reply_token_logps(loaded: LoadedModel, row: dict) -> torch.Tensor | None:
    """The log-probability of each token of `row`'s reply given its prompt and the tokens
    before it (`mean_logps`' figures before their mean); None for an empty reply or one the
    context window cut off."""
    model = loaded.model
    body, head = model.get_decoder(), model.get_output_embeddings()
    row_ids, p_len = chat_ids(loaded.tokenizer, row["prompt"], row["completion"],
                              loaded.context_window)
    ids = torch.tensor([row_ids])
    if ids.shape[1] <= p_len:
        return None
    with autocast(model):
        hidden = body(input_ids=ids).last_hidden_state[0, p_len - 1:-1]
        logits = head(hidden).float()
    return logits.gather(1, ids[0, p_len:, None])[:, 0] - logits.logsumexp(-1)


class Kept:
    """Figures of one model version kept between gates, as JSON in `folder/<name>.json`: a
    version never changes, so what was computed for it holds in every later gate (the base
    model's from every round, the serving version's from the round where it was the
    candidate). A missing or unreadable file is empty; `folder` None keeps nothing."""

    def __init__(self, folder: Path | None, name: str) -> None:
        self.hits = 0
        self.path = None if folder is None else \
            folder / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.json"
        try:
            self.values = json.loads(self.path.read_text()) if self.path else {}
            assert isinstance(self.values, dict)
        except (OSError, ValueError, AssertionError):
            self.values = {}

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def get(self, keys: list[str], items: list, compute) -> list:
        """The kept figure of each key; `compute(items missing)` makes the rest (kept too)."""
        missing = [(k, item) for k, item in zip(keys, items) if k not in self.values]
        if missing:
            self.values.update(zip([k for k, _ in missing], compute([i for _, i in missing])))
        self.hits += len(keys) - len(missing)
        return [self.values[k] for k in keys]

    def save(self) -> None:
        if self.path is None:
            return
        make_folder(self.path.parent)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.values))
        os.replace(tmp, self.path)


class LogpCache(Kept):
    """(a)'s mean log-probabilities, per model version and held-out reply
    (`<version>.<dtype>.json`): votes held out in earlier rounds then cost one model (the
    candidate), not three."""

    def __init__(self, folder: Path | None, loaded: LoadedModel) -> None:
        dtype = "bf16" if resolve_dtype() == "bfloat16" else "fp32"  # as `autocast` scores
        super().__init__(folder, f"{loaded.version}.{dtype}")
        self.loaded = loaded

    def known(self, row: dict) -> bool:
        return self.key(row["prompt"], row["completion"]) in self.values

    def mean_logps(self, rows: list[dict]) -> list[float]:
        return self.get([self.key(r["prompt"], r["completion"]) for r in rows], rows,
                        lambda missing: mean_logps(self.loaded, missing))


class ReplyCache(Kept):
    """(b)'s and (c)'s replies, per model version and engine kind
    (`<version>.<engine>.replies.json`): the serving version answered the same regression
    questions and most of the same held-out prompts in the gate that promoted it, so a later
    gate generates only the candidate's replies there. Greedy replies and sampled ones (seeded,
    so a version's reply to a prompt and seed is always the same) are kept alike."""

    def __init__(self, folder: Path | None, version: str, engine,
                 repetition_penalty: float = 1.0, kind: str | None = None) -> None:
        # engine None (with its `kind`): only what is kept can be read
        super().__init__(folder, f"{version}.{kind or engine.kind}.replies")
        self.version, self.engine, self.penalty = version, engine, repetition_penalty

    def _key(self, conversation: list[dict], max_new_tokens: int, seed: int | None) -> str:
        # replies kept before the penalty was a setting were written without one: same key
        penalty = [] if self.penalty == 1.0 else [self.penalty]
        page = GenerationSettings()
        sampled = [] if seed is None else ["sampled", page.temperature, page.top_p, seed]
        return self.key(conversation, max_new_tokens, *penalty, *sampled)

    def unkept(self, conversations: list[list[dict]], max_new_tokens: int,
               samples: int = 1) -> int:
        """How many replies to `conversations` (`samples` each) this version has not kept (to
        be written)."""
        return sum(self._key(c, max_new_tokens, s) not in self.values
                   for c in conversations for s in seeds(samples))

    def answers(self, conversations: list[list[dict]], max_new_tokens: int,
                samples: int = 1) -> list[str]:
        """`answers`, kept: each conversation's replies together, in its order."""
        items = [(c, s) for c in conversations for s in seeds(samples)]
        return self.get([self._key(c, max_new_tokens, s) for c, s in items], items,
                        lambda missing: replies(self.engine, missing, max_new_tokens,
                                                self.penalty))


def seeds(samples: int) -> list[int | None]:
    """One greedy reply (None) for `samples` 1, else the seeds 0..samples-1."""
    return [None] if samples == 1 else list(range(samples))


def replies(engine, items: list[tuple[list[dict], int | None]], max_new_tokens: int,
            repetition_penalty: float = 1.0) -> list[str]:
    """A reply to each (conversation, seed) through the serving engine (the one users get),
    batched: greedy for seed None, else sampled at the page's temperature and top-p with that
    seed. Each conversation keeps the system prompt its replies were under."""
    page = GenerationSettings(max_new_tokens=max_new_tokens,
                              repetition_penalty=repetition_penalty)
    pending = []
    for conversation, seed in items:
        system, turns = split_system(conversation)
        pending.append(engine.submit(turns, replace(
            page, system_prompt=system, seed=seed,
            temperature=0 if seed is None else page.temperature)))
    return [r.wait() for r in pending]


def answers(engine, conversations: list[list[dict]], max_new_tokens: int,
            repetition_penalty: float = 1.0, samples: int = 1) -> list[str]:
    """Replies to `conversations` through the serving engine, batched: one greedy reply each,
    or `samples` sampled at the page's settings (seeds 0..samples-1), each conversation's
    together."""
    return replies(engine, [(c, s) for c in conversations for s in seeds(samples)],
                   max_new_tokens, repetition_penalty)


def heldout_prompts(heldout: FeedbackData) -> list[list[dict]]:
    """Distinct held-out prompts (ending with a user turn), in data order."""
    prompts, seen = [], set()
    for r in heldout.votes + heldout.pairs:
        key = json.dumps(r["prompt"])
        if key not in seen and r["prompt"][-1]["role"] == "user":
            seen.add(key)
            prompts.append(r["prompt"])
    return prompts


def alternating(votes: list[dict], seed: int) -> list[dict]:
    """Votes shuffled (seeded) with liked and disliked spread evenly through the order, so
    any prefix the clock allows holds both labels in about their overall proportion."""
    rng = random.Random(seed)
    keyed = []
    for label in (True, False):
        group = [v for v in votes if bool(v["label"]) is label]
        rng.shuffle(group)
        keyed += [((i + 0.5) / len(group), v) for i, v in enumerate(group)]
    return [v for _, v in sorted(keyed, key=lambda kv: kv[0])]


def known_first(votes: list[dict], known) -> list[dict]:
    """The votes `known(vote)` holds for (log-probabilities an earlier gate kept) first, then
    the others, each group in its order: the order (a) scores them in, which `bench.a_check`
    replays."""
    ready = [known(v) for v in votes]
    return [v for v, r in zip(votes, ready) if r] + [v for v, r in zip(votes, ready) if not r]


def _verdict(iv, null: float = 0.0) -> str:
    return "better" if iv.low > null else "worse" if iv.high < null else "no difference"


def _loss_shown(iv, allowed: float) -> bool:
    """A loss outside the noise (the interval wholly below zero) and beyond the allowed one (its
    estimate): (b)'s approval and (c)'s accuracy."""
    return iv.high < 0 and iv.estimate < -allowed


def judge_verdict(candidate: list, current: list, calibration: Calibration,
                  allowed_loss: float, *, confidence: float, samples: int, seed: int = 0) -> dict:
    """(b): the judge's scores of both versions' replies to the same prompts, a score per
    prompt or, with sampled replies, a list of them (the mean compared). Its direction is
    the share of prompts where it scores the candidate's reply higher (ties half), with a
    bootstrap interval over the prompts; its size is the approval it expects, calibrated
    (`approval_difference`), candidate minus current. Better: the direction above one half
    beyond the noise, and no approval loss shown. Worse: the direction below one half beyond
    the noise, and an approval loss shown beyond `allowed_loss`. The direction counts only for
    a judge that tells the calibration's votes apart (its AUC interval above one half, the
    round's trust test): a judge at chance may still prefer one version's replies on every
    prompt, for their length, say. Pooled with (a): the direction's one-sided confidence, or
    the approval's where a loss is shown or the judge is at chance.

    Each alone misjudged measured rounds. The direction alone (until session 17) vetoed a
    candidate its user rated 98% against 89% (25% of 24 prompts): once both versions' replies
    are liked, which scores higher is what the judge weighs beyond the user's rule, the same
    way on every prompt. The approval alone (session 17) had no power where the judge was
    confident of the order but not of the size: it held back a candidate rated 81% against 35%
    (the judge preferred it on 13 of 16 prompts, expected +4 points [-1, +11]); and where the
    calibration, fitted on older, less liked replies, put a candidate rated 99% against 98% 7
    points lower ([-15, -0]) while the direction was inside the noise (41% of 32), it vetoed."""
    k = len(candidate[0]) if candidate and isinstance(candidate[0], (list, tuple)) else 1
    win = win_share(candidate, current, confidence=confidence, samples=samples, seed=seed)
    stats = dict(confidence=confidence, samples=samples, seed=seed)
    gain, cur_ok, cand_ok = approval_difference(candidate, current, calibration, **stats)
    tells, trusted = calibration.auc, calibration.trusted
    loss = _loss_shown(gain, allowed_loss)
    direction = _verdict(win, 0.5) if trusted else "no difference"
    verdict = ("better" if direction == "better" and not loss else
               "worse" if direction == "worse" and loss else "no difference")
    return {
        "win_rate": win.estimate, "direction": win.to_dict(), "judge_auc": tells.to_dict(),
        "direction_counts": trusted, "approval_current": cur_ok, "approval_candidate": cand_ok,
        "difference": gain.to_dict(), "allowed_loss": allowed_loss, "verdict": verdict,
        "p_better": win.p_better if trusted and not loss else gain.p_better,
        "why": f"the judge scores the candidate's reply"
               + (f" (the mean of its {k} sampled ones)" if k > 1 else "")
               + f" higher on {win.estimate:.0%} of "
               f"{len(candidate)} held-out prompts ({confidence:.0%} interval {win.low:.0%} to "
               f"{win.high:.0%}"
               + ("" if trusted else f"; it counts for nothing: the judge's AUC on "
                  f"{len(calibration.labels)} held-out votes, {tells}, is not above chance")
               + f") and, calibrated on {len(calibration.labels)} held-out votes, expects "
               f"approval {cand_ok:.0%} vs {cur_ok:.0%}: {gain.estimate:+.1%} "
               f"({gain.low:+.1%} to {gain.high:+.1%}); better if it prefers the candidate "
               f"beyond the noise with no approval loss shown, worse if it prefers the "
               f"current and expects a loss beyond {allowed_loss:.1%}: {verdict}"}


def in_time(items: list, deadline: float, *, chunk: int, at_least: int, cost=len,
            pace: list[float] | None = None, batched: bool = False):
    """`items` a chunk at a time, while the work on the next chunk (done by the caller between
    chunks) can end by `deadline` (time.monotonic()), judged by the slowest rate so far in
    seconds per unit of `cost(chunk)` (read before the chunk is worked on: (a)'s cached votes
    cost one model, new ones three); the first `at_least` items are always given. `pace`, a
    one-item list, carries that rate from an earlier pass over the same kind of work (read at
    the start, updated after each chunk), so a second pass does not start blind. `batched`:
    a chunk is one wave of the engine's slots, decoded together, so a short last chunk takes
    about as long as a full one (its longest reply sets the time) and is costed as one. (In
    session 52 (b) had about 84 s for 27 prompts in chunks of 8; after three chunks of about
    24 s, the last 3 prompts, priced at 3/8 of a chunk, started with 12 s left and the round
    ended 8 s past its 10 minutes.)"""
    done, rate = 0, pace[0] if pace else 0.0
    while done < len(items):
        rows = items[done:done + chunk]
        units = max(cost(rows) * (chunk / len(rows) if batched else 1), 1)
        if done >= at_least and time.monotonic() + rate * units >= deadline:
            return
        began = time.monotonic()
        yield rows
        done += len(rows)
        rate = max(rate, (time.monotonic() - began) / units)
        if pace is not None:
            pace[:] = [rate]


def share_end(start: float, deadline: float, share: float) -> float:
    """When a stage starting at `start` must end to leave the rest of the time to `deadline`
    (time.monotonic(); infinite: no clock) to the stages after it."""
    return start + share * max(0.0, deadline - start) if deadline < float("inf") else deadline


def regression_questions() -> tuple[list[dict], list[list[dict]]]:
    """(c)'s regression set and its questions as conversations, in the order (c) asks them."""
    regression = load_regression_set()
    return regression, [[{"role": "user", "content": it["question"]}] for it in regression]


def prepare(*, current: LoadedModel, base: LoadedModel, current_engine, heldout: FeedbackData,
            cfg: GateConfig, deadline: float | None = None, log=lambda line: None,
            cache_dir: Path) -> dict:
    """What the next gate needs of the serving version, computed before the round: its replies
    to (c)'s questions and to (b)'s held-out prompts, and its and the base model's
    log-probabilities of (a)'s held-out votes, kept in `cache_dir` where the gate reads them
    (`ReplyCache`, `LogpCache`), in the order the gate asks for them. None of it depends on
    the candidate, so the gate then computes only the candidate's half: in a round's first
    gate, where nothing of the base model was kept, (c)'s 40 questions took 78 of its 175 s
    and (b) had time for 8 of 16 prompts (session 25's example round 1). Within `deadline`
    (time.monotonic()), each part by the gate's own shares; what is kept already costs
    nothing. Returns how many of each were written and kept."""
    start = time.monotonic()
    deadline = deadline if deadline is not None else float("inf")
    kept = ReplyCache(cache_dir, current.version, current_engine, cfg.repetition_penalty)
    logps = [LogpCache(cache_dir, m) for m in ([base] if current is base else [base, current])]
    done: dict[str, dict] = {}

    def part(name: str, items: list, share: float, chunk: int, missing, work, caches,
             what: str) -> None:
        """`work` on `items` a chunk at a time within `share` of the time left; `missing(rows)`
        counts what is not kept yet (the chunk's cost)."""
        t, before, asked = time.monotonic(), missing(items), 0
        for rows in in_time(items, share_end(t, deadline, share), chunk=chunk, at_least=0,
                            cost=missing):
            work(rows)
            asked += len(rows)
        for cache in caches:
            cache.save()
        done[name] = {"items": asked, "written": before - missing(items),
                      "seconds": round(time.monotonic() - t, 1)}
        log(f"prepare ({name[0]}): {done[name]['written']} {what} written, {asked} of "
            f"{len(items)} ready, in {time.monotonic() - t:.0f}s")

    _, questions = regression_questions()
    part("c_replies", questions, cfg.regression_share, 20,
         lambda rows: kept.unkept(rows, cfg.reply_max_new_tokens),
         lambda rows: kept.answers(rows, cfg.reply_max_new_tokens), [kept],
         f"replies of {current.version}")

    # greedy replies, and the sampled ones too where (b) asks for them: a judge its round
    # does not trust gets greedy ones
    prompts = heldout_prompts(heldout)[:cfg.max_heldout_prompts]
    forms = sorted({1, cfg.judged_samples})
    part("b_replies", prompts, 0.5, cfg.min_heldout_prompts,
         lambda rows: sum(kept.unkept(rows, cfg.judged_max_new_tokens, k) for k in forms),
         lambda rows: [kept.answers(rows, cfg.judged_max_new_tokens, k) for k in forms],
         [kept], f"replies of {current.version}")

    # the gate's order: the votes whose log-probabilities are kept first
    votes = known_first(alternating(heldout.votes, cfg.seed),
                        lambda v: all(c.known(v) for c in logps))
    part("a_logps", votes, 1.0, 16,
         lambda rows: sum(not c.known(v) for c in logps for v in rows),
         lambda rows: [c.mean_logps(rows) for c in logps], logps,
         f"log-probabilities of {' and '.join(c.loaded.version for c in logps)}")
    return {"version": current.version, "questions": len(questions), "prompts": len(prompts),
            "votes": len(votes), **done, "seconds": round(time.monotonic() - start, 1)}


def gate(*, current: LoadedModel, candidate: LoadedModel, base: LoadedModel,
         current_engine, candidate_engine, heldout: FeedbackData, reward_model,
         calibration: Calibration | None, cfg: GateConfig, deadline: float | None = None,
         log=lambda line: None, cache_dir: Path | None = None) -> dict:
    """Run (c), (b), (a) within `deadline` (time.monotonic()); returns each check's numbers,
    interval and verdict, and the decision. Replies come from the engines users are served
    by; log-probabilities from the transformers models (kept in `cache_dir` for later gates)."""
    start = time.monotonic()
    deadline = deadline if deadline is not None else float("inf")
    stats = dict(confidence=cfg.confidence, samples=cfg.bootstrap_samples, seed=cfg.seed)
    checks: dict[str, dict] = {}
    pairs_for_fluency: list[tuple[str | None, str | None]] = []
    kept = [ReplyCache(cache_dir, current.version, current_engine, cfg.repetition_penalty),
            ReplyCache(cache_dir, candidate.version, candidate_engine, cfg.repetition_penalty)]

    # (c) regression set, what the model must not forget: its first `min_regression_questions`
    # always, then 20 at a time while its share of the gate's time allows, and after (a) and
    # (b) more while the gate's time allows (in a prepared round's first gate (a) and (b) ran
    # out of votes and prompts with a third of the time left). The serving version's replies
    # are usually kept (by `prepare`, or the gate that promoted it), so a gate writes only the
    # candidate's; the first gate answers for both models, and on a slow CPU the whole set
    # would leave (b) and (a) little time.
    regression, questions = regression_questions()
    cur_replies, cand_replies = [], []
    pace: list[float] = []  # (c)'s seconds per reply to write, carried to its second pass

    def to_answer(rows: list) -> int:  # replies to write (the current's may be kept)
        return len(rows) + kept[0].unkept(rows, cfg.reply_max_new_tokens)

    def ask(until: float, at_least: int) -> None:
        t = time.monotonic()
        for rows in in_time(questions[len(cur_replies):], until, chunk=20, at_least=at_least,
                            cost=to_answer, pace=pace):
            o, c = (k.answers(rows, cfg.reply_max_new_tokens) for k in kept)
            cur_replies.extend(o)
            cand_replies.extend(c)
        log(f"gate (c): {len(cur_replies)} of {len(regression)} questions answered, "
            f"{time.monotonic() - t:.0f}s")

    checks["c_regression"] = {}  # filled once its last question is answered, after (b)
    ask(share_end(time.monotonic(), deadline, cfg.regression_share),
        cfg.min_regression_questions)

    # (a) implicit reward ranking on held-out votes, scored while half the time left allows;
    # (b) gets the rest, so what (a) leaves (all its votes scored early, their base and
    # serving-version log-probabilities kept) goes to (b)'s prompts.
    t = time.monotonic()
    a_end = share_end(t, deadline, 0.5)
    votes = alternating(heldout.votes, cfg.seed)
    if len(votes) < cfg.min_heldout_votes or len({v["label"] for v in votes}) < 2:
        checks["a_heldout_ranking"] = {
            "verdict": "no difference", "votes": len(votes),
            "why": f"{len(votes)} held-out votes; need {cfg.min_heldout_votes} with both labels"}
    else:
        models = [base] + ([] if current is base else [current]) + [candidate]
        caches = [LogpCache(cache_dir, model) for model in models]
        # votes the earlier gates scored for all but the candidate first: they cost one model
        votes = known_first(votes, lambda v: all(c.known(v) for c in caches[:-1]))
        lps: list[list[float]] = [[] for _ in models]

        def to_score(rows: list[dict]) -> int:  # log-probabilities not yet kept
            return sum(not cache.known(v) for cache in caches for v in rows)

        scored = 0
        for rows in in_time(votes, a_end, chunk=16, at_least=cfg.min_heldout_votes,
                            cost=to_score):
            for lp, cache in zip(lps, caches):
                lp += cache.mean_logps(rows)
            scored += len(rows)
        for cache in caches:
            cache.save()
        labels = [v["label"] for v in votes[:scored]]
        base_lp, cand_lp = lps[0], lps[-1]
        cur_lp = base_lp if current is base else lps[1]
        cur_r = [c - b for c, b in zip(cur_lp, base_lp)]
        cand_r = [c - b for c, b in zip(cand_lp, base_lp)]
        if len(set(labels)) < 2:
            checks["a_heldout_ranking"] = {"verdict": "no difference", "votes": scored,
                                           "why": "the time allowed only one label's votes"}
        else:
            # the candidate's implicit reward with the current as reference (0.5: no change)
            shift = [c - o for c, o in zip(cand_lp, cur_lp)]
            d = auc_difference(shift, [0.0] * len(shift), labels, **stats)
            verdict = _verdict(d)
            cur_auc, cand_auc = auc(cur_r, labels), auc(cand_r, labels)
            checks["a_heldout_ranking"] = {
                "auc": d.estimate + 0.5, "current_auc": cur_auc, "candidate_auc": cand_auc,
                "votes": scored, "votes_available": len(votes), "difference": d.to_dict(),
                "verdict": verdict, "cached": {c.loaded.version: c.hits for c in caches},
                "why": f"the candidate's log-probabilities relative to the current's rank liked "
                       f"above disliked replies at AUC {d.estimate + 0.5:.3f} "
                       f"[{d.low + 0.5:.3f}, {d.high + 0.5:.3f}] ({cfg.confidence:.0%}) on "
                       f"{scored} votes (0.5: no change): {verdict}; against the base model "
                       f"{cand_auc:.3f} vs {cur_auc:.3f}"}
        log(f"gate (a): {scored} of {len(votes)} votes in {time.monotonic() - t:.0f}s "
            f"({sum(c.hits for c in caches)} log-probabilities cached)")

    # (b) the reward model's verdict on held-out prompts, as many as the time left allows:
    # answered and judged a chunk at a time, so the judge's scoring counts too (on a CPU without
    # bfloat16 it took as long as the answers, and a count fitted to the answers alone ran (b)
    # past its share and the round past its budget).
    available = heldout_prompts(heldout)
    if reward_model is None or calibration is None or not available:
        checks["b_reward_model"] = {
            "verdict": "no difference", "prompts": 0, "prompts_available": len(available),
            "why": "no reward model calibrated on held-out votes, or no held-out prompts to "
                   "judge on"}
    else:
        t = time.monotonic()
        prompts, cur_b, cand_b, cur_s, cand_s = [], [], [], [], []
        asked = available[:cfg.max_heldout_prompts]

        # sampled replies cost k times the time; a judge at chance has no direction to show
        # with them ((b) counts it for nothing), so it gets one greedy reply a prompt, on as
        # many prompts as the time allows
        k = cfg.judged_samples if calibration.trusted else 1

        def work(rows: list) -> int:  # replies to write and to judge (the current's may be kept)
            return 3 * k * len(rows) + kept[0].unkept(rows, cfg.judged_max_new_tokens, k)

        # a chunk holds about `min_heldout_prompts` replies of each version whatever k (one
        # wave of the engine's 8 slots): chunks of 8 prompts x 2 sampled replies took 35 s, and
        # with 27 s of the gate left (b) stopped at 8 prompts where 4 more would have fitted
        # (session 40's replays of tips' round 1)
        for rows in in_time(asked, deadline, at_least=cfg.min_heldout_prompts, cost=work,
                            chunk=-(-cfg.min_heldout_prompts // k) if deadline < float("inf")
                            else len(asked), batched=True):
            o, c = (kp.answers(rows, cfg.judged_max_new_tokens, k) for kp in kept)
            each = [p for p in rows for _ in range(k)]  # a prompt's replies together
            scores = reward_model.score([p + [{"role": "assistant", "content": r}] for p, r in
                                         zip(each * 2, o + c)])
            prompts += rows
            cur_b += o
            cand_b += c
            cur_s += [scores[i:i + k] for i in range(0, len(each), k)]
            cand_s += [scores[len(each) + i:len(each) + i + k] for i in range(0, len(each), k)]
        pairs_for_fluency += [(fluency_failure(o), fluency_failure(c))
                              for o, c in zip(cur_b, cand_b)]
        judged = judge_verdict(cand_s, cur_s, calibration, cfg.max_approval_loss, **stats)
        mean = sum(map(sum, cur_s)) / len(cur_b), sum(map(sum, cand_s)) / len(cand_b)
        checks["b_reward_model"] = {
            **judged, "calibration_votes": len(calibration.labels), "prompts": len(prompts),
            "prompts_available": len(available), "replies_per_prompt": k,
            "sampled": k > 1, "mean_reward_current": mean[0], "mean_reward_candidate": mean[1],
            "max_new_tokens": cfg.judged_max_new_tokens,
            "examples": [{"prompt": p[-1]["content"], "current": o, "candidate": c,
                          "current_reward": so[0], "candidate_reward": sc[0]}
                         for p, o, c, so, sc in zip(prompts, cur_b[::k], cand_b[::k], cur_s,
                                                    cand_s)][:5]}
        log(f"gate (b): the judge prefers the candidate on {judged['win_rate']:.0%}, expects "
            f"approval {judged['approval_candidate']:.0%} vs {judged['approval_current']:.0%} "
            f"on {len(prompts)} prompts"
            + (f" x {k} sampled replies" if k > 1 else "")
            + f" in {time.monotonic() - t:.0f}s")

    # (c) continued: more questions while the time allows; accuracy within the allowed loss,
    # fluency not significantly worse.
    if len(cur_replies) < len(questions):
        ask(deadline, 0)
    for cache in kept:
        cache.save()
    items = regression[:len(cur_replies)]
    cur_ok = [answered(it, r) for it, r in zip(items, cur_replies)]
    cand_ok = [answered(it, r) for it, r in zip(items, cand_replies)]
    pairs_for_fluency += [(fluency_failure(o), fluency_failure(c))
                          for o, c in zip(cur_replies, cand_replies)]
    diff, allowed, accuracy_ok = accuracy_verdict(cur_ok, cand_ok, cfg)
    cur_acc = sum(cur_ok) / len(items)
    c = checks["c_regression"]
    c.update({
        "current": {"correct": sum(cur_ok), "accuracy": cur_acc},
        "candidate": {"correct": sum(cand_ok), "accuracy": sum(cand_ok) / len(items)},
        "questions": len(items), "questions_available": len(regression),
        "retention": sum(cand_ok) / sum(cur_ok) if sum(cur_ok) else 1.0,
        "accuracy_difference": diff.to_dict(), "allowed_loss": allowed,
        "repetition_penalty": cfg.repetition_penalty,
        "examples": [{"question": it["question"], "reply": r, "correct": ok}
                     for it, r, ok in zip(items, cand_replies, cand_ok)][:10]})
    log(f"gate (c): {sum(cand_ok)}/{len(items)} vs {sum(cur_ok)}/{len(items)} "
        f"of {len(regression)} questions")
    worse_fluency = sum(o is None and n is not None for o, n in pairs_for_fluency)
    better_fluency = sum(o is not None and n is None for o, n in pairs_for_fluency)
    p_fluency = sign_test(worse_fluency, better_fluency)
    c["fluency"] = {"replies": len(pairs_for_fluency),
                    "current_failures": sum(o is not None for o, _ in pairs_for_fluency),
                    "candidate_failures": sum(n is not None for _, n in pairs_for_fluency),
                    "only_candidate": worse_fluency, "only_current": better_fluency,
                    "p_value": p_fluency}
    fluency_ok = p_fluency >= cfg.fluency_significance
    c["verdict"] = "passed" if accuracy_ok and fluency_ok else "worse"
    c["why"] = (f"accuracy {c['candidate']['correct']}/{len(items)} vs "
                f"{c['current']['correct']}/{len(items)}, difference {diff} "
                f"(worse if the interval is below 0 and the difference below -{allowed:.3f}); "
                f"empty or looping replies "
                f"{c['fluency']['candidate_failures']} vs {c['fluency']['current_failures']} "
                f"of {len(pairs_for_fluency)} (sign test p = {p_fluency:.2f}, worse if below "
                f"{cfg.fluency_significance})")

    together, improved, passed = decide(checks, cfg)
    for check in checks.values():
        check["passed"] = check["verdict"] != "worse"
    return {"checks": checks, "pooled": together, "passed": passed, "enforced": cfg.enforce,
            "improved": improved, "seconds": round(time.monotonic() - start, 1),
            "replies_kept": {k.version: k.hits for k in kept}}


def accuracy_verdict(cur_ok: list[bool], cand_ok: list[bool],
                     cfg: GateConfig) -> tuple[Interval, float, bool]:
    """(c)'s accuracy on the same questions: the per-question difference with its interval,
    the allowed loss (1 - `min_retention` of the current accuracy), and whether it passes.
    Worse: a loss outside the noise (interval wholly below zero) and beyond the allowed one
    (its estimate). Requiring the whole interval below the allowed loss, as until session 15,
    passed a candidate answering 82 of 120 against 94 ([-0.183, -0.017]): a loss shown, 2.5
    times the allowed one, and not provably beyond it."""
    diff = paired_mean([int(c) - int(o) for c, o in zip(cand_ok, cur_ok)],
                       confidence=cfg.confidence, samples=cfg.bootstrap_samples, seed=cfg.seed)
    allowed = (1 - cfg.min_retention) * sum(cur_ok) / len(cur_ok)
    return diff, allowed, not _loss_shown(diff, allowed)


def decide(checks: dict, cfg: GateConfig) -> tuple[dict, bool, bool]:
    """The gate's decision from its checks' verdicts: (a) and (b) pooled, whether the candidate
    was shown better (or need not be), and whether it passes (nothing worse, (c) passed)."""
    a, b = checks["a_heldout_ranking"]["verdict"], checks["b_reward_model"]["verdict"]
    together = pool_rankings(checks, cfg.pooled_confidence)
    improved = "better" in (a, b) or together["better"] or not cfg.require_improvement
    passed = improved and "worse" not in (a, b) and checks["c_regression"]["verdict"] == "passed"
    return together, improved, passed


def pool_rankings(checks: dict, threshold: float) -> dict:
    """(a) and (b) together: each one's one-sided confidence that the candidate ranks better,
    pooled; better when the pooled confidence reaches `threshold`. Only both: one check alone
    must clear its own interval (the gate's confidence), not the pooled threshold."""
    sides = {"a": (checks["a_heldout_ranking"].get("difference") or {}).get("p_better"),
             "b": checks["b_reward_model"].get("p_better")}
    ran = {k: p for k, p in sides.items() if p is not None}
    if len(ran) < 2:
        alone = f"only ({next(iter(ran))}) ran" if ran else "neither (a) nor (b) ran"
        return {"confidence": None, "threshold": threshold, "better": False, "of": ran,
                "why": f"{alone}: nothing to pool"}
    p = pooled(list(ran.values()))
    shown = ", ".join(f"({k}) {v:.2f}" for k, v in ran.items())
    return {"confidence": p, "threshold": threshold, "better": p >= threshold, "of": ran,
            "why": f"one-sided confidence that the candidate ranks better: {shown}; pooled "
                   f"{p:.2f} ({'at least' if p >= threshold else 'below'} {threshold:g})"}
