"""(c)'s regression answers matched as the gate matches them now and as it did before session 43.

    python -m bench.c_match --store <a bench.loop user's data folder> [--store ...]
        [--answer] [--out bench/results/c_match]

Without `--answer` nothing is run on a model: every gate kept both versions' greedy replies to
the regression questions (`<data>/training/gate_cache/<version>.<engine>.replies.json`). For
each round in the store's reports that reached its gate, the questions that gate asked (its
first N, in the set's order) are matched two ways:
- before: any substring of the reply, lower-cased, was an answer ("ice" in "nice", "4" in a
  list's "4.");
- now: `training.evaluate.answered`, whole words and numbers, list markers aside.
Each gives both versions' correct counts, the questions only one version answered (lost:
only the current; gained: only the candidate), the retention, the gate's accuracy check
(`training.evaluate.accuracy_verdict`, at the round's own gate settings) and an exact
one-sided sign test on the lost and gained questions. Also counted: the replies that
"answered" the old way only, per version (what a reply's length bought). Prints a line per
round and writes `c_match.json` (rows keyed by store and round; rows of other stores kept).

With `--answer`, every question of today's set instead (240 since session 43; the gates
before it asked at most 120): each version's missing replies are written first, greedy
through its own engine as the gate asks them (about 0.4 s a reply on 2 cores), kept in the
store's gate cache like a gate's own; the row also reads (c) on the first 40, 80, ...
questions (`by_questions`: what a gate whose time allows that many would have seen). Output:
`c_match_all.json`.

With `--cap N`, each kept reply is first cut to its first N tokens (the candidate's own
tokenizer): what (c) would read with `gate.reply_max_new_tokens` N (96 by default) without
generating again, since a greedy reply with a shorter cap is the longer one's beginning (but
for the rare reply the batch's arithmetic changes, `bench.reply_batching`). The row also counts
the replies' tokens in full and within the cap: the decoding a shorter cap saves. Output:
`c_match_capN.json` (`c_match_all_capN.json` with `--answer`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench import earlier_results


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


def answer_all(store: Path, versions: tuple[str, ...], questions: list, cfg) -> None:
    """Each version's greedy replies to every regression question it has not answered yet,
    through its serving engine (as the gate asks them), kept in the store's gate cache."""
    from serving.backends import open_engine
    from serving.registry import Registry
    from training.evaluate import ReplyCache
    os.environ["CHAT_DATA_DIR"] = str(store)
    registry = Registry()
    for version in versions:
        engine = open_engine(registry, version)
        try:
            kept = ReplyCache(store / "training" / "gate_cache", version, engine,
                              cfg.repetition_penalty)
            missing = kept.unkept(questions, cfg.reply_max_new_tokens)
            t = time.monotonic()
            kept.answers(questions, cfg.reply_max_new_tokens)
            kept.save()
            print(f"{version}: {missing} replies written in {time.monotonic() - t:.0f}s")
        finally:
            engine.close()


def gates(store: Path, answer: bool = False, cap: int | None = None) -> list[dict]:
    """One row per round of `store` whose gate asked regression questions both versions'
    kept replies answer (`gate_row`)."""
    rows = []
    for path in sorted((store / "reports").glob("r*.json")):
        row = gate_row(store, json.loads(path.read_text()), answer, cap)
        if row is not None:
            rows.append(row)
    return rows


def kept_answers(store: Path, versions: tuple[str, ...], cfg, answer: bool = False,
                 questions: int | None = None) -> tuple[list[dict], list[list[str]]] | str:
    """The regression items (the first `questions`, default all) and each version's kept
    greedy replies to them, in order; with `answer` the missing replies are written first.
    A string saying what is missing where a version's replies are not all kept."""
    from training.evaluate import ReplyCache, regression_questions

    class Engine:  # the cache's key needs only the engine's kind, not an engine
        kind = "any"

    regression, asked = regression_questions()
    asked = asked[:questions]
    if answer:
        answer_all(store, versions, asked, cfg)
    kept = [replies_of(store / "training" / "gate_cache", v) for v in versions]
    if None in kept:
        return "a version's kept replies are gone"
    keys = ReplyCache(None, "", Engine(), cfg.repetition_penalty)
    asked = [keys._key(q, cfg.reply_max_new_tokens, None) for q in asked]
    if not all(k in r for k in asked for r in kept):
        return "not every question's replies are kept"
    return regression[:len(asked)], [[r[k] for k in asked] for r in kept]


def gate_row(store: Path, report: dict, answer: bool = False,
             cap: int | None = None) -> dict | None:
    """(c) of one round's report read both ways: on the questions its gate asked, or with
    `answer` on every question of today's set (the replies missing written first). None where
    the round reached no gate or a version's replies are gone."""
    from training.config import RoundConfig, as_ran
    from training.evaluate import answered

    c = ((report.get("gate") or {}).get("checks") or {}).get("c_regression") or {}
    if "questions" not in c:
        return None
    cfg = RoundConfig.from_dict(as_ran(report["config"])).gate
    versions = report["current_version"], report["round"]
    found = kept_answers(store, versions, cfg, answer, None if answer else c["questions"])
    if isinstance(found, str):
        print(f"{store} {report['round']}: {found}, skipped")
        return None
    items, (current, candidate) = found
    tokens = None
    if cap is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(store / "versions" / report["round"] / "model")
        ids = [[tok(r, add_special_tokens=False)["input_ids"] for r in side]
               for side in (current, candidate)]
        current, candidate = ([tok.decode(x[:cap]) for x in side] for side in ids)
        tokens = {"cap": cap, "all": sum(len(x) for side in ids for x in side),
                  "within_cap": sum(min(len(x), cap) for side in ids for x in side)}
    row = {"store": str(store), "round": report["round"], "current": versions[0],
           "questions": len(items), "gate_questions": c["questions"],
           "decision": report["decision"], "gate_c": c["verdict"],
           "before": judged(items, current, candidate, substring, cfg),
           "now": judged(items, current, candidate, answered, cfg), "tokens": tokens}
    if answer:  # (c) as a gate reads it when its time allows the first n questions
        row["by_questions"] = {
            n: judged(items[:n], current[:n], candidate[:n], answered, cfg)
            for n in range(40, len(items) + 1, 40)}
    row["only_before"] = {
        name: sum(substring(it, r) and not answered(it, r) for it, r in zip(items, replies))
        for name, replies in (("current", current), ("candidate", candidate))}
    return row


def line(r: dict) -> str:
    def one(name: str) -> str:
        m = r[name]
        return (f"{name} {m['candidate']} vs {m['current']} ({m['retention']:.0%}; "
                f"-{m['lost']} +{m['gained']}, p {m['sign_test_p']:.3f}, "
                f"{'passes' if m['accuracy_passes'] else 'WORSE'})")
    extra, tokens = r["only_before"], r.get("tokens")
    cut = (f"; cut to {tokens['cap']} tokens: {tokens['within_cap']} of {tokens['all']} "
           "tokens kept" if tokens else "")
    return (f"{Path(r['store']).parent.name} {r['round']}, {r['questions']} questions: "
            f"{one('before')}; {one('now')}; substring-only answers: candidate "
            f"{extra['candidate']}, current {extra['current']}{cut}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, action="append", required=True,
                        help="a bench.loop user's data folder (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "c_match")
    parser.add_argument("--answer", action="store_true",
                        help="every question of today's set, each version's missing replies "
                             "written through its engine first (about 0.4 s a reply)")
    parser.add_argument("--cap", type=int, metavar="N",
                        help="each kept reply cut to its first N tokens first: (c) at a "
                             "shorter reply cap, without generating again")
    args = parser.parse_args(argv)
    if args.cap is not None and args.cap < 1:
        parser.error(f"--cap must be at least 1, not {args.cap}")
    for store in args.store:
        if not (store / "reports").is_dir() or not (store / "training" / "gate_cache").is_dir():
            parser.error(f"{store} holds no reports and training/gate_cache folders: give a "
                         "bench.loop user's data folder, e.g. bench/results/loop/tips/data")
    name = "c_match_all" if args.answer else "c_match"
    path = args.out / (f"{name}_cap{args.cap}.json" if args.cap else f"{name}.json")
    results = earlier_results(path)
    for store in args.store:
        rows = gates(store, args.answer, args.cap)
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
