"""(a) as the gate asks it now and as it asked it before session 21, on a store's past gates.

    python -m bench.a_check --store bench/results/loop/tips/data [--store ...]
        [--out bench/results/a_check]

Nothing is run on a model: every gate kept its versions' log-probabilities of the held-out
replies it scored (`<data>/training/gate_cache`), so for each round in the store's reports
that reached its gate (and whose version folder, which names its base model, is kept), the
held-out votes as the round split them (the database as of the round's start,
`bench.gate_replay.store_as_of`) that the base, the serving version and the candidate all have
log-probabilities for, up to as many as the gate scored, in the gate's order (the votes
earlier gates scored first, and those a `training prepare` before the round scored, as its
record in the round's report says; exact while no vote arrived between the two), give both
forms of (a):
- before: AUC of the candidate's implicit reward against the base model minus the current's
  (each version's own ranking of the votes);
- now: AUC of the candidate's implicit reward with the current as the reference (its
  log-probabilities minus the current's): has it moved towards what users liked?
Each with the gate's bootstrap (one-sided confidence that the candidate is better), then
pooled with the round's own (b) confidence and, with its (c) verdict, the decision each form
would give. Prints a table and writes `a_check.json` (rows keyed by store and round; rows of
other stores are kept). In round 1 the current is the base model and both forms are one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench import earlier_results


def gates(store: Path) -> list[dict]:
    """One row per round of `store` that reached its gate: both forms of (a) and decisions."""
    from bench.gate_replay import store_as_of
    from training.config import RoundConfig, as_ran
    from training.dataset import load_feedback, split
    from training.evaluate import Kept, _verdict, alternating, decide, known_first
    from training.stats import auc_difference

    def key(vote: dict) -> str:  # as the gate keeps a reply's log-probability
        return Kept.key(vote["prompt"], vote["completion"])

    rows = []
    cache = store / "training" / "gate_cache"
    kept = {p.name.split(".")[0]: json.loads(p.read_text())
            for p in cache.glob("*.json") if not p.name.endswith(".replies.json")}
    scored: dict[str, set[str]] = {}  # version -> the votes earlier gates scored it on
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted((store / "reports").glob("r*.json")):
            report = json.loads(path.read_text())
            g = report.get("gate")
            if not g or "difference" not in g["checks"]["a_heldout_ranking"]:
                continue
            cfg = RoundConfig.from_dict(as_ran(report["config"]))
            db = Path(tmp) / f"{report['round']}.db"  # engines are cached per URL
            store_as_of(store / "feedback.db", report["started_at"], db)
            _, heldout = split(load_feedback(cfg.data, url=f"sqlite:///{db}"), cfg.data)
            try:  # the base model the round's versions descend from, as it registered them
                base = json.loads((store / "versions" / report["round"] / "meta.json")
                                  .read_text())["base"]
            except (OSError, ValueError, KeyError):
                print(f"{store} {report['round']}: its version folder is gone, skipped")
                continue
            lps = [kept.get(v, {}) for v in (base, report["current_version"], report["round"])]
            # as the gate ordered them: first the votes whose base and serving-version
            # log-probabilities earlier gates had kept (scored there), then the others
            def earlier(v: dict) -> bool:
                return all(key(v) in scored.get(m, ()) for m in (base, report["current_version"]))

            ordered = known_first(alternating(heldout.votes, cfg.gate.seed), earlier)
            prepared = report.get("prepared") or {}
            if prepared.get("heldout") == heldout.counts:  # `training prepare` ran before it,
                # on these votes in this order: those it scored are known to the gate too
                ready = {key(v) for v in ordered[:prepared["a_logps"]["items"]]}
                for m in (base, report["current_version"]):
                    scored.setdefault(m, set()).update(ready)
                ordered = known_first(alternating(heldout.votes, cfg.gate.seed),
                                      lambda v: earlier(v) or key(v) in ready)
            ordered = ordered[:g["checks"]["a_heldout_ranking"]["votes"]]  # as many as it scored
            for m in (base, report["current_version"], report["round"]):
                scored.setdefault(m, set()).update(key(v) for v in ordered)
            votes = [v for v in ordered if all(key(v) in lp for lp in lps)]
            b, o, c = ([lp[key(v)] for v in votes] for lp in lps)
            labels = [v["label"] for v in votes]
            stats = dict(confidence=cfg.gate.confidence, samples=cfg.gate.bootstrap_samples,
                         seed=cfg.gate.seed)
            before = auc_difference([x - y for x, y in zip(c, b)], [x - y for x, y in zip(o, b)],
                                    labels, **stats)
            now = auc_difference([x - y for x, y in zip(c, o)], [0.0] * len(c), labels, **stats)
            row = {"store": str(store), "round": report["round"],
                   "current": report["current_version"], "votes": len(votes),
                   "liked": sum(labels), "decision": report["decision"],
                   "b_confidence": g["checks"]["b_reward_model"].get("p_better"),
                   "c_passed": g["checks"]["c_regression"]["verdict"] == "passed"}
            for name, d in (("before", before), ("now", now)):  # (b), (c): the round's own
                together, _, passes = decide({
                    **g["checks"], "a_heldout_ranking": {"difference": d.to_dict(),
                                                         "verdict": _verdict(d)}}, cfg.gate)
                row[name] = {"auc": (d.estimate + 0.5) if name == "now" else None,
                             "difference": d.to_dict(), "confidence": d.p_better,
                             "pooled": together["confidence"], "passes": passes}
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, action="append", required=True,
                        help="a bench.loop user's data folder (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "a_check")
    args = parser.parse_args(argv)
    for store in args.store:
        if not (store / "feedback.db").is_file() or not (store / "reports").is_dir():
            parser.error(f"{store} holds no feedback.db and reports folder: give a bench.loop "
                         "user's data folder, e.g. bench/results/loop/tips/data")
    os.environ.setdefault("CHAT_DATA_DIR", tempfile.mkdtemp())  # nothing is written there
    path = args.out / "a_check.json"
    results = earlier_results(path)
    for store in args.store:
        rows = gates(store)
        results = {k: v for k, v in results.items() if not k.startswith(f"{store}:")}
        results.update({f"{store}:{r['round']}": r for r in rows})
        for r in rows:
            was, now = r["before"], r["now"]
            print(f"{store} {r['round']} (current {r['current']}), {r['votes']} votes: "
                  f"{r['decision']}; (a) before {was['confidence']:.3f} (pooled "
                  f"{was['pooled'] or 0:.2f}, {'passes' if was['passes'] else 'fails'}), "
                  f"now AUC {now['auc']:.3f} {now['confidence']:.3f} (pooled "
                  f"{now['pooled'] or 0:.2f}, {'passes' if now['passes'] else 'fails'})")
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
