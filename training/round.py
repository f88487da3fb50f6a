"""One training round: feedback -> reward model + preference tuning -> gate -> promote or not.

Order matters for crash safety. The candidate is built in a hidden staging folder, registered by
one rename, judged, and only then `CURRENT` moves (write, fsync, rename). A round killed at any
point therefore leaves the old version current, or the new one; never half of either, and the
next round starts clean (the lock dies with its holder, stale staging folders are removed).
Every round, even one that stops early, writes a report (JSON and Markdown) under
`<data>/reports/`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from feedback.config import make_folder
from serving.backends import backend_setting, open_engine
from serving.config import ServingConfig, data_dir
from serving.gguf_export import NotConvertible
from serving.hardware import dtype_reason, threads
from serving.model import resolve_base
from serving.registry import Registry, VersionDir
from training.config import RoundConfig, SyntheticConfig, TuneConfig
from training.dataset import (FeedbackData, NotEnoughFeedback, check_enough, heldout_share,
                              load_feedback, own_votes, reward_pairs, split)
from training.evaluate import Kept, gate, in_time, prepare, share_end
from training.lock import round_lock
from training.memory import peak_mb, reset_peak
from training.replay import replay_replies
from training.reward import KeptScores, PreparedJudge, train_reward_model
from training.synthetic import (PreparedPairs, check_sample, judge_quality,
                                judged_conversations, synthetic_pairs)
from training.tune import (ReferenceCache, choose_method, dpo_trainer, lora_config,
                           reference_forward, steps_read_kept, tune)

# What follows the gate's last reply (its statistics, closing the engines, the metrics, the
# promotion and the report) takes a second or two; the gate works to the round's end less this
# (at most 1% of the budget), so that a gate whose last chunk runs long still ends in time
# (session 29: a round ran 0.3 s past its 10 minutes with the gate working to the very end).
FINISH_RESERVE_S = 5.0

# Exit codes of `python -m training run` (also in its --help).
PROMOTED, ERROR, USAGE, NOT_ENOUGH_FEEDBACK, BUSY, REJECTED, LIKED_ENOUGH = 0, 1, 2, 3, 4, 5, 6


@dataclass
class RoundResult:
    round_id: str
    decision: str  # promoted, rejected, skipped
    exit_code: int
    message: str
    report: dict = field(default_factory=dict)
    report_path: Path | None = None


def new_round_id() -> str:
    return datetime.now(timezone.utc).strftime("r%Y%m%dT%H%M%S")


def reports_dir() -> Path:
    path = data_dir() / "reports"
    return make_folder(path)


def run_round(cfg: RoundConfig | None = None, *, log=print,
              started: float | None = None) -> RoundResult:
    """Run one round under the cross-process lock (raises `RoundBusy` if one is running).
    `started` (time.monotonic()) is when the budget began, if before this call: the command
    line's process start, so its imports count too."""
    cfg = cfg or RoundConfig()
    with round_lock():
        return _run(cfg, log, time.monotonic() if started is None else started)


def prepared_path() -> Path:
    return data_dir() / "training" / "prepared.json"


def read_prepared() -> dict | None:
    """What `prepare_gate` last did (None if it never ran or its record is unreadable)."""
    try:
        record = json.loads(prepared_path().read_text())
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


# `training prepare` stops writing the reference this many times a round's reward-model share
# before its end when the reward model must be trained again (the judge's check needs that)
JUDGE_RESERVE = 1.1


def reference_dir(registry: Registry) -> Path:
    return registry.data / "training" / "reference_cache"


def prepare_reference(registry: Registry, start_name: str, train: FeedbackData,
                      cfg: TuneConfig, deadline: float, log=print,
                      reach: dict | None = None) -> dict:
    """DPO's reference log-probabilities of the training pairs the next round will tune on
    (`training.tune.ReferenceCache`), under the version it starts from, within `deadline`
    (time.monotonic()), in the tuning's own order (what its first steps reach, first), for the
    first `reach["pairs"]` of them (`kept_reach`: what the next round's steps can take; all
    when None or not given). Nothing when the round would not run DPO (thumbs alone: KTO;
    online DPO samples its own pairs)."""
    t = time.monotonic()
    reference = ReferenceCache(reference_dir(registry), start_name, cfg)
    pairs = train.pairs
    limit = (reach or {}).get("pairs")
    record = {"version": start_name, "pairs": len(pairs), "written": 0}
    if limit is not None and limit < len(pairs):
        record["reach"] = reach
    if not runs_dpo(cfg, train):
        return {**record, "items": 0, "seconds": 0.0, "why": "the round runs no DPO"}
    unkept, rows = set(reference.unkept(pairs)), []
    if unkept:
        # a copy of its own: the trainer wraps it (LoRA, TRL's fused head)
        loaded = registry.load(start_name, ServingConfig(dtype="float32"))
        with tempfile.TemporaryDirectory() as out:
            trainer, _ = dpo_trainer(loaded.model, loaded.tokenizer, pairs, cfg, Path(out),
                                     None if cfg.full_finetune else lora_config(cfg, loaded.model))
            order = trainer.train_dataset["index"]
            rows = [i for i in order[:limit] if i in unkept]
            # the pairs TRL drops (their prompt alone fills max_length) are kept as None
            reference_forward(trainer, pairs, sorted(unkept - set(order)), reference)
            size = trainer.args.per_device_train_batch_size
            for chunk in in_time(rows, deadline, chunk=4 * size, at_least=0):
                reference_forward(trainer, pairs, chunk, reference)
                reference.save()
            reference.save()
        del loaded, trainer
    left = set(reference.unkept(pairs))
    # missing: of the pairs wanted (those reached), how many the clock left without one
    record.update(written=len(unkept) - len(left), items=len(pairs) - len(left),
                  missing=len(left.intersection(rows)), seconds=round(time.monotonic() - t, 1))
    log(f"prepare (reference): {record['written']} pairs' reference log-probabilities of "
        f"{start_name} written, {record['items']} of {len(pairs)} ready"
        + (f" (the next round's steps reach about {limit}: {reach['source']})"
           if "reach" in record else "") + f", in {record['seconds']:.0f}s")
    return record


def gate_cache_dir(registry: Registry) -> Path:
    return registry.data / "training" / "gate_cache"


def replay_rows(registry: Registry, version: str, cfg: RoundConfig,
                engine=None) -> tuple[dict, dict]:
    """`version`'s replies to the replay requests (`training.replay`), kept beside the gate's
    replies: through `engine` when given (it serves `version`), else through one opened here
    with every slot busy (a batch job), unless all are kept for the kind of engine it would
    open first (llama.cpp with the backend setting `auto`)."""
    args = (gate_cache_dir(registry), version)
    settings = (cfg.gate.repetition_penalty, cfg.synthetic.max_new_tokens)
    if engine is not None:
        return replay_replies(*args, engine, *settings)
    setting = backend_setting()
    kept = replay_replies(*args, None, *settings,
                          kind="llama.cpp" if setting == "auto" else setting)
    if kept is not None:
        return kept
    engine = open_engine(registry, version, ServingConfig(slots=16))
    try:
        return replay_replies(*args, engine, *settings)
    finally:
        engine.close()


def runs_dpo(cfg: TuneConfig, train: FeedbackData) -> bool:
    """Whether the next round with `cfg` on `train` tunes with DPO on its pairs, as `training
    prepare` sees it (the reference log-probabilities and the replay replies serve only those
    steps; an online round samples its own pairs)."""
    return cfg.method in ("auto", "dpo") and choose_method(cfg, train) == "dpo"


def judge_dir(registry: Registry) -> Path:
    return registry.data / "training" / "judge"


def prepare_judge(registry: Registry, base_source: str, tokenizer, train: FeedbackData,
                  heldout: FeedbackData, cfg: RoundConfig, deadline: float, log=print) -> dict:
    """The next round's reward model (`training.reward.PreparedJudge`), trained now on the
    training votes and pairs of the moment for as long as its epochs ask and `deadline`
    (time.monotonic()) allows, and checked on the held-out votes as a round checks its own;
    nothing when one was trained on these very rows, or when less time is left than a round
    would give it (the round then trains its own)."""
    t = time.monotonic()
    kept = PreparedJudge(judge_dir(registry))

    def none(why: str) -> dict:
        log(f"prepare (reward model): none, {why}")
        return {"why": why, "seconds": 0.0}

    if not cfg.reward.prepare:
        return {"why": "off (reward.prepare false)", "seconds": 0.0}
    if judge_current(registry, base_source, cfg, train):
        return {**kept.summary(train), "written": False, "seconds": 0.0}
    own_share_s = judge_share_s(cfg)
    if (left := deadline - t) < own_share_s:
        return none(f"{max(0.0, left):.0f} s left, less than a round gives its reward model "
                    f"({own_share_s:.0f} s): the round trains its own")
    pairs = reward_pairs(train, cfg.data, cfg.reward.reason_margin)
    if not pairs:
        return none("no pairs to train on (no preference pairs, and votes of one label only)")
    checked = check_sample(heldout, cfg.reward.check_conversations, cfg.gate.seed)
    make_folder(judge_dir(registry).parent)
    made = Path(tempfile.mkdtemp(prefix="judge.", dir=judge_dir(registry).parent))
    try:
        judge, summary = train_reward_model(
            base_source, tokenizer, pairs, cfg.reward, VersionDir(made), deadline,
            to_score=judged_conversations(checked))
        shutil.rmtree(made / "trainer", ignore_errors=True)
        scores = Kept(made, "scores")
        quality, _ = judge_quality(KeptScores(judge, scores), checked,
                                   confidence=cfg.gate.confidence,
                                   samples=cfg.gate.bootstrap_samples, seed=cfg.gate.seed)
        scores.save()
        (made / "reward").rename(made / "adapter")
        seconds = round(time.monotonic() - t, 1)
        kept = PreparedJudge.write(judge_dir(registry), made, {
            "fingerprint": PreparedJudge.fingerprint(base_source, cfg.reward),
            "rows": PreparedJudge.row_keys(train), "summary": summary, "check": quality,
            "finished_at": datetime.now(timezone.utc).isoformat(), "seconds": seconds})
    finally:
        shutil.rmtree(made, ignore_errors=True)
    record = {**kept.summary(train), "written": True, "seconds": seconds}
    auc = quality.get("auc")
    log(f"prepare (reward model): {summary['steps']} steps on {len(pairs)} pairs in "
        f"{seconds:.0f}s" + (f"; held-out AUC {auc['estimate']:.2f} [{auc['low']:.2f}, "
                              f"{auc['high']:.2f}]" if auc else ""))
    return record


def judge_current(registry: Registry, base_source: str, cfg: RoundConfig,
                  train: FeedbackData) -> bool:
    """Whether the prepared reward model was trained on exactly these training rows, with this
    base and these settings (then `prepare` need not train it again)."""
    return PreparedJudge(judge_dir(registry)).unusable(
        base_source, cfg.reward, train, max_missing=0.0) is None


def synthetic_path(registry: Registry) -> Path:
    return registry.data / "training" / "synthetic.json"


def prepare_synthetic(registry: Registry, name: str, base_source: str, tokenizer,
                      train: FeedbackData, cfg: RoundConfig, deadline: float,
                      log=print) -> tuple[list[dict], dict]:
    """The next round's synthetic pairs (`training.synthetic.PreparedPairs`): the serving
    version `name` samples the training prompts, the prepared reward model scores the replies,
    best against worst past the margin, as the round's own stage does, but off its clock and
    with sampling bounded by `deadline` (time.monotonic()) alone. Nothing when the round would
    make none (off, online tuning, no prepared judge or one at chance), or when pairs from
    this version and this judge are kept. Returns (the pairs, what was done)."""
    t = time.monotonic()
    kept_judge = PreparedJudge(judge_dir(registry))
    path = synthetic_path(registry)

    def none(why: str) -> tuple[list[dict], dict]:
        log(f"prepare (synthetic pairs): none, {why}")
        return [], {"pairs": 0, "why": why, "seconds": 0.0}

    if cfg.synthetic.samples_per_prompt == 0:
        return none("off (synthetic.samples_per_prompt = 0)")
    if cfg.tune.method == "online":
        return none("online tuning samples its own pairs")
    if (why := kept_judge.unusable(base_source, cfg.reward, train, 0.0)) is not None:
        return none(f"no reward model prepared for these votes ({why}): the round makes its "
                    "own")
    if not kept_judge.record.get("check", {}).get("trusted"):
        return none("the prepared reward model's held-out ranking is not above chance")
    made_at = kept_judge.record["finished_at"]
    fluent = cfg.data.drop_disfluent
    kept = PreparedPairs(path)
    if kept.unusable(name, made_at, cfg.synthetic, fluent) is None:
        return kept.pairs, {**kept.summary(), "written": False, "seconds": 0.0}
    if deadline <= t:
        _, record = none("no time left")
        return [], {**record, "stopped_by_deadline": True}
    judge = kept_judge.load(base_source, tokenizer, cfg.reward.max_length)
    engine = open_engine(registry, name, ServingConfig(slots=16))  # a batch job: every slot
    try:  # sampling to the deadline less a fifth of the time left, for the judging after it
        pairs, summary = synthetic_pairs(engine, judge, train, cfg.synthetic,
                                         share_end(t, deadline, 0.8), log=log,
                                         fluent_chosen=fluent)
    finally:
        engine.close()
    seconds = time.monotonic() - t
    PreparedPairs.write(path, version=name, judge_made=made_at, cfg=cfg.synthetic,
                        fluent_chosen=fluent, pairs=pairs, summary=summary, seconds=seconds)
    log(f"prepare (synthetic pairs): {len(pairs)} from {summary['prompts_finished']} of "
        f"{summary['prompts']} prompts in {seconds:.0f}s")
    return pairs, {**summary, "written": True, "seconds": round(seconds, 1)}


def training_share_s(cfg: RoundConfig) -> float:
    """The seconds of a round's clock before its gate: its reward model's and tuning's."""
    return (1 - cfg.gate_share) * cfg.max_minutes * 60


def judge_share_s(cfg: RoundConfig) -> float:
    """The seconds a round gives its own reward model: the least `training prepare` trains one
    in (less, and the round's own would be no worse)."""
    return cfg.reward_share * training_share_s(cfg)


def prepared_line(p: dict) -> str:
    """What `prepare` made ready, in words (the command line, `status`, the round's report)."""
    ref = p.get("reference")
    return (f"{p['c_replies']['items']} of {p['questions']} questions, "
            f"{p['b_replies']['items']} of {p['prompts']} held-out prompts, "
            f"{p['a_logps']['items']} of {p['votes']} held-out votes"
            + (f", reference log-probabilities of {ref['items']} of {ref['pairs']} training "
               "pairs" if ref and not ref.get("why") else "")
            + (f", a reward model ({judge['steps']} steps on {judge['pairs']} pairs)"
               if (judge := p.get("judge")) and not judge.get("why") else "")
            + (f", {syn['pairs']} synthetic pairs from {syn['prompts_finished']} of "
               f"{syn['prompts']} prompts" if (syn := p.get("synthetic")) and not syn.get("why")
               else ""))


def prepare_gate(cfg: RoundConfig | None = None, *, log=print,
                 started: float | None = None) -> dict:
    """`python -m training prepare`: the serving version's half of the next gate (its replies
    to (c)'s questions and (b)'s held-out prompts, its and the base model's log-probabilities
    of (a)'s held-out votes; `training.evaluate.prepare`), computed now, off the round's
    clock, within `cfg.max_minutes` from `started`. Under the round lock (raises `RoundBusy`
    while a round runs). Its record (`<data>/training/prepared.json`) goes into the next
    round's report."""
    cfg = cfg or RoundConfig()
    start = time.monotonic() if started is None else started
    with round_lock():
        registry = Registry()
        name = registry.current_name()
        base_name, base_source = resolve_base()
        train, heldout = split(load_feedback(cfg.data), cfg.data)
        deadline = start + cfg.max_minutes * 60
        fp32 = ServingConfig(dtype="float32")
        current = registry.load(name, fp32)
        base = current if name == base_name else registry.load(base_name, fp32)
        engine = open_engine(registry, name)
        try:
            log(f"preparing the next gate for {name}: {heldout.counts['votes']} held-out votes")
            done = prepare(current=current, base=base, current_engine=engine,
                           heldout=heldout, cfg=cfg.gate, log=log, deadline=deadline,
                           cache_dir=gate_cache_dir(registry))
            start_name = base_name if cfg.tune.start == "base" else name
            # the start version's replies the next round's DPO steps replay
            if cfg.tune.replay_weight > 0 and runs_dpo(cfg.tune, train):
                _, done["replay"] = replay_rows(registry, start_name, cfg,
                                                engine if start_name == name else None)
                log(f"replay: {done['replay']['written']} of {done['replay']['requests']} "
                    f"replies of {start_name} written in {done['replay']['seconds']:.0f} s")
        finally:
            engine.close()
        tokenizer = current.tokenizer
        del current, base
        # The judge, when it must be trained again, keeps the time a round would give it: a
        # round without it trains its own in that share of the tuning's time. The reference
        # is written for the pairs the next round's steps can reach (their share of its clock,
        # with a prepared judge), not for the whole store.
        retrain = cfg.reward.prepare and not judge_current(registry, base_source, cfg, train)
        reserve = JUDGE_RESERVE * judge_share_s(cfg) if retrain else 0.0
        reach = kept_reach(training_share_s(cfg), cfg.tune.batch_size)
        done["reference"] = prepare_reference(registry, start_name, train, cfg.tune,
                                              deadline - reserve, log, reach)
        done["judge"] = prepare_judge(registry, base_source, tokenizer, train, heldout, cfg,
                                      deadline, log)
        # the synthetic pairs the round would otherwise sample on its clock, and their
        # reference (the users' pairs' is kept above): the round's steps read both
        made, done["synthetic"] = prepare_synthetic(registry, name, base_source, tokenizer,
                                                    train, cfg, deadline, log)
        if made:
            done["synthetic"]["reference"] = prepare_reference(
                registry, start_name, FeedbackData(train.votes, train.pairs + made), cfg.tune,
                deadline, log, reach)
        done["seconds"] = round(done["seconds"] + done["reference"]["seconds"]
                                + done["judge"]["seconds"] + done["synthetic"]["seconds"]
                                + done["synthetic"].get("reference", {}).get("seconds", 0.0)
                                + done.get("replay", {}).get("seconds", 0.0), 1)
        record = {**done, "finished_at": datetime.now(timezone.utc).isoformat(),
                  "heldout": heldout.counts, "train": train.counts}
        path = prepared_path()
        make_folder(path.parent)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
        return record


def liked_enough(own: dict, min_disliked_share: float) -> str | None:
    """Why no round should train (`own_votes` of the serving version), or None. A round can
    gain at most what users still dislike, and every round risks a loss: with the disliked
    share's interval wholly below `min_disliked_share`, there is too little left to gain.

    Replayed on the recorded `bench.loop` rounds (`python -m bench.ceiling`; 46 in session
    25): at 10% it skips 4, which gained nothing (concise session 24's round 3 shipped 93% ->
    86%); each of the 41 rounds whose candidate gained at least 2 points had room of 17.5% or
    more."""
    share = own["disliked_share"]
    if share is None or share["high"] >= min_disliked_share:
        return None
    return (f"Users liked {own['votes'] - own['disliked']} of the {own['votes']} replies of "
            f"{own['version']} they voted on: at most {share['high']:.1%} are disliked "
            f"({share['confidence']:.0%} interval), below data.min_disliked_share "
            f"({min_disliked_share:.0%}). A round could gain at most that and may lose more, "
            f"so none trains and {own['version']} keeps serving; the next round runs when "
            "more votes arrive (or set data.min_disliked_share to 0).")


def tuning_config(cfg: TuneConfig, continuing: bool) -> TuneConfig:
    """The tuning's settings for this round: `continue_lr_scale` applies when it tunes a
    trained version rather than the base."""
    return replace(cfg, learning_rate=cfg.learning_rate * cfg.continue_lr_scale) \
        if continuing else cfg


def _run(cfg: RoundConfig, echo, start: float) -> RoundResult:
    budget_s = cfg.max_minutes * 60
    # Each stage's share of the clock is fixed up front: training stops early enough for the
    # gate, which caps its own sample to the time left; a finished candidate is never thrown
    # away for the clock.
    end = start + budget_s
    train_deadline = end - cfg.gate_share * budget_s
    round_id = new_round_id()
    log_file = reports_dir() / f"{round_id}.log"

    def log(line: str) -> None:  # to the caller and to the round's log beside its report
        echo(line)
        with open(log_file, "a") as fh:
            fh.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {line}\n")

    registry = Registry()
    registry.drop_staging()  # left by a killed round (we hold the round lock)
    current_name = registry.current_name()
    report: dict = {"round": round_id, "started_at": datetime.now(timezone.utc).isoformat(),
                    "current_version": current_name, "config": cfg.to_dict(), "timings_s": {},
                    "peak_mb": {}}
    if (prepared := read_prepared()) and prepared.get("version") == current_name:
        report["prepared"] = prepared  # the serving version's half of the gate, done before
    reset_peak()

    def timed(stage: str, began: float) -> None:  # time and peak memory of the stage ending
        report["timings_s"][stage] = round(time.monotonic() - began, 1)
        if stage != "total":
            report["peak_mb"][stage] = peak_mb()
            reset_peak()

    def finish(decision: str, code: int, message: str) -> RoundResult:
        report.update(decision=decision, exit_code=code, message=message,
                      finished_at=datetime.now(timezone.utc).isoformat())
        timed("total", start)
        path = write_report(report)
        log(f"{decision}: {message}\nreport: {path.with_suffix('.md')}")
        return RoundResult(round_id, decision, code, message, report, path)

    t = time.monotonic()
    log(f"round {round_id}: reading feedback (serving: {current_name})")
    data = load_feedback(cfg.data)
    train, heldout = split(data, cfg.data)
    report["data"] = {"all": data.counts, "train": train.counts, "heldout": heldout.counts,
                      "heldout_share": round(heldout_share(len(data.votes), cfg.data), 4)}
    if train.left_out:
        report["data"]["left_out"] = train.left_out
        log(f"left out of training as empty or looping: {train.left_out['liked_votes']} liked "
            f"replies, {train.left_out['pairs']} pairs preferring one (data.drop_disfluent)")
    timed("data", t)
    own = report["serving_votes"] = own_votes(data, current_name, confidence=cfg.gate.confidence)
    if (why := liked_enough(own, cfg.data.min_disliked_share)) is not None:
        return finish("skipped", LIKED_ENOUGH, why)
    try:
        check_enough(train, cfg.data)
        held = heldout.counts
        if held["votes"] < cfg.gate.min_heldout_votes or not held["liked"] or not held["disliked"]:
            raise NotEnoughFeedback(
                f"The held-out conversations hold {held['liked']} liked and {held['disliked']} "
                f"disliked votes; the gate needs at least {cfg.gate.min_heldout_votes} with both "
                "labels to judge a candidate. Collect more ratings and try again.")
    except NotEnoughFeedback as exc:
        return finish("skipped", NOT_ENOUGH_FEEDBACK, str(exc))

    fp32 = ServingConfig(dtype="float32")  # train and judge in full precision
    base_name, base_source = resolve_base()
    staging = registry.staging(round_id)
    staging.config.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    t = time.monotonic()
    start_name = base_name if cfg.tune.start == "base" else current_name
    trainee = registry.load(start_name, fp32)
    checked = check_sample(heldout, cfg.reward.check_conversations, cfg.gate.seed)
    prepared_judge = PreparedJudge(judge_dir(registry))
    why_not = "off (reward.prepare false)" if not cfg.reward.prepare else \
        prepared_judge.unusable(base_source, cfg.reward, train, cfg.reward.prepared_max_missing)
    if why_not is None:  # trained by `training prepare`, off the clock
        log("the reward model trained by `training prepare`")
        judge = prepared_judge.load(base_source, trainee.tokenizer, cfg.reward.max_length)
        prepared_judge.copy_to(staging)
        report["reward_model"] = prepared_judge.summary(train)
    else:
        pairs = reward_pairs(train, cfg.data, cfg.reward.reason_margin)
        log(f"training the reward model on {len(pairs)} pairs (none prepared to use: "
            f"{why_not})")
        # The reward model may not starve the tuning: it gets its share of the training
        # time left.
        reward_deadline = share_end(t, train_deadline, cfg.reward_share)
        judge, report["reward_model"] = train_reward_model(
            base_source, trainee.tokenizer, pairs, cfg.reward, staging, reward_deadline,
            to_score=judged_conversations(checked))
        report["reward_model"]["prepared"] = {"why_not": why_not}
    quality, calibration = judge_quality(judge, checked, confidence=cfg.gate.confidence,
                                         samples=cfg.gate.bootstrap_samples, seed=cfg.gate.seed)
    quality["heldout_available"] = {"votes": len(heldout.votes), "pairs": len(heldout.pairs)}
    report["reward_model"]["judge"] = quality
    timed("reward_model", t)

    t = time.monotonic()
    reference = ReferenceCache(reference_dir(registry), start_name, cfg.tune)
    report["synthetic"] = {"pairs": 0}
    reads_kept = steps_read_kept(reference, train.pairs, cfg.tune, kept_reach(
        train_deadline - t, cfg.tune.batch_size)["pairs"])
    # pairs `training prepare` made with this very judge cost the tuning no time
    prepared_pairs = PreparedPairs(synthetic_path(registry))
    unprepared = prepared_pairs.unusable(
        current_name, prepared_judge.record["finished_at"] if why_not is None else None,
        cfg.synthetic, cfg.data.drop_disfluent)
    sampling_s = 0.0 if unprepared is None else cfg.synthetic.time_share * (train_deadline - t)
    if cfg.synthetic.samples_per_prompt == 0:
        report["synthetic"]["why"] = "off (synthetic.samples_per_prompt = 0)"
    elif not quality["trusted"]:
        report["synthetic"]["why"] = (
            "the reward model's held-out ranking is not above chance "
            f"(AUC interval {quality.get('auc', {}).get('low', 0):.2f}-"
            f"{quality.get('auc', {}).get('high', 0):.2f}): no pairs from it")
    elif cfg.tune.method == "online":
        report["synthetic"]["why"] = ("online tuning: the model samples and the reward model "
                                      "judges pairs at every step instead")
    elif cfg.synthetic.only_if_reached and (reach := tuning_reach(
            (step := tuning_step_estimate(report["reward_model"].get("step_s"), cfg.synthetic,
                                          kept=reads_kept))["step_s"],
            train_deadline - t - sampling_s, cfg.tune.batch_size,
            len(train.pairs))) is not None:
        report["synthetic"]["why"] = (
            f"the tuning's time left after sampling reaches at most {reach} of the users' "
            f"{len(train.pairs)} pairs (a step takes about {step['step_s']:.0f} s: "
            f"{step['source']}): synthetic pairs would mostly go unseen, so their time goes to "
            "the tuning")
    elif unprepared is None:
        made = prepared_pairs.pairs
        report["synthetic"] = prepared_pairs.summary()
        log(f"synthetic pairs made by `training prepare` "
            f"({report['synthetic']['prepared']['finished_at'][:19]}), off the round's clock")
        train = FeedbackData(train.votes, train.pairs + made, train.left_out)
    else:
        # sampling gets 80% of the synthetic stage's share, judging the rest
        sampling_end = share_end(t, train_deadline, 0.8 * cfg.synthetic.time_share)
        # all slots busy with the samples (a batch job, as `serving generate`)
        engine = open_engine(registry, current_name, ServingConfig(slots=16))
        try:
            made, report["synthetic"] = synthetic_pairs(
                engine, judge, train, cfg.synthetic, sampling_end, log=log,
                fluent_chosen=cfg.data.drop_disfluent)
        finally:
            engine.close()
        report["synthetic"]["prepared"] = {"why_not": unprepared}
        train = FeedbackData(train.votes, train.pairs + made, train.left_out)
    log(report["synthetic"].get("why") or f"{report['synthetic']['pairs']} synthetic pairs")
    timed("synthetic", t)

    t = time.monotonic()
    tuning = tuning_config(cfg.tune, continuing=start_name != base_name)
    replay = None
    if tuning.replay_weight > 0 and choose_method(
            tuning, train, judge if quality["trusted"] else None) == "dpo":
        replay, report["replay"] = replay_rows(registry, start_name, cfg)
        log(f"replay: {len(replay['rows'])} replies of {start_name} "
            f"({report['replay']['written']} written now, {report['replay']['seconds']:.0f} s)")
    log(f"tuning {start_name} ({cfg.tune.method}, "
        f"{'full' if cfg.tune.full_finetune else 'LoRA'}, lr {tuning.learning_rate:g})")
    summary, _ = tune(trainee.model, trainee.tokenizer, train, tuning, staging,
                      train_deadline, judge=judge if quality["trusted"] else None,
                      sampling=cfg.synthetic, reference=reference,
                      reach=(reach := kept_reach(train_deadline - t, tuning.batch_size))["pairs"],
                      replay=replay)
    if "reference" in summary:
        summary["reference"]["reach_source"] = reach["source"]
    report["tuning"] = summary
    del trainee
    timed("tuning", t)

    registry.register(round_id, staging, {
        "parent": start_name, "replaces": current_name, "base": base_name,
        "kind": summary["kind"], "method": summary["method"], "data_counts": report["data"],
        "round": round_id})
    log(f"registered version {round_id}")
    if backend_setting() in ("auto", "llama.cpp"):
        try:  # what llama.cpp will serve, written now so the gate judges that very file
            registry.gguf_path(round_id, ServingConfig().gguf_quant)
        except NotConvertible as exc:
            log(f"not written as GGUF ({exc}); transformers will serve it")

    t = time.monotonic()
    log("gate: held-out ranking, reward model, regression set")
    current = registry.load(current_name, fp32)
    base = current if current_name == base_name else registry.load(base_name, fp32)
    candidate = registry.load(round_id, fp32)
    version = registry.get(round_id).dir
    engines = [open_engine(registry, n) for n in (current_name, round_id)]
    try:
        verdict = gate(current=current, candidate=candidate, base=base,
                       current_engine=engines[0], candidate_engine=engines[1],
                       heldout=heldout, reward_model=judge, calibration=calibration,
                       cfg=cfg.gate, deadline=end - min(FINISH_RESERVE_S, 0.01 * budget_s),
                       log=log,
                       cache_dir=gate_cache_dir(registry))
    finally:
        for engine in engines:
            engine.close()
    report["gate"] = verdict
    timed("gate", t)
    version.metrics.write_text(json.dumps(
        {"gate": verdict, "tuning": summary, "reward_model": report["reward_model"]},
        indent=2) + "\n")

    overrun = time.monotonic() - end
    report["overrun_s"] = round(max(0.0, overrun), 1)
    if overrun > 0:
        log(f"the round ran {overrun:.0f}s past its {cfg.max_minutes:g} minutes (reported; a "
            "finished candidate is still judged on its merits)")
    if not verdict["passed"] and cfg.gate.enforce:
        failed = [f"{name}: {c['why']}" for name, c in verdict["checks"].items()
                  if not c["passed"]]
        if not verdict["improved"]:
            failed.insert(0, "neither (a) nor (b) showed it better than the current version, "
                          f"alone or pooled ({verdict['pooled']['why']})")
        return finish("rejected", REJECTED, f"{current_name} keeps serving; the candidate "
                      f"{round_id} failed: " + "; ".join(failed))
    log(f"promoting {round_id}")
    why = "passed the gate" if verdict["passed"] else "gate not enforced"
    registry.set_current(round_id, why=f"round {round_id} {why}")
    return finish("promoted", PROMOTED, f"{round_id} now serves (was {current_name}; {why})")


def earlier_dpo_steps(kept: bool):
    """(round, tuning step seconds, reward-model step seconds or None) of the earlier DPO
    rounds of this data folder whose steps got their reference the same way (`kept`: read from
    `training prepare`'s cache; else computed in each step), latest first. The running round's
    own report is written when it finishes, so every report found here is an earlier round's."""
    for path in sorted(reports_dir().glob("r*.json"), reverse=True):
        try:
            earlier = json.loads(path.read_text())
            tuned = earlier["tuning"]["step_s"]
            judged = (earlier.get("reward_model") or {}).get("step_s")
            read_kept = str((earlier["tuning"].get("reference") or {}).get(
                "source", "")).startswith("kept")
            if earlier["tuning"].get("method") == "dpo" and tuned and read_kept == kept:
                yield path.stem, float(tuned), (float(judged) if judged else None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a report from an older version, or a round that stopped early


def tuning_step_estimate(reward_step_s: float | None, cfg: SyntheticConfig,
                         kept: bool = False) -> dict:
    """What a tuning step will cost, before any is taken: the reward model's step time (just
    measured) times the ratio of the two in the latest earlier DPO round of this data folder
    whose steps got their reference the same way (`kept`: read from `training prepare`'s cache;
    else computed in each step, about a third dearer), same machine and settings as a rule;
    else times the setting for that way (`tuning_step_ratio_kept`, `tuning_step_ratio`).
    {"step_s": None} when the reward model took no step."""
    if not reward_step_s:
        return {"step_s": None, "source": "no reward-model step measured"}
    way = "the reference kept" if kept else "the reference in each step"
    for stem, tuned, judged in earlier_dpo_steps(kept):
        if judged:
            return {"step_s": reward_step_s * tuned / judged,
                    "source": f"{tuned / judged:.1f} reward-model steps, as in round "
                              f"{stem} ({way})"}
    name, ratio = (("tuning_step_ratio_kept", cfg.tuning_step_ratio_kept) if kept
                   else ("tuning_step_ratio", cfg.tuning_step_ratio))
    return {"step_s": reward_step_s * ratio,
            "source": f"{ratio:g} reward-model steps of {reward_step_s:.1f} s "
                      f"(synthetic.{name}: {way})"}


REACH_MARGIN = 1.25  # the pairs a kept reference is written for, over the steps' estimated reach


def kept_reach(seconds: float, batch_size: int) -> dict:
    """How many training pairs, in the tuning's order, DPO steps reading a kept reference can
    take in `seconds`, with a margin of REACH_MARGIN: at the step time of the latest earlier
    round of this data folder that read it kept. What `training prepare` writes the reference
    for, and what the round fills before its steps. {"pairs": None} when no such round is on
    record: every pair counts."""
    for stem, tuned, _ in earlier_dpo_steps(kept=True):
        steps = math.ceil(REACH_MARGIN * max(0.0, seconds) / tuned)
        return {"pairs": max(1, steps) * batch_size,
                "source": f"{seconds:.0f} s at {tuned:.1f} s a step (round {stem}), "
                          f"x{REACH_MARGIN:g}"}
    return {"pairs": None, "source": "no earlier round read a kept reference: every pair"}


def tuning_reach(step_s: float | None, seconds: float, batch_size: int,
                 pairs: int) -> int | None:
    """At most how many of `pairs` the tuning can take in `seconds` at `step_s` a step (its
    estimated cost: `tuning_step_estimate`), when that is fewer than all of them; None when all
    fit, or when nothing is known (no step measured, no pairs)."""
    if not step_s or not pairs:
        return None
    reach = int(seconds // step_s) * batch_size
    return reach if reach < pairs else None


def write_report(report: dict) -> Path:
    path = reports_dir() / f"{report['round']}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    return path


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def markdown(r: dict) -> str:
    lines = [f"# Training round {r['round']}", "",
             f"**Decision: {r['decision']}** — {r['message']}", "",
             f"Serving before the round: `{r['current_version']}`", ""]
    if "data" in r:
        lines += ["## Data", "", "| split | votes | liked | disliked | pairs |",
                  "|---|---|---|---|---|"]
        for name in ("all", "train", "heldout"):
            c = r["data"][name]
            lines.append(f"| {name} | {c['votes']} | {c['liked']} | {c['disliked']} | "
                         f"{c['pairs']} |")
        lines.append("")
        if (share := r["data"].get("heldout_share")) is not None:
            lines += [f"Held out for the gate: {share:.0%} of the conversations "
                      "(data.heldout_fraction, raised in a small store to hold about "
                      "data.heldout_min_votes votes)", ""]
        if left := r["data"].get("left_out"):
            lines += [f"Left out of training as empty or looping (data.drop_disfluent): "
                      f"{left['liked_votes']} liked replies, {left['pairs']} pairs preferring "
                      "one", ""]
    if (own := r.get("serving_votes")) and own["disliked_share"]:
        share = own["disliked_share"]
        lines += [f"Votes on `{own['version']}`'s own replies: {own['disliked']} of "
                  f"{own['votes']} disliked ({share['estimate']:.1%}, {share['confidence']:.0%} "
                  f"interval {share['low']:.1%}-{share['high']:.1%}; a round trains while the "
                  f"top is at least data.min_disliked_share, "
                  f"{r['config']['data']['min_disliked_share']:.0%})", ""]
    if "tuning" in r:
        t = r["tuning"]
        mix = " + ".join(f"{w} x {n}" for n, w in zip(t.get("loss_type", []),
                                                      t.get("loss_weights") or []))
        lines += ["## Training", "",
                  f"- reward model: {r['reward_model']['pairs']} pairs "
                  f"({r['reward_model'].get('pairs_with_margin', 0)} with a margin from what "
                  "users said), "
                  f"{r['reward_model']['steps']} steps, loss {r['reward_model']['train_loss']:.4f}"
                  + _prepared_judge_line(r["reward_model"].get("prepared"))
                  + _judge_line(r["reward_model"].get("judge")),
                  _synthetic_line(r.get("synthetic")),
                  f"- tuning: {t['method'].upper()} ({t['kind']}), {t['steps']} steps, loss "
                  + (f"({mix}) " if mix else "")
                  + f"{_num(t['first_loss'])} -> {_num(t['last_loss'])}"
                  + (" (stopped by the time budget)" if t["stopped_by_deadline"] else "")
                  + (f"; {t['rows']} prompts sampled twice a step, judged margin "
                     f"{_num(t['mean_judged_margin'])}, replies finished "
                     f"{_num(t['finished_replies'])}" if t["method"] == "online" else "")
                  + (f"; online asked, not run: {t['online_skipped']}"
                     if t.get("online_skipped") else "")
                  + (f"; reference log-probabilities: {ref['source']}"
                     + (f", {ref['computed_here']} of {ref['pairs']} pairs computed here in "
                        f"{ref['seconds_here']:.0f} s" if ref.get("computed_here") else "")
                     if (ref := t.get("reference")) else "")
                  + (f"; {t['step_s']:.1f} s a step" if t.get("step_s") else "")
                  + (f"; the change scaled by {t['change_scale']:g} (tune.change_scale)"
                     if t.get("change_scale", 1) != 1 else "")
                  + _replay_line(t.get("replay"), r.get("replay")), ""]
    if "gate" in r:
        g = r["gate"]
        lines += ["## Gate", "", f"Shown better on (a) or (b): {'yes' if g['improved'] else 'no'}"
                  + ("" if g.get("enforced", True) else " (gate not enforced)")
                  + (f"; (a) and (b) pooled: {g['pooled']['why']}" if g.get("pooled") else ""),
                  "",
                  "| check | verdict | numbers (intervals at the gate's confidence) |",
                  "|---|---|---|"]
        for name, c in g["checks"].items():
            lines.append(f"| {name} | {c['verdict']} | {c['why']} |")
        if p := r.get("prepared"):
            lines += ["", f"Prepared before the round (`python -m training prepare`, "
                      f"{p['seconds']:.0f} s, off the round's clock): {prepared_line(p)}."]
        lines.append("")
    lines += ["## Time and memory", "", "| stage | seconds | peak MB |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {r.get('peak_mb', {}).get(k, '')} |"
              for k, v in r["timings_s"].items()]
    lines.append("")
    return "\n".join(lines)


def _replay_line(t: dict | None, made: dict | None) -> str:
    if not t:
        return ""
    if "why" in t:
        return f"; replay {t['why']}"
    return (f"; replay (tune.replay_weight {t['weight']:g}): {t['rows_taken']} rows of "
            f"{t['rows']} {made['version']} replies"
            + (f" ({made['written']} written in this round)" if made and made["written"]
               else " (kept by `training prepare`)")
            + f", loss {_num(t['first_nll'])} -> {_num(t['last_nll'])}")


def _prepared_judge_line(p: dict | None) -> str:
    if not p or "why_not" in p:
        return ""
    return (f" (trained by `training prepare` in {p['seconds']:.0f} s, off the round's clock; "
            f"it lacks {p['rows_missing']} of the round's {p['rows']} training votes and pairs)")


def _judge_line(q: dict | None) -> str:
    if not q:
        return ""
    auc = q.get("auc")
    line = (f"; on {q['heldout_votes']} held-out votes AUC {auc['estimate']:.2f} "
            f"[{auc['low']:.2f}, {auc['high']:.2f}]"
            if auc else "; no held-out votes of both labels to check it on")
    if q.get("pair_accuracy") is not None:
        line += f", held-out pair accuracy {q['pair_accuracy']:.0%} of {q['heldout_pairs']}"
    return line


def _synthetic_line(s: dict | None) -> str:
    if not s:
        return "- synthetic pairs: none"
    if "why" in s:
        return f"- synthetic pairs: none ({s['why']})"
    made = s.get("prepared", {})
    return (f"- synthetic pairs: {s['pairs']} from {s['prompts_finished']} of {s['prompts']} "
            f"prompts ({s['replies']} sampled replies; {s['pairs_below_margin']} prompts below "
            f"the {s['margin_sd']} s.d. margin), {s['generate_and_score_s']} s"
            + (f"; {h['replies']} replies asked for a form, chosen in {h['chosen']} pairs, "
               f"rejected in {h['rejected']}" if (h := s.get("hinted")) else "")
            + (f", made by `training prepare` (off the round's clock) from {made['version']}"
               if "finished_at" in made else ""))


def status() -> dict:
    """Versions, which one serves, the moves of `CURRENT` and the last rounds' reports."""
    from serving.llamacpp import repack_setting  # llama.cpp's libraries: loaded only here

    registry = Registry()
    reports = sorted(reports_dir().glob("r*.json"))[-10:]
    return {
        "current": registry.current_name(),
        "current_problem": registry.current_problem(),
        "base": registry.base_name,
        "machine": {"dtype": dtype_reason(), "threads": threads(),
                    "llama_repack": repack_setting()[1]},
        "versions": [{"name": v.name, "parent": v.meta.get("parent"),
                      "created_at": v.meta.get("created_at"), "method": v.meta.get("method"),
                      "kind": v.meta.get("kind"),
                      "votes": v.meta.get("data_counts", {}).get("train", {}).get("votes")}
                     for v in registry.versions()],
        "history": registry.history()[-10:],
        "rounds": [{k: json.loads(p.read_text()).get(k) for k in
                    ("round", "decision", "message", "finished_at")} for p in reports],
        "prepared": read_prepared(),  # what `prepare` last did (for which version, when)
    }

