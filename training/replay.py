"""Replay: the starting model's own answers to short questions, learnt again beside the users'
pairs, so a round keeps what the model knew while it learns what users want.

`replay_set.jsonl` holds 96 short questions (geography, history, science, animals, food,
sport, arithmetic, words), none of them in (c)'s regression set (which stays the gate's
measure of what the model knew, on other questions) nor among the simulated users' prompts of
`bench/prompts.jsonl`. The starting version answers them greedily through the serving engine
(kept per version beside the gate's replies, so `training prepare` writes them off the round's
clock; their length cap is the synthetic samples', `synthetic.max_new_tokens`), and each DPO
step adds `tune.replay_weight` times the language-modelling loss of a batch of them
(`ReplayBatches`, `ReplayLoss`): the continual-learning "replay" of the model's own outputs, a
pull toward the start on other prompts, where DPO's beta only holds the pairs' own replies.
No answer key is used: the model keeps its own answers, right or wrong.

Short questions, not general requests: replaying the start's answers to one-line explanations
and how-to requests (the kind of prompt users ask) held back the style the users asked for
(structured's session-44 votes: +17 points against +48 with short questions; README,
session 46).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from training.evaluate import ReplyCache, chat_ids

REPLAY_SET = Path(__file__).resolve().parent / "replay_set.jsonl"


def replay_conversations(path: Path = REPLAY_SET) -> list[list[dict]]:
    """The replay requests as one-turn conversations, in file order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [[{"role": "user", "content": r["question"]}] for r in rows]


def replay_replies(cache_dir: Path | None, version: str, engine, repetition_penalty: float,
                   max_new_tokens: int, kind: str | None = None) -> tuple[dict, dict] | None:
    """`engine`'s version's (`version`) greedy reply to each replay request, at most
    `max_new_tokens` long, kept in `cache_dir` beside the gate's replies: {rows: [{prompt,
    reply}], max_new_tokens} (what `ReplayBatches` reads), and what it cost. With `engine`
    None, those kept for an engine of `kind`, or None when one is not kept."""
    conversations = replay_conversations()
    cache = ReplyCache(cache_dir, version, engine, repetition_penalty, kind)
    missing = cache.unkept(conversations, max_new_tokens)
    if engine is None and missing:
        return None
    began = time.monotonic()
    replies = cache.answers(conversations, max_new_tokens)
    if missing:
        cache.save()
    rows = [{"prompt": c, "reply": r} for c, r in zip(conversations, replies)]
    return {"rows": rows, "max_new_tokens": max_new_tokens}, {
        "requests": len(rows), "written": missing, "version": version,
        "max_new_tokens": max_new_tokens, "seconds": round(time.monotonic() - began, 1)}


class ReplayBatches:
    """`rows` ({prompt, reply}) tokenized as TRL tokenizes a conversation (the chat template's
    text, then the tokenizer), with the prompt's tokens masked from the loss; a reply that
    filled `max_new_tokens` (its length cap) gets no end of turn (it was cut, not finished).
    `next()` gives a padded batch of `batch_size`, the rows shuffled (seeded) and taken in
    turn, round and round."""

    def __init__(self, tokenizer, rows: list[dict], batch_size: int, max_length: int,
                 weight: float, max_new_tokens: int, seed: int = 0) -> None:
        self.weight, self.batch_size = weight, max(1, batch_size)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self.rows = []
        for r in rows:
            reply_ids = tokenizer(r["reply"], add_special_tokens=False)["input_ids"]
            cut = len(reply_ids) >= max_new_tokens - 1
            ids, p_len = chat_ids(tokenizer, r["prompt"],
                                  [{"role": "assistant", "content": r["reply"]}], max_length,
                                  finished=not cut)
            if len(ids) > p_len and r["reply"].strip():
                self.rows.append((ids, [-100] * p_len + ids[p_len:]))
        if not self.rows:
            raise ValueError("no replay row has a reply within max_length")
        self.order: list[int] = []
        self.rng = random.Random(seed)
        self.taken = 0

    def next(self, device) -> dict:
        batch = []
        while len(batch) < min(self.batch_size, len(self.rows)):
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            batch.append(self.rows[self.order.pop()])
        self.taken += len(batch)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (row, lab) in enumerate(batch):
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, :len(lab)] = torch.tensor(lab)
            mask[i, :len(row)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "labels": labels.to(device)}


class ReplayLoss:
    """Mixed into TRL's DPO trainer: each training step's loss plus `replay.weight` times the
    language-modelling loss of the next replay batch (logged as `replay_nll`)."""

    replay: ReplayBatches | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.replay is None or not model.training:
            return out
        nll = model(**self.replay.next(self.accelerator.device), use_cache=False).loss
        self._metrics["train"]["replay_nll"].append(nll.item())
        if return_outputs:
            return out[0] + self.replay.weight * nll, out[1]
        return out + self.replay.weight * nll
