"""Would today's gate decide a store's past rounds the same? Replays each round's gate.

    python -m bench.gate_replay --store bench/results/loop/structured/data [--rounds R1,R2]
        [--gate NAME=VALUE ...] [--extra-seconds S] [--out bench/results/gate_replay]

For each round in the store's reports (oldest first; or those named) that registered a
candidate: the feedback as it stood when the round began (a copy of the database without the
conversations created later), the round's own split and gate settings, its own judge (the reward
model saved with its candidate) and its own time (the gate's seconds in the report) go to
`training.evaluate.gate`, comparing the versions the round compared, through the same engines;
`--gate` puts settings over the round's own (today's gate with, say, `judged_samples=2`), and
`--extra-seconds` adds to its time (what a larger `gate_share` would have given it).
The rounds share one fresh log-probability folder, as a store's own rounds do, so a replay of
rounds 1 and 2 shows what round 2's (a) gains from round 1's. Prints and writes, per round, the
original gate's (a) votes, one-sided confidences and decision beside the replay's
(`gate_replay.json`, keyed by the store's user; other stores' rows are kept). Needs the store's
version folders (a `bench.loop` run keeps them). A benchmark, not a test: it reads the store and
writes nothing there. Each round is replayed on its own: a round the replay would decide
otherwise does not change which versions the next round compares.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

from bench import earlier_results
from serving.setting import Allowed, flag_type


def store_as_of(db: Path, when: str, copy: Path) -> None:
    """`copy`: the database `db` without the conversations created at or after `when`."""
    copy.unlink(missing_ok=True)
    with sqlite3.connect(db) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    with sqlite3.connect(copy) as con:
        con.execute("PRAGMA foreign_keys = ON")  # votes, messages, pairs go with them
        con.execute("DELETE FROM conversations WHERE created_at >= ?",
                    (when.replace("T", " ").split("+")[0],))


def summary(g: dict) -> dict:
    a, b = g["checks"]["a_heldout_ranking"], g["checks"]["b_reward_model"]
    c = g["checks"]["c_regression"]
    fluency = c.get("fluency") or {}
    return {"a_votes": a.get("votes"), "a_votes_available": a.get("votes_available"),
            "a_confidence": (a.get("difference") or {}).get("p_better"),
            "a_cached": a.get("cached"), "b_prompts": b.get("prompts"),
            "b_replies_per_prompt": b.get("replies_per_prompt", 1),
            # (b)'s one-sided confidence, pooled with (a)'s: since session 18 its own
            # ("p_better"); in session 17 the calibrated approval's ("difference"); before,
            # the judge's win rate's ("interval")
            "b_confidence": b.get("p_better", (b.get("difference") or b.get("interval")
                                               or {}).get("p_better")),
            "b_verdict": b.get("verdict"), "b_win_rate": b.get("win_rate"),
            "b_direction": b.get("direction"), "b_difference": b.get("difference"),
            "b_approval": [b.get("approval_current"), b.get("approval_candidate")],
            # (c): correct answers (candidate, current) and empty or looping replies
            # (candidate, current, of how many pairs): a gate can pass (a) and (b) and fail here
            "c_correct": [(c.get("candidate") or {}).get("correct"),
                          (c.get("current") or {}).get("correct")],
            "c_questions": c.get("questions"), "c_verdict": c.get("verdict"),
            "fluency": [fluency.get("candidate_failures"), fluency.get("current_failures"),
                        fluency.get("replies")],
            "pooled": (g.get("pooled") or {}).get("confidence"), "passed": g["passed"],
            "seconds": g.get("seconds"), "replies_kept": g.get("replies_kept")}


def current_settings(config: dict) -> dict:
    """A past round's config without the settings today's code no longer has (the replay runs
    today's gate: a retired setting's part of it is gone), each one named."""
    from training.config import SECTIONS

    out = {}
    for name, value in config.items():
        if name in SECTIONS and isinstance(value, dict):
            known = SECTIONS[name].__dataclass_fields__
            for retired in sorted(set(value) - set(known)):
                print(f"the round's {name}.{retired} is not a setting any more: left out")
            value = {k: v for k, v in value.items() if k in known}
        out[name] = value
    return out


def gated_rounds(store: Path, names: list[str]) -> list[dict]:
    """The store's round reports that reached a gate, oldest first; only those `names` names
    (round ids) unless it is empty."""
    rounds = [json.loads(p.read_text()) for p in sorted((store / "reports").glob("*.json"))]
    return [r for r in rounds if r.get("gate") and (not names or r["round"] in names)]


def fresh_work(out: Path, store: Path) -> Path:
    """`out/work`, made empty, for a replay's scratch files; the store becomes the data
    directory (its versions, its base checkpoint)."""
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["CHAT_DATA_DIR"] = str(store)
    return work


def store_user(store: Path) -> str:
    """The simulated user a `bench.loop` store belongs to (its folder: USER/data)."""
    return store.parent.name if store.name == "data" else store.name


def keep_rows(path: Path, key: str, rows, work: Path) -> dict:
    """`path`'s results with `rows` under `key` (the other keys kept), written back; the
    scratch folder `work` removed."""
    results = earlier_results(path)
    results[key] = rows
    path.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return results


def round_data(store: Path, report: dict, db: Path, gate_settings: dict | None = None):
    """A past round as it began: its config (today's settings of it, `current_settings`; the
    gate's with `gate_settings` put over them), and its training and held-out feedback from a
    copy of the store's database at `db` without the conversations created since
    (`store_as_of`)."""
    from training.config import RoundConfig, as_ran
    from training.dataset import load_feedback, split

    config = current_settings(as_ran(report["config"]))
    config["gate"] = {**config.get("gate", {}), **(gate_settings or {})}
    cfg = RoundConfig.from_dict(config)
    store_as_of(store / "feedback.db", report["started_at"], db)
    train, heldout = split(load_feedback(cfg.data, url=f"sqlite:///{db}"), cfg.data)
    return cfg, train, heldout


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, required=True,
                        help="a data folder with feedback.db, reports/ and versions/")
    parser.add_argument("--rounds", default="", help="round ids, comma-separated (default: all)")
    parser.add_argument("--gate", action="append", default=[], metavar="NAME=VALUE",
                        help="a gate setting put over the round's own (JSON value; repeatable):"
                             " today's gate with it, e.g. judged_samples=2")
    parser.add_argument("--prepare", action="store_true",
                        help="before each gate, what `python -m training prepare` computes of "
                             "its serving version (off its clock): the gate as it runs after it")
    parser.add_argument("--extra-seconds", default=0.0, metavar="S",
                        type=flag_type(float, Allowed(low=0.0, high=float("inf"), high_open=True)),
                        help="seconds added to each round's own gate time (default 0)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "gate_replay")
    args = parser.parse_args(argv)
    overrides = gate_settings(parser, args.gate)
    rounds = gated_rounds(args.store, [r for r in args.rounds.split(",") if r])
    if not rounds:
        parser.error(f"no round with a gate among {args.store / 'reports'}")

    args.out.mkdir(parents=True, exist_ok=True)
    work = fresh_work(args.out, args.store)

    from serving.backends import open_engine
    from serving.config import ServingConfig
    from serving.model import resolve_base
    from serving.registry import Registry
    from training.evaluate import gate, prepare
    from training.reward import load_judge
    from training.synthetic import check_sample, judge_quality

    registry, fp32 = Registry(), ServingConfig(dtype="float32")
    base_name, base_source = resolve_base()
    rows = []
    for report in rounds:
        current_name, candidate_name = report["current_version"], report["round"]
        # a database file per round: replacing one under an open engine corrupts it
        cfg, _, heldout = round_data(args.store, report, work / f"{candidate_name}.db",
                                     overrides)
        current = registry.load(current_name, fp32)
        base = current if current_name == base_name else registry.load(base_name, fp32)
        candidate = registry.load(candidate_name, fp32)
        judge = load_judge(base_source, current.tokenizer,
                           registry.get(candidate_name).dir.reward, cfg.reward.max_length)
        # its calibration for (b), from the held-out votes its round checked it on
        _, calibration = judge_quality(
            judge, check_sample(heldout, cfg.reward.check_conversations, cfg.gate.seed),
            confidence=cfg.gate.confidence, samples=cfg.gate.bootstrap_samples,
            seed=cfg.gate.seed)
        engines = [open_engine(registry, n) for n in (current_name, candidate_name)]
        budget = report["timings_s"]["gate"] + args.extra_seconds
        try:
            prepared = prepare(current=current, base=base, current_engine=engines[0],
                               heldout=heldout, cfg=cfg.gate, log=print,
                               cache_dir=work / "gate_cache") if args.prepare else None
            replay = gate(current=current, candidate=candidate, base=base,
                          current_engine=engines[0], candidate_engine=engines[1],
                          heldout=heldout, reward_model=judge, calibration=calibration,
                          cfg=cfg.gate, deadline=time.monotonic() + budget, log=print,
                          cache_dir=work / "gate_cache")
        finally:
            for engine in engines:
                engine.close()
        row = {"round": candidate_name, "current": current_name, "budget_s": budget,
               "extra_s": args.extra_seconds,
               "gate_settings": overrides, "heldout": heldout.counts, "prepared": prepared,
               "original": summary(report["gate"]), "replay": summary(replay)}
        rows.append(row)
        o, r = row["original"], row["replay"]
        print(f"{candidate_name}: (a) {o['a_votes']} -> {r['a_votes']} of "
              f"{r['a_votes_available']} votes, confidence {_p(o['a_confidence'])} -> "
              f"{_p(r['a_confidence'])}; (b) {o['b_verdict']} {_p(o['b_confidence'])} -> "
              f"{r['b_verdict']} {_p(r['b_confidence'])}; "
              f"pooled {_p(o['pooled'])} -> {_p(r['pooled'])}; (c) {_c(o)} -> {_c(r)}; "
              f"{'passed' if o['passed'] else 'rejected'} -> "
              f"{'passed' if r['passed'] else 'rejected'}", flush=True)
        del current, base, candidate, judge
    return keep_rows(args.out / "gate_replay.json", store_user(args.store), rows, work)


def gate_settings(parser, pairs: list[str]) -> dict:
    """`--gate NAME=VALUE` pairs as a dict (values read as JSON, else text), checked as a round
    config's gate settings: an unknown name or a value it does not allow ends the command with
    the config's own message."""
    from training.config import ConfigError, RoundConfig

    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--gate {pair!r}: expected NAME=VALUE, e.g. judged_samples=2")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    try:
        RoundConfig.from_dict({"gate": out})
    except ConfigError as e:
        parser.error(f"--gate: {e}")
    return out


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _c(s: dict) -> str:
    """(c) in a summary: its correct answers and empty or looping replies, each candidate vs
    current, and its verdict."""
    (correct, was), (loops, had, pairs) = s["c_correct"], s["fluency"]
    return (f"{correct} vs {was} of {s['c_questions']}, looping {loops} vs {had} of {pairs}, "
            f"{s['c_verdict']}")


if __name__ == "__main__":
    main()
