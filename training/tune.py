"""Preference tuning of the serving model with TRL: KTO on votes, DPO on pairs, or online DPO on
the model's own samples judged by the round's reward model; LoRA by default.

With LoRA the reference model is the same network with the adapter switched off, so no second
copy of the model is held; the artifact is a few MB. Full fine-tuning (`full_finetune`) keeps a
frozen reference copy, as TRL does by default.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from serving.registry import VersionDir
from training.config import SyntheticConfig, TuneConfig
from training.dataset import FeedbackData, chars, interleave, kto_weights, length_grouped
from training.evaluate import Kept


class Deadline(TrainerCallback):
    """Stops training cleanly once the next step would end past a wall-clock deadline: each
    step-end compares the time left with the slowest of the last few steps (so a 20-second
    CPU step does not overrun the stage that follows by 20 seconds).

    `schedule="clock"` also makes the learning rate reach zero by the deadline when the clock,
    not the planned steps, ends the training: each step's rate is the lower of the trainer's
    own schedule (linear over the planned steps) and the share of the time from the first
    step to the deadline still left. Without it a round whose clock allows 30 of 88 planned
    steps stops with its rate still at two thirds of the peak. "steps": the trainer's schedule
    alone."""

    def __init__(self, deadline: float, schedule: str = "steps") -> None:
        assert schedule in ("steps", "clock"), f"unknown schedule {schedule!r}"
        self.deadline = deadline
        self.schedule = schedule
        self.hit = False
        self._last = self._began = time.monotonic()
        self.durations: list[float] = []  # every step's seconds

    @property
    def step_s(self) -> float | None:
        """The median step's seconds (None before the first step)."""
        ranked = sorted(self.durations)
        return round(ranked[len(ranked) // 2], 2) if ranked else None

    def time_left_share(self) -> float:
        """The share of the time from the first step to the deadline still left, in [0, 1]."""
        span = self.deadline - self._began
        return 0.0 if span <= 0 else min(1.0, max(0.0, (self.deadline - time.monotonic()) / span))

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self._last = self._began = time.monotonic()
        if self.schedule == "clock":
            if not hasattr(lr_scheduler, "lr_lambdas"):  # transformers' schedules are LambdaLR
                raise TypeError("the clock schedule needs a LambdaLR learning-rate schedule, "
                                f"not {type(lr_scheduler).__name__}")
            lr_scheduler.lr_lambdas = [
                lambda step, planned=planned: min(planned(step), self.time_left_share())
                for planned in lr_scheduler.lr_lambdas]
        return control

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        self.durations.append(now - self._last)
        self._last = now
        if now + max(self.durations[-4:]) >= self.deadline:
            self.hit = control.should_training_stop = True
        return control


def choose_method(cfg: TuneConfig, train: FeedbackData, judge=None) -> str:
    if cfg.method in ("kto", "dpo") or (cfg.method == "online" and judge is not None):
        return cfg.method
    assert cfg.method in ("auto", "online"), f"unknown method {cfg.method!r}"
    # Pairs (a liked and a disliked reply to one prompt, picks, edits) contrast two replies
    # directly; on 2 CPU cores DPO on them moved a simulated user's approval far more per minute
    # than KTO on the same votes (README, benchmarks). Thumbs without pairs go to KTO.
    return "dpo" if len(train.pairs) >= cfg.min_dpo_pairs else "kto"


# a transformer block's index in a module's name, under the usual names of the block list
# (the one found is passed to PEFT as `layers_pattern`)
_BLOCK = re.compile(r"\.(layers|h|block|blocks|layer)\.(\d+)\.")


def lora_config(cfg: TuneConfig, model, task_type: str = "CAUSAL_LM"):
    """LoRA on every linear layer of `model`'s transformer blocks, or (`cfg.lora_layers` under 1)
    on those of its top blocks only: the blocks below carry nothing to train, so the backward
    pass stops above them."""
    from peft import LoraConfig

    common = dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                  task_type=task_type)
    if cfg.lora_layers >= 1.0:
        return LoraConfig(target_modules="all-linear", **common)
    linear = [(m.group(1), int(m.group(2)), name.rsplit(".", 1)[-1])
              for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and (m := _BLOCK.search(name))]
    if not linear:
        raise ValueError("lora_layers below 1 needs a model whose blocks PEFT can count "
                         f"(named like '.layers.0.'); {type(model).__name__} has none")
    blocks = 1 + max(i for _, i, _ in linear)
    first = blocks - max(1, round(cfg.lora_layers * blocks))
    return LoraConfig(target_modules=sorted({leaf for _, _, leaf in linear}),
                      layers_to_transform=list(range(first, blocks)),
                      layers_pattern=linear[0][0], **common)


def scale_change(trained, scale: float, start: dict | None = None) -> None:
    """Scale what training changed by `scale`, in place: the LoRA adapters' B matrices (the
    change is B A, so the adapter saved and the weights merged both carry it), or with `start`
    (every weight before a full fine-tune) each weight to `start + scale x (weight - start)`."""
    if scale == 1:
        return
    with torch.no_grad():  # named_parameters: a tied weight once
        for name, weight in trained.named_parameters():
            if start is not None:
                weight.copy_(start[name] + scale * (weight - start[name]))
            elif "lora_B" in name:
                weight.mul_(scale)


def common_args(cfg: TuneConfig, out: Path, batch_size: int) -> dict:
    return dict(output_dir=str(out), per_device_train_batch_size=batch_size,
                num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
                learning_rate=cfg.learning_rate, bf16=cfg.bf16, seed=cfg.seed,
                gradient_checkpointing=cfg.gradient_checkpointing, logging_steps=1,
                save_strategy="no", report_to=[], max_length=cfg.max_length,
                remove_unused_columns=True, dataloader_num_workers=0,
                # the rows come in the order made here: length-grouped batches (DPO, reward
                # model) or both labels in every batch (KTO)
                train_sampling_strategy="sequential",
                disable_tqdm=False, use_cpu=not torch.cuda.is_available())


def tune(model, tokenizer, train: FeedbackData, cfg: TuneConfig, out: VersionDir,
         deadline: float, judge=None, sampling: SyntheticConfig | None = None,
         reference: ReferenceCache | None = None, reach: int | None = None,
         replay: dict | None = None) -> dict:
    """Train `model` (the current version) on `train`; saves into the version folder `out`
    (the merged weights, and the LoRA adapter) and returns a summary. `judge` (a trusted
    `RewardModel`) and `sampling` (reply length and temperature) serve the online method; without
    a judge it falls back to auto. `reference`: `model`'s log-probabilities of the pairs, kept
    by `training prepare` (DPO then runs no reference forward in its steps); `reach`: how many
    pairs its steps can take before `deadline`, as estimated (`training.round.kept_reach`;
    None: all of them), of which those not kept are computed first (`use_kept_reference`);
    `replay`: the starting version's replies to the replay requests (`training.replay`'s
    `replay_replies`), learnt beside DPO's pairs at `cfg.replay_weight`."""
    from transformers import set_seed

    method = choose_method(cfg, train, judge)
    peft = None if cfg.full_finetune else lora_config(cfg, model)
    set_seed(cfg.seed)  # the adapter's initial weights: TRL makes them before the trainer seeds
    stop = Deadline(deadline, cfg.schedule)
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        rows = interleave(train.votes)
        pos = sum(r["label"] for r in rows)
        dw, uw = kto_weights(pos, len(rows) - pos)
        batch = max(2, min(cfg.batch_size, len(rows)))  # KTO needs a batch above 1
        args = KTOConfig(**common_args(cfg, out.trainer, batch), beta=cfg.beta,
                         desirable_weight=dw, undesirable_weight=uw)
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"],
                                   "label": r["label"]} for r in rows])
        trainer = KTOTrainer(model=model, args=args, train_dataset=data,
                             processing_class=tokenizer, peft_config=peft, callbacks=[stop])
        extra = {"desirable_weight": dw, "undesirable_weight": uw, "rows": len(rows)}
    elif method == "online":
        trainer, extra = online_trainer(model, tokenizer, train, cfg, out, judge,
                                        sampling or SyntheticConfig(), peft, stop)
    else:
        trainer, extra = dpo_trainer(model, tokenizer, train.pairs, cfg, out.trainer, peft,
                                     callbacks=[stop], replay=replay)
        extra["reference"] = use_kept_reference(trainer, train.pairs, reference, reach=reach)
    start = None if peft is not None or cfg.change_scale == 1 else {
        k: w.detach().clone() for k, w in model.named_parameters()}
    result = trainer.train()
    trained = trainer.model
    scale_change(trained, cfg.change_scale, start)
    extra["change_scale"] = cfg.change_scale
    if peft is not None:
        trained.save_pretrained(out.adapter)
        trained = trained.merge_and_unload()  # what every backend loads: no parent chain
    trained.save_pretrained(out.model)
    tokenizer.save_pretrained(out.model)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rates = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    if method == "online":  # per step: the judge's margin between the two samples, and how
        for key, name in (("objective/scores_margin", "mean_judged_margin"),  # many finished
                          ("val/contain_eos_token", "finished_replies")):
            seen = [h[key] for h in trainer.state.log_history if key in h]
            extra[name] = sum(seen) / len(seen) if seen else None
    if "replay" in extra:
        nll = [h["replay_nll"] for h in trainer.state.log_history if "replay_nll" in h]
        extra["replay"].update(rows_taken=trainer.replay.taken, first_nll=nll[0] if nll
                               else None, last_nll=nll[-1] if nll else None)
    elif cfg.replay_weight > 0:
        extra["replay"] = {"why": f"off: replay joins DPO's steps, and this round ran {method}"
                           if method != "dpo" else "off: no replay replies were given"}
    if method != cfg.method and cfg.method == "online":
        extra["online_skipped"] = "no trusted reward model to judge the samples"
    return {"method": method, "kind": "lora" if peft is not None else "full",
            "learning_rate": cfg.learning_rate,
            "steps": trainer.state.global_step, "train_loss": result.training_loss,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses
            else None, "schedule": cfg.schedule, "learning_rate_at_stop": rates[-1] if rates
            else None, "stopped_by_deadline": stop.hit, "step_s": stop.step_s, **extra}, trainer


def dpo_trainer(model, tokenizer, pairs: list[dict], cfg: TuneConfig, out: Path, peft,
                callbacks=(), replay: dict | None = None):
    """TRL's DPO trainer on `pairs` (length-grouped batches of `cfg.batch_size`); each row also
    carries its pair's position in `pairs` (`index`: TRL drops rows whose prompt alone fills
    `max_length`, and its own columns are tokenized, so the row is found by it). With `replay`
    (its rows) and `cfg.replay_weight` above 0, each step also learns a batch of them
    (`training.replay.ReplayLoss`). Returns it and the summary's fields."""
    from trl import DPOConfig, DPOTrainer

    from training.replay import ReplayBatches, ReplayLoss

    batch = max(1, min(cfg.batch_size, len(pairs)))
    # sft_weight > 0 adds TRL's "sft" loss (NLL of the chosen reply) beside the sigmoid one
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.sft_weight]} \
        if cfg.sft_weight > 0 else {}
    args = DPOConfig(**common_args(cfg, out, batch), beta=cfg.beta, **losses)
    data = Dataset.from_list([{"prompt": pairs[i]["prompt"], "chosen": pairs[i]["chosen"],
                               "rejected": pairs[i]["rejected"], "index": i}
                              for i in dpo_order(pairs, cfg)])
    replaying = bool(replay and replay["rows"]) and cfg.replay_weight > 0
    trainer_class = type("ReplayDPOTrainer", (ReplayLoss, DPOTrainer), {}) if replaying \
        else DPOTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=data,
                            processing_class=tokenizer, peft_config=peft,
                            callbacks=list(callbacks))
    extra = {"rows": len(pairs), "loss_type": list(args.loss_type),
             "loss_weights": args.loss_weights}
    if replaying:
        trainer.replay = ReplayBatches(tokenizer, replay["rows"], batch, cfg.max_length,
                                       cfg.replay_weight, replay["max_new_tokens"], cfg.seed)
        extra["replay"] = {"weight": cfg.replay_weight, "rows": len(trainer.replay.rows),
                           "batch_size": trainer.replay.batch_size}
    return trainer, extra


def dpo_order(pairs: list[dict], cfg: TuneConfig) -> list[int]:
    """The positions of `pairs` in the order DPO's steps take them (length-grouped batches of
    `cfg.batch_size`, shuffled by `cfg.seed`): what its first steps reach comes first."""
    batch = max(1, min(cfg.batch_size, len(pairs)))
    return length_grouped(list(range(len(pairs))), batch, cfg.seed, length=lambda i: chars(
        pairs[i]["prompt"]) + max(chars(pairs[i]["chosen"]), chars(pairs[i]["rejected"])))


class ReferenceCache(Kept):
    """DPO's reference log-probabilities of each pair (its chosen and its rejected reply,
    summed over the reply's tokens, as TRL computes them: the start version with no adapter),
    kept per version, precision and length cap
    (`<version>.<bf16|fp32>.<max_length>.reference.json`). `training prepare` writes them off
    the round's clock; the round's DPO steps then run the policy alone. On 2 cores (the EPYC,
    bfloat16) a step of 4 pairs of about 300 tokens took 16.2 s instead of 20.5 (1.27x), and
    keeping a pair's cost 1.3 s (`python -m bench.reference`)."""

    def __init__(self, folder: Path | None, version: str, cfg: TuneConfig) -> None:
        super().__init__(folder, f"{version}.{'bf16' if cfg.bf16 else 'fp32'}."
                                 f"{cfg.max_length}.reference")
        self.version = version

    def pair_key(self, pair: dict) -> str:
        return self.key(pair["prompt"], pair["chosen"], pair["rejected"])

    def unkept(self, pairs: list[dict]) -> list[int]:
        return [i for i, p in enumerate(pairs) if self.pair_key(p) not in self.values]


def reference_forward(trainer, pairs: list[dict], indices: list[int],
                      reference: ReferenceCache) -> None:
    """TRL's own reference forward (`DPOTrainer.compute_ref_log_probs`, what a step runs when
    nothing is kept) on the rows of `trainer` (made by `dpo_trainer` on `pairs`) for the pairs
    at `indices`, in batches of its size;
    kept in `reference` (None for a pair TRL dropped: its prompt alone fills max_length)."""
    wanted = set(indices)
    rows = [r for r in trainer.train_dataset if r["index"] in wanted]
    size = trainer.args.per_device_train_batch_size
    for i in range(0, len(rows), size):
        batch = rows[i:i + size]
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model,
                                                         trainer.data_collator(batch))
        for row, c, r in zip(batch, chosen.tolist(), rejected.tolist()):
            reference.values[reference.pair_key(pairs[row["index"]])] = [c, r]
    for i in wanted - {r["index"] for r in rows}:
        reference.values[reference.pair_key(pairs[i])] = None


FILL_SHARE = 0.25  # most pairs a round computes its reference for before the steps


def fill_before_steps(reference: ReferenceCache | None, pairs: list[dict], order: list[int],
                      reach: int | None = None,
                      fill_share: float = FILL_SHARE) -> list[int] | None:
    """The pairs whose reference a round computes before DPO's steps so that the steps read
    theirs kept (`use_kept_reference`): those not kept among the first `reach` of `order` (the
    tuning's order; all of it when `reach` is None: what the clock lets the steps take, as
    estimated). None when they are more than `fill_share` of those: every step then computes
    its own (each pair computed first costs a forward that saves more than its time only in
    the steps that reach it)."""
    if reference is None:
        return None
    span = order if reach is None else order[:max(1, reach)]
    missing = [i for i in span if reference.pair_key(pairs[i]) not in reference.values]
    return missing if len(missing) <= fill_share * len(span) else None


def steps_read_kept(reference: ReferenceCache | None, pairs: list[dict], cfg: TuneConfig,
                    reach: int | None = None, fill_share: float = FILL_SHARE) -> bool:
    """Whether DPO's steps on `pairs` will read their reference from `reference` (what
    `use_kept_reference` decides; `reach` as in `fill_before_steps`)."""
    return fill_before_steps(reference, pairs, dpo_order(pairs, cfg), reach,
                             fill_share) is not None


def use_kept_reference(trainer, pairs: list[dict], reference: ReferenceCache | None,
                       fill_share: float = FILL_SHARE, reach: int | None = None) -> dict:
    """Gives the trainer's rows their kept reference log-probabilities, so that its steps skip
    the reference forward (TRL reads them from each batch, as after its own
    `precompute_ref_log_probs`). Pairs not kept among the first `reach` rows (votes that came
    after `training prepare`) are computed here first, when `fill_before_steps` says so; else
    every step computes its own reference, as before. When only a prefix of the rows has a
    reference (`training prepare` keeps what the next round can reach), the steps take that
    prefix, over again if the clock allows more, on the schedule planned for all the rows.
    Returns what was done, for the report."""
    order = list(trainer.train_dataset["index"])
    fill = fill_before_steps(reference, pairs, order, reach, fill_share)
    if fill is None:
        kept = 0 if reference is None else len(pairs) - len(reference.unkept(pairs))
        return {"kept": kept, "computed_here": 0, "pairs": len(pairs),
                "source": "every step" + ("" if reference is None else (
                    f" ({kept} of {len(pairs)} kept; `python -m training prepare` before the "
                    "round keeps them)"))}
    began = time.monotonic()
    if fill:
        reference_forward(trainer, pairs, fill, reference)
        reference.save()
    # the longest prefix of rows with a reference (a row TRL kept has a value; its dropped
    # ones were never rows)
    rows = next((n for n, i in enumerate(order)
                 if reference.pair_key(pairs[i]) not in reference.values), len(order))
    if rows < len(order):
        size = trainer.args.per_device_train_batch_size
        if trainer.args.max_steps <= 0:  # the schedule of all the rows, as without a cut
            trainer.args.max_steps = math.ceil(trainer.args.num_train_epochs
                                               * math.ceil(len(order) / size))
        trainer.train_dataset = trainer.train_dataset.select(range(rows))
    values = [reference.values[reference.pair_key(pairs[i])] for i in order[:rows]]
    trainer.train_dataset = trainer.train_dataset.add_column(
        "ref_chosen_logps", [v[0] for v in values]).add_column(
        "ref_rejected_logps", [v[1] for v in values])
    trainer.precompute_ref_logps = True
    return {"kept": len(pairs) - len(reference.unkept(pairs)) - len(fill),
            "computed_here": len(fill), "pairs": len(pairs), "rows": rows,
            "reach": reach, "seconds_here": round(time.monotonic() - began, 1),
            "source": f"kept for {reference.version}" + (
                f" (the first {rows} of {len(order)} rows in the tuning's order)"
                if rows < len(order) else "")}


def online_trainer(model, tokenizer, train: FeedbackData, cfg: TuneConfig, out: VersionDir,
                   judge, sampling: SyntheticConfig, peft, stop: Deadline):
    """TRL's online DPO: at every step the model (as it is now) samples two replies to each of
    a batch of training prompts, the reward model picks the better, and one DPO step follows.
    The prompts and the sampling are the synthetic pairs' (`synthetic.max_prompts` distinct
    training prompts, its temperature and length cap), so the two ways of making on-policy
    pairs differ only in when the samples are drawn: all up front by the serving engine, or
    step by step by the model in training (transformers' `generate`, slower on a CPU)."""
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from training.synthetic import training_prompts

    prompts = training_prompts(train, sampling.max_prompts)

    def reward_model(prompts, completions, **_):  # TRL calls it with both halves of a batch
        return judge.score([p + c for p, c in zip(prompts, completions)])

    batch = max(1, min(cfg.batch_size, len(prompts)))
    args = OnlineDPOConfig(**{**common_args(cfg, out.trainer, batch),
                              "remove_unused_columns": False},  # it needs the prompts
                           beta=[cfg.beta], max_new_tokens=sampling.max_new_tokens,
                           temperature=sampling.temperature)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=reward_model, args=args,
                               train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                               processing_class=tokenizer, peft_config=peft, callbacks=[stop])
    return trainer, {"rows": len(prompts), "max_new_tokens": sampling.max_new_tokens,
                     "temperature": sampling.temperature}
