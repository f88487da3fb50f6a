"""The reward model: the learned judge of what users like, trained with TRL's `RewardTrainer`.

A sequence-classification head (one score) on the base model's backbone, LoRA-tuned on
preference pairs (Bradley-Terry loss). The round checks it on held-out votes, samples synthetic
pairs with it, and the gate uses it to compare two models' replies.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import Dataset

from serving.hardware import autocast
from serving.registry import VersionDir
from training.config import RewardModelConfig, TuneConfig
from training.dataset import FeedbackData, chars, length_grouped
from training.evaluate import Kept
from training.tune import Deadline, common_args, lora_config


class RewardModel:
    """Scores conversations (the last message being the reply) with a sequence-classification
    model, in bfloat16 where the machine has it natively."""

    def __init__(self, model, tokenizer, max_length: int = 512) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @staticmethod
    def batches(conversations: list[list[dict]], batch_size: int = 8) -> list[list[int]]:
        """The batches `score` runs, as indices: sorted by length, so little is padding."""
        order = sorted(range(len(conversations)), key=lambda i: chars(conversations[i]))
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    @classmethod
    def padded_size(cls, conversations: list[list[dict]], batch_size: int = 8) -> int:
        """What scoring `conversations` costs, in padded characters: each batch is as long as
        its longest conversation (plus a little per message for the chat template)."""
        size = [chars(c) + 16 * len(c) for c in conversations]
        return sum(len(b) * max(size[i] for i in b)
                   for b in cls.batches(conversations, batch_size))

    @torch.inference_mode()
    def score(self, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
        """One score per conversation, in their order; batched by length (less padding)."""
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
        out = [0.0] * len(texts)
        for batch in self.batches(conversations, batch_size):
            enc = self.tokenizer([texts[j] for j in batch], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length,
                                 add_special_tokens=False)
            with autocast(self.model):
                scores = self.model(**enc).logits[:, 0].float().tolist()
            for j, s in zip(batch, scores):
                out[j] = s
        return out


def score_model(source: str, tokenizer):
    """The base checkpoint at `source` with a one-score head (new weights, float32): what the
    reward model trains, and what its saved adapter goes back onto. The head is the only
    weight the checkpoint may lack: transformers' load report, which names it as missing on
    every load, is kept out of the logs, and any other missing weight (a checkpoint that is
    not the base model's) is an error, not a randomly initialized judge."""
    import logging

    from transformers import AutoModelForSequenceClassification

    loader = logging.getLogger("transformers.modeling_utils")
    level = loader.level
    loader.setLevel(logging.ERROR)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=torch.float32, output_loading_info=True)
    finally:
        loader.setLevel(level)
    missing = sorted(k for k in info["missing_keys"] if k.split(".")[0] != "score")
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} of the model's weights "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): "
                         "not a checkpoint of the base model")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def train_reward_model(source: str, tokenizer, pairs: list[dict], cfg: RewardModelConfig,
                       out: VersionDir, deadline: float,
                       to_score: list[list[dict]] = ()) -> tuple[RewardModel, dict]:
    """Train on `pairs` (conversational `chosen`/`rejected`) from the checkpoint at `source`;
    saves the adapter into `out.reward` and returns the trained judge and a summary.

    `deadline` bounds training and the scoring of `to_score` that follows (the held-out check):
    before training, scoring a few of them times the model, and training stops early enough to
    score them all by the deadline. The estimate scales the probe's time by size (padded
    characters), not by count: a probe of 8 unsorted conversations pads to its longest, while
    the check runs length-sorted batches (by count, the reserve was 2.5-3.5x what scoring took
    in the loop benchmark, and the judge lost most of its steps to it)."""
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    tune_like = TuneConfig(learning_rate=cfg.learning_rate, epochs=cfg.epochs,
                           max_steps=cfg.max_steps, max_length=cfg.max_length,
                           lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r,
                           lora_layers=cfg.lora_layers)
    # The score head is new: its initial weights come from the global RNG, which the trainer
    # seeds only after the model exists. Unseeded, two rounds on the same votes trained judges
    # of held-out AUC 0.92 and 0.64 (13-14 steps from a different start).
    set_seed(tune_like.seed)
    model = score_model(source, tokenizer)
    reserve_s = 0.0
    if to_score:
        probe = list(to_score[:8])
        t = time.monotonic()
        RewardModel(model, tokenizer, cfg.max_length).score(probe)
        # 1.25x: attention grows faster than the size with longer conversations
        reserve_s = 1.25 * (time.monotonic() - t) * RewardModel.padded_size(
            to_score) / RewardModel.padded_size(probe)
    model.train()
    batch = max(1, min(cfg.batch_size, len(pairs)))
    args = RewardConfig(**common_args(tune_like, out.trainer, batch))
    ordered = length_grouped(pairs, batch, tune_like.seed,
                             length=lambda p: max(chars(p["chosen"]), chars(p["rejected"])))
    stop = Deadline(deadline - reserve_s)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(ordered),
                            processing_class=tokenizer,
                            peft_config=lora_config(tune_like, model, task_type="SEQ_CLS"),
                            callbacks=[stop])
    result = trainer.train()
    trainer.model.save_pretrained(out.reward)
    judge = RewardModel(trainer.model.merge_and_unload(), tokenizer, cfg.max_length)
    return judge, {"pairs": len(pairs), "steps": trainer.state.global_step,
                   "pairs_with_margin": sum(p.get("margin", 0) > 0 for p in pairs),
                   "train_loss": result.training_loss, "stopped_by_deadline": stop.hit,
                   "step_s": stop.step_s,
                   "scoring_reserve_s": round(reserve_s, 1)}


def load_judge(source: str, tokenizer, adapter: Path, max_length: int) -> RewardModel:
    """A reward model saved by `train_reward_model` (its LoRA adapter and score head in
    `adapter`), back on the base checkpoint at `source`."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(score_model(source, tokenizer), adapter)
    return RewardModel(model.merge_and_unload(), tokenizer, max_length)


class KeptScores:
    """A judge whose scores are kept per conversation (`Kept`): what it scored once (the
    held-out votes of its check, when `training prepare` trained it) costs nothing again."""

    def __init__(self, judge: RewardModel, kept: Kept) -> None:
        self.judge, self.kept = judge, kept

    def score(self, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
        return self.kept.get([Kept.key(c) for c in conversations], conversations,
                             lambda todo: self.judge.score(todo, batch_size))


class PreparedJudge:
    """The reward model `python -m training prepare` trains between rounds, off the round's
    clock, on the training votes and pairs of the moment, so that the round spends the reward
    model's share of its time on the tuning instead. Kept in one folder:

        adapter/       the judge (`train_reward_model`'s adapter and score head)
        judge.json     how it was trained (`fingerprint`: base checkpoint, reward settings,
                       precision) and on what (a key per training vote and pair), its summary
        scores.json    its scores of the held-out conversations it was checked on

    A round uses it while it lacks at most `reward.prepared_max_missing` of the round's
    training rows (votes that came after it was trained) and was trained the same way; the
    split never moves a training conversation into the held-out ones, so the conversations
    the round checks it on (and its gate judges with it) are ones it never saw."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            self.record = json.loads((folder / "judge.json").read_text())
            assert isinstance(self.record, dict) and (folder / "adapter").is_dir()
        except (OSError, ValueError, AssertionError):
            self.record = None

    @staticmethod
    def fingerprint(source: str, cfg: RewardModelConfig) -> str:
        """What makes two judges trained on the same rows alike: everything but how many
        conversations its check scores."""
        settings = {k: v for k, v in asdict(cfg).items()
                    if k not in ("check_conversations", "prepare", "prepared_max_missing")}
        return Kept.key(str(source), settings, TuneConfig().bf16)

    @staticmethod
    def row_keys(train: FeedbackData) -> list[str]:
        """One key per training vote (its conversation and label) and pair."""
        return [Kept.key(v["prompt"], v["completion"], bool(v["label"])) for v in train.votes] \
            + [Kept.key(p["prompt"], p["chosen"], p["rejected"]) for p in train.pairs]

    def missing(self, train: FeedbackData) -> tuple[int, int]:
        """(training rows the judge never saw, training rows)."""
        keys = self.row_keys(train)
        seen = set(self.record["rows"]) if self.record else set()
        return sum(k not in seen for k in keys), len(keys)

    def unusable(self, source: str, cfg: RewardModelConfig, train: FeedbackData,
                 max_missing: float) -> str | None:
        """Why a round (or a prepare, with `max_missing` 0) cannot use this judge; None when
        it can."""
        if self.record is None:
            return "`training prepare` has not trained one"
        if self.record.get("fingerprint") != self.fingerprint(source, cfg):
            return "prepared with other settings or another base model"
        lacking, rows = self.missing(train)
        if lacking > max_missing * rows:
            return (f"it never saw {lacking} of the {rows} training votes and pairs (more than "
                    f"reward.prepared_max_missing, {max_missing:.0%})")
        return None

    def summary(self, train: FeedbackData) -> dict:
        """Its training summary, as a round's report holds a judge's, and how it was made."""
        lacking, rows = self.missing(train)
        return {**self.record["summary"], "prepared": {
            "finished_at": self.record["finished_at"], "seconds": self.record["seconds"],
            "rows_missing": lacking, "rows": rows}}

    def load(self, source: str, tokenizer, max_length: int) -> KeptScores:
        return KeptScores(load_judge(source, tokenizer, self.folder / "adapter", max_length),
                          Kept(self.folder, "scores"))

    def copy_to(self, out: VersionDir) -> None:
        """Into a version's folder, where the round's judge is kept (`reward/`)."""
        shutil.copytree(self.folder / "adapter", out.reward)

    @classmethod
    def write(cls, folder: Path, made: Path, record: dict) -> "PreparedJudge":
        """`made` (a folder holding `adapter/` and `scores.json`) with `record` becomes the
        prepared judge, replacing the one before."""
        (made / "judge.json").write_text(json.dumps(record) + "\n")
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        made.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        return cls(folder)
