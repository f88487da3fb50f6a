"""The periodic job: a round whenever at least N new votes have arrived since the last round.

Checks every interval; the round lock keeps two rounds from overlapping (across processes and
machines sharing the data directory), and a lock left by a killed round is free again at once.
Progress is kept in `<data>/training/schedule.json` (the newest vote event already used).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from feedback import store
from feedback.config import make_folder
from feedback.db import transaction
from serving.config import data_dir
from serving.registry import Registry
from training.config import RoundConfig
from training.dataset import load_feedback, split
from training.lock import RoundBusy
from training.round import (BUSY, LIKED_ENOUGH, PROMOTED, REJECTED, prepare_gate,
                            read_prepared, run_round)


def state_path() -> Path:
    path = data_dir() / "training" / "schedule.json"
    make_folder(path.parent)
    return path


def new_votes() -> tuple[int, int]:
    """(votes cast or changed since the last round started, the newest vote event id)."""
    path = state_path()
    after = json.loads(path.read_text()).get("last_event_id", 0) if path.is_file() else 0
    with transaction() as session:
        return store.vote_events_since(session=session, after_id=after)


def reference_short(ref: dict) -> bool:
    """Whether `prepare` left pairs it wanted without a reference: of those the next round
    reaches (`missing`; a record from before it wrote the reach prefix only: of all)."""
    if "why" in ref:  # the round runs no DPO
        return False
    return ref.get("missing", ref["pairs"] - ref["items"]) > 0


def synthetic_short(syn: dict) -> bool:
    """Whether `prepare`'s clock stopped the synthetic pairs short: before their sampling, in
    it (prompts left unfinished), or before the reference of those it made."""
    return bool(syn.get("stopped_by_deadline")) \
        or syn.get("prompts_finished", 0) < syn.get("prompts", 0) \
        or reference_short(syn.get("reference") or {"why": "none"})


def unprepared(cfg: RoundConfig) -> bool:
    """Whether what `prepare_gate` makes may be incomplete: it has not run for the serving
    version, or the held-out or training votes changed since it did, or its clock stopped it
    short (of the gate's half or of the tuning's reference, before the reward model, or in
    the synthetic pairs' sampling).
    Reads the store only (no model)."""
    record = read_prepared()
    if record is None or record.get("version") != Registry().current_name() \
            or "reference" not in record:  # written before prepare kept the reference
        return True
    train, heldout = split(load_feedback(cfg.data), cfg.data)
    ref = record["reference"]  # short, unless the round runs no DPO ("why")
    judge = record.get("judge")  # its clock may have left the reward model to the round
    syn = record.get("synthetic") or {}  # or stopped its sampling short
    short = any(record.get(part, {}).get("items", 0) < record.get(total, 0) for part, total in
                (("c_replies", "questions"), ("b_replies", "prompts"), ("a_logps", "votes"))) \
        or reference_short(ref) \
        or synthetic_short(syn) \
        or (cfg.reward.prepare and (judge is None or "why" in judge))
    return short or record.get("heldout") != heldout.counts or \
        record.get("train") != train.counts


def run_schedule(cfg: RoundConfig, *, min_new_votes: int, interval_s: float,
                 max_checks: int | None = None, prepare: bool = True, log=print) -> int:
    """Check, maybe run a round, sleep; `max_checks` checks (forever when None). Between
    rounds (a check with too few new votes), with `prepare`, the next gate's serving-version
    half and the tuning's reference are computed (`prepare_gate`) when the serving version or
    the votes changed since they last were. Returns the last round's exit code (0 when no
    round ran)."""
    checks, code = 0, 0
    while True:
        count, newest = new_votes()
        if count >= min_new_votes:
            log(f"{count} new votes (>= {min_new_votes}): starting a round")
            try:
                result = run_round(cfg, log=log)
                code = result.exit_code
                if code in (PROMOTED, REJECTED, LIKED_ENOUGH):
                    # Those votes were used (or said enough: the next round waits for as many
                    # new ones); after a round skipped for too little feedback they keep
                    # counting.
                    state_path().write_text(json.dumps({"last_event_id": newest}) + "\n")
            except RoundBusy as exc:
                log(str(exc))
                code = BUSY
        else:
            log(f"{count} new votes (< {min_new_votes}); next check in {interval_s:.0f}s")
            if prepare and unprepared(cfg):
                try:
                    prepare_gate(cfg, log=log)
                except RoundBusy as exc:
                    log(str(exc))
        checks += 1
        if max_checks is not None and checks >= max_checks:
            return code
        time.sleep(interval_s)
