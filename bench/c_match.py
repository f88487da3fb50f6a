"""(c)'s regression answers matched as the gate matches them now and as it did before session 43.

    python -m bench.c_match --store <a bench.loop user's data folder> [--store ...]
        [--out bench/results/c_match]

Nothing is run on a model: every gate kept both versions' greedy replies to the regression
questions (`<data>/training/gate_cache/<version>.<engine>.replies.json`). For each round in the
store's reports that reached its gate, the questions that gate asked (its first N, in the set's
order) are matched two ways:
- before: any substring of the reply, lower-cased, was an answer ("ice" in "nice", "4" in a
  list's "4.");
- now: `training.evaluate.answered`, whole words and numbers, list markers aside.
Each gives both versions' correct counts, the questions only one version answered (lost:
only the current; gained: only the candidate), the retention, the gate's accuracy check
(`training.evaluate.accuracy_verdict`, at the round's own gate settings) and an exact
one-sided sign test on the lost and gained questions. Also counted: the replies that
"answered" the old way only, per version (what a reply's length bought). Prints a line per
round and writes `c_match.json` (rows keyed by store and round; rows of other stores kept).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def substring(item: dict, reply: str) -> bool:
    """The regression match until session 43: any (lower-case) answer anywhere in the reply."""
    return any(a in reply.lower() for a in item["answers"])


def replies_of(cache: Path, version: str) -> dict | None:
    """The kept replies of one version (any engine; the gate keeps one kind per round)."""
    found = sorted(cache.glob(f"{version}.*.replies.json"))
    return json.loads(found[0].read_text()) if found else None


def judged(items: list[dict], current: list[str], candidate: list[str], match, cfg) -> dict:
    """One matcher's reading of (c): counts, lost and gained, the gate's verdict, a sign test."""
    from training.evaluate import accuracy_verdict
    from training.stats import sign_test
    cur_ok = [match(it, r) for it, r in zip(items, current)]
    cand_ok = [match(it, r) for it, r in zip(items, candidate)]
    lost = sum(o and not c for o, c in zip(cur_ok, cand_ok))
    gained = sum(c and not o for o, c in zip(cur_ok, cand_ok))
    diff, allowed, ok = accuracy_verdict(cur_ok, cand_ok, cfg)
    return {"current": sum(cur_ok), "candidate": sum(cand_ok), "lost": lost, "gained": gained,
            "retention": sum(cand_ok) / sum(cur_ok) if sum(cur_ok) else 1.0,
            "difference": diff.to_dict(), "allowed_loss": allowed,
            "accuracy_passes": ok, "sign_test_p": sign_test(lost, gained)}


def gates(store: Path) -> list[dict]:
    """One row per round of `store` whose gate asked regression questions both versions'
    kept replies answer."""
    from training.config import RoundConfig, as_ran
    from training.evaluate import ReplyCache, answered, regression_questions

    class Engine:  # the cache's key needs only the engine's kind, not an engine
        kind = "any"

    cache = store / "training" / "gate_cache"
    regression, questions = regression_questions()
    rows = []
    for path in sorted((store / "reports").glob("r*.json")):
        report = json.loads(path.read_text())
        c = ((report.get("gate") or {}).get("checks") or {}).get("c_regression") or {}
        if "questions" not in c:
            continue
        cfg = RoundConfig.from_dict(as_ran(report["config"])).gate
        versions = report["current_version"], report["round"]
        kept = [replies_of(cache, v) for v in versions]
        if None in kept:
            print(f"{store} {report['round']}: a version's kept replies are gone, skipped")
            continue
        keys = ReplyCache(None, "", Engine(), cfg.repetition_penalty)
        asked = [keys._key(q, cfg.reply_max_new_tokens, None) for q in questions[:c["questions"]]]
        if not all(k in r for k in asked for r in kept):
            print(f"{store} {report['round']}: not every question's replies are kept, skipped")
            continue
        current, candidate = ([r[k] for k in asked] for r in kept)
        items = regression[:len(asked)]
        row = {"store": str(store), "round": report["round"], "current": versions[0],
               "questions": len(items), "decision": report["decision"],
               "gate_c": c["verdict"],
               "before": judged(items, current, candidate, substring, cfg),
               "now": judged(items, current, candidate, answered, cfg)}
        row["only_before"] = {
            name: sum(substring(it, r) and not answered(it, r) for it, r in zip(items, replies))
            for name, replies in (("current", current), ("candidate", candidate))}
        rows.append(row)
    return rows


def line(r: dict) -> str:
    def one(name: str) -> str:
        m = r[name]
        return (f"{name} {m['candidate']} vs {m['current']} ({m['retention']:.0%}; "
                f"-{m['lost']} +{m['gained']}, p {m['sign_test_p']:.3f}, "
                f"{'passes' if m['accuracy_passes'] else 'WORSE'})")
    extra = r["only_before"]
    return (f"{Path(r['store']).parent.name} {r['round']}, {r['questions']} questions: "
            f"{one('before')}; {one('now')}; substring-only answers: candidate "
            f"{extra['candidate']}, current {extra['current']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, action="append", required=True,
                        help="a bench.loop user's data folder (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "c_match")
    args = parser.parse_args(argv)
    for store in args.store:
        if not (store / "reports").is_dir() or not (store / "training" / "gate_cache").is_dir():
            parser.error(f"{store} holds no reports and training/gate_cache folders: give a "
                         "bench.loop user's data folder, e.g. bench/results/loop/tips/data")
    path = args.out / "c_match.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    for store in args.store:
        rows = gates(store)
        results = {k: v for k, v in results.items() if not k.startswith(f"{store}:")}
        results.update({f"{store}:{r['round']}": r for r in rows})
        for r in rows:
            print(line(r))
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
