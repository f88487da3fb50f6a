"""Stored feedback -> TRL datasets: unpaired vote rows (KTO) and preference pairs (DPO, reward).

Rules, applied in this order:
- Withdrawn votes are ignored; a changed vote counts once, as its latest value (the store keeps
  one vote per user and reply, with its history elsewhere).
- Duplicates: rows with the same prompt and reply are one row. If their votes conflict (several
  users, or imports), the majority label wins; on a tie, the most recent vote wins. The row keeps
  the ids of every vote behind it.
- Pairs come from regenerate picks and edits, and from a liked and a disliked reply to the same
  prompt (at most `max_pairs_per_prompt` per prompt); duplicates dropped, identical texts skipped.
- What users said: a vote with a reason chip or a comment is a stated preference. Each pair
  carries its `strength` in [0, 1]: 1 for a regenerate pick or an edit (the user compared the two
  replies), the share of its two votes that state a reason or comment for a pair of votes, 0 for
  the reward model's top-up pairs across prompts. The reward model asks stronger pairs to be
  told apart by a wider margin (`reward.reason_margin`).
- The held-out split is by conversation, from a salted hash of its id: deterministic, and no
  conversation is on both sides.
- Training leaves out what would teach a loop (`data.drop_disfluent`): the liked replies that
  are empty or repeat themselves (`fluency_failure`, the gate's own fluency test) and the pairs
  that prefer such a reply to a fluent one. A disliked loop stays: it teaches the right thing.
  The held-out votes are the users' evidence and stay as they are.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from feedback import io
from feedback.db import transaction
from training.config import DataConfig
from training.stats import share_interval

# TRL's recommendation for KTO: desirable_weight * n_pos : undesirable_weight * n_neg in [1, 4/3].
KTO_RATIO_RANGE = (1.0, 4 / 3)


class NotEnoughFeedback(Exception):
    """Too little feedback, or one label only: no round is possible (the message says what)."""


@dataclass
class FeedbackData:
    votes: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)  # what `fluent` dropped

    @property
    def counts(self) -> dict[str, int]:
        pos = sum(r["label"] for r in self.votes)
        return {"votes": len(self.votes), "liked": pos, "disliked": len(self.votes) - pos,
                "pairs": len(self.pairs)}


def _key(prompt: list[dict], reply: str) -> str:
    return json.dumps([prompt, reply], sort_keys=True)


def _merge_votes(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[_key(r["prompt"], r["completion"][0]["content"])].append(r)
    merged = []
    for group in groups.values():
        ups = sum(r["label"] for r in group)
        downs = len(group) - ups
        latest = max(group, key=lambda r: r["voted_at"])
        label = ups > downs if ups != downs else latest["label"]
        merged.append({"prompt": latest["prompt"], "completion": latest["completion"],
                       "label": bool(label), "conversation_id": latest["conversation_id"],
                       "said": any(r.get("reasons") or r.get("comment", "").strip()
                                   for r in group if r["label"] == label),
                       "message_id": latest["message_id"],
                       "model_version": latest.get("model_version"),
                       "vote_ids": sorted(r["vote_id"] for r in group)})
    return sorted(merged, key=lambda r: r["vote_ids"][0])


def _pairs(votes: list[dict], prefs: list[dict], cfg: DataConfig) -> list[dict]:
    out, seen = [], set()

    def add(prompt, chosen, rejected, source, conversation_id, strength, link):
        if chosen.strip() == rejected.strip():
            return
        key = _key(prompt, chosen + "\x00" + rejected)
        if key in seen:
            return
        seen.add(key)
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "source": source, "conversation_id": conversation_id,
                    "strength": strength, **link})

    for p in prefs:
        add(p["prompt"], p["chosen"][0]["content"], p["rejected"][0]["content"], p["source"],
            p["conversation_id"], 1.0, {"preference_id": p["preference_id"]})
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for v in votes:
        by_prompt[json.dumps(v["prompt"], sort_keys=True)].append(v)
    for group in by_prompt.values():
        liked = [v for v in group if v["label"]]
        disliked = [v for v in group if not v["label"]]
        made = 0
        for good in liked:
            for bad in disliked:
                if made >= cfg.max_pairs_per_prompt:
                    break
                add(good["prompt"], good["completion"][0]["content"],
                    bad["completion"][0]["content"], "votes", good["conversation_id"],
                    (good["said"] + bad["said"]) / 2,
                    {"vote_ids": good["vote_ids"] + bad["vote_ids"]})
                made += 1
    return out


def load_feedback(cfg: DataConfig | None = None, *, url: str | None = None) -> FeedbackData:
    """Everything usable in the store, after the rules above."""
    cfg = cfg or DataConfig()
    with transaction(url=url) as session:
        raw_votes = list(io.iter_vote_rows(session=session))
        prefs = list(io.iter_pair_rows(session=session))
    votes = _merge_votes(raw_votes)
    return FeedbackData(votes=votes, pairs=_pairs(votes, prefs, cfg))


MAX_HELDOUT_SHARE = 0.5


def heldout_share(votes: int, cfg: DataConfig) -> float:
    """The share of conversations held out when the store holds `votes` usable votes:
    `heldout_fraction`, raised while the store is small so that about `heldout_min_votes`
    votes are held out (at most half). It falls as votes arrive and never rises, and a
    conversation is held out while its hash mark is under the share: so a held-out
    conversation may later move into training, and a training one never into the held-out
    votes (unless votes are deleted)."""
    if not cfg.heldout_min_votes or not votes:
        return cfg.heldout_fraction
    return max(cfg.heldout_fraction, min(MAX_HELDOUT_SHARE, cfg.heldout_min_votes / votes))


def is_heldout(conversation_id: int, cfg: DataConfig, share: float) -> bool:
    """Whether the conversation is held out at `share` (`heldout_share` of the store)."""
    digest = hashlib.sha256(f"{cfg.split_salt}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def split(data: FeedbackData, cfg: DataConfig) -> tuple[FeedbackData, FeedbackData]:
    """(train, held-out), by conversation, at `heldout_share` of the store's votes; the
    training side `fluent` when `cfg.drop_disfluent`."""
    share = heldout_share(len(data.votes), cfg)

    def part(rows, heldout):
        return [r for r in rows if is_heldout(r["conversation_id"], cfg, share) == heldout]
    train = FeedbackData(part(data.votes, False), part(data.pairs, False))
    return (fluent(train) if cfg.drop_disfluent else train,
            FeedbackData(part(data.votes, True), part(data.pairs, True)))


def fluency_failure(text: str) -> str | None:
    """Why a reply is not fluent ("empty", "repetition loop"), or None."""
    words = re.findall(r"\w+", text.lower())
    if not words:
        return "empty"
    grams = [" ".join(words[i:i + 4]) for i in range(len(words) - 3)]
    if grams and max(Counter(grams).values()) >= 4:
        return "repetition loop"
    if len(words) >= 40 and len(set(words)) / len(words) < 0.3:
        return "repetition loop"
    return None


def fluent(data: FeedbackData) -> FeedbackData:
    """`data` without its liked replies that fail `fluency_failure` and its pairs whose chosen
    reply fails it while the rejected one does not; `left_out` counts both."""
    votes = [v for v in data.votes
             if not (v["label"] and fluency_failure(v["completion"][-1]["content"]))]
    pairs = [p for p in data.pairs if not (fluency_failure(p["chosen"][-1]["content"])
                                           and not fluency_failure(p["rejected"][-1]["content"]))]
    return FeedbackData(votes, pairs, {"liked_votes": len(data.votes) - len(votes),
                                       "pairs": len(data.pairs) - len(pairs)})


def check_enough(train: FeedbackData, cfg: DataConfig) -> None:
    c = train.counts
    if c["votes"] < cfg.min_votes:
        raise NotEnoughFeedback(
            f"Only {c['votes']} usable training votes; a round needs at least {cfg.min_votes}. "
            "Collect more ratings and try again.")
    if min(c["liked"], c["disliked"]) < cfg.min_per_label:
        raise NotEnoughFeedback(
            f"The training votes are {c['liked']} liked and {c['disliked']} disliked; a round "
            f"needs at least {cfg.min_per_label} of each (KTO learns from the contrast).")


def own_votes(data: FeedbackData, version: str, *, confidence: float) -> dict:
    """What users think of `version`'s own replies (`own_counts` of its votes)."""
    labels = [r["label"] for r in data.votes if r.get("model_version") == version]
    return own_counts(version, len(labels), labels.count(False), confidence=confidence)


def own_counts(version: str, votes: int, disliked: int, *, confidence: float) -> dict:
    """A version's votes, how many disliked, and the disliked share with its interval (None
    without votes): what `training.round.liked_enough` reads."""
    share = share_interval(disliked, votes, confidence=confidence) if votes else None
    return {"version": version, "votes": votes, "disliked": disliked,
            "disliked_share": share.to_dict() if share else None}


def kto_weights(n_pos: int, n_neg: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) putting the weighted ratio at the bottom of TRL's
    recommended range (1:1), whichever label is the majority."""
    assert n_pos > 0 and n_neg > 0
    if n_pos >= n_neg:
        return 1.0, n_pos / n_neg
    return n_neg / n_pos, 1.0


def interleave(rows: list[dict]) -> list[dict]:
    """Liked and disliked rows spread evenly, so every KTO batch holds both labels (TRL samples
    KTO batches in order; a batch of one label gives NaN KL estimates)."""
    pos = [r for r in rows if r["label"]]
    neg = [r for r in rows if not r["label"]]
    keyed = [((i + 0.5) / len(pos), 0, r) for i, r in enumerate(pos)] + \
            [((i + 0.5) / len(neg), 1, r) for i, r in enumerate(neg)]
    return [r for _, _, r in sorted(keyed, key=lambda t: (t[0], t[1]))]


def reward_pairs(data: FeedbackData, cfg: DataConfig, reason_margin: float = 0.0) -> list[dict]:
    """Pairs for the reward model: the preference pairs, topped up when they are few with
    liked-vs-disliked replies to different prompts, as whole conversations (TRL's implicit-prompt
    form), so the judge can be trained whenever both labels exist. With `reason_margin` > 0 each
    row has a `margin` (TRL's RewardTrainer: the chosen must outscore the rejected by it) of
    `reason_margin` x the pair's strength."""
    rows = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"],
             "margin": reason_margin * p.get("strength", 0.0)} for p in data.pairs]
    liked = [v for v in data.votes if v["label"]]
    disliked = [v for v in data.votes if not v["label"]]
    topped = liked and disliked and len(rows) < len(data.votes)  # a top-up takes both labels
    for i in range(max(len(liked), len(disliked)) if topped else 0):
        good, bad = liked[i % len(liked)], disliked[i % len(disliked)]
        rows.append({"chosen": good["prompt"] + good["completion"],
                     "rejected": bad["prompt"] + bad["completion"], "margin": 0.0})
    if reason_margin <= 0:  # the plain Bradley-Terry loss
        for row in rows:
            del row["margin"]
    return rows


def length_grouped(rows: list[dict], batch_size: int, seed: int, length) -> list[dict]:
    """`rows` reordered so that each run of `batch_size` holds rows of similar `length(row)`,
    the batches in random order: less padding, so shorter steps on the CPU. What transformers'
    `LengthGroupedSampler` does (sorting within shuffled mega-batches of 16 batches), done on
    the data because TRL's trainers drop any length column before sampling; the trainer then
    takes the rows in order (`train_sampling_strategy="sequential"`). A last, partial batch
    stays last so every other batch keeps its rows together."""
    rng = random.Random(seed)
    order = list(rows)
    rng.shuffle(order)
    mega = 16 * batch_size
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i:i + mega], key=length, reverse=True)
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    partial = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    rng.shuffle(batches)
    return [r for b in batches + partial for r in b]


def chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) for m in messages)
