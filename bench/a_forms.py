"""(a)'s summary of a reply's shift in log-probability, as the gate takes it (the mean over the
reply's tokens) and in other forms, on a store's past rounds.

    python -m bench.a_forms --store bench/results/loop/tips/data [--rounds R1,R2]
        [--out bench/results/a_forms]

(a) ranks the held-out votes by the candidate's log-probability of each reply minus the serving
version's, averaged over the reply's tokens. A preference that lives in a few words of a long
reply (a tip, an example) moves few tokens, and the mean may drown it. For each round of the
store that reached its gate (or those named), every held-out vote as the round split them
(`bench.gate_replay.round_data`) is scored token by token by the round's serving version and
candidate (as the gate scores them: `training.evaluate.reply_token_logps`), and the per-token
shifts are summed up in several ways; prints and writes the AUC of each against the users' thumbs
(`a_forms.json`, the rows under the store's folder; other stores' rows kept). The mean is the
gate's (a) on the same votes (equal to the round's own where its gate scored every vote).
Exploratory: it picks no form, and one chosen by looking at these AUCs needs fresh rounds to
show it holds. About 1.1 s a vote on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

FORMS = {
    "mean": lambda s: s.mean(),  # the gate's
    "sum": lambda s: s.sum(),
    "max token": lambda s: s.max(),
    "top 5 tokens' mean": lambda s: s.topk(min(5, len(s))).values.mean(),
    "top 10% tokens' mean": lambda s: s.topk(max(1, len(s) // 10)).values.mean(),
}


def rounds_of(store: Path, names: list[str], work: Path) -> list[dict]:
    """One row per gated round of `store` (those in `names`, unless empty): each form's AUC.
    Its scratch copies of the database go to `work`."""
    from bench.gate_replay import gated_rounds, round_data
    from serving.config import ServingConfig
    from serving.registry import Registry
    from training.evaluate import reply_token_logps
    from training.stats import auc

    registry, fp32 = Registry(), ServingConfig(dtype="float32")
    rows = []
    for report in gated_rounds(store, names):
        current_name, candidate_name = report["current_version"], report["round"]
        _, _, heldout = round_data(store, report, work / f"{candidate_name}.db")
        votes, t = heldout.votes, time.monotonic()
        current, candidate = (registry.load(n, fp32) for n in (current_name, candidate_name))
        scores = {form: [] for form in FORMS}
        for vote in votes:
            cur, cand = (reply_token_logps(m, vote) for m in (current, candidate))
            for form, summary in FORMS.items():  # an empty reply: no shift
                scores[form].append(0.0 if cur is None else float(summary(cand - cur)))
        labels = [v["label"] for v in votes]
        row = {"round": candidate_name, "current": current_name, "votes": len(votes),
               "liked": sum(labels), "seconds": round(time.monotonic() - t, 1),
               "auc": {form: auc(s, labels) for form, s in scores.items()},
               "gate_a": {k: report["gate"]["checks"]["a_heldout_ranking"].get(k)
                          for k in ("auc", "votes")}}
        print(f"{store} {candidate_name} (current {current_name}), {len(votes)} votes "
              f"({row['liked']} liked): " + ", ".join(f"{f} {a:.3f}" for f, a in row["auc"].items())
              + f"; the gate's (a) {row['gate_a']['auc']:.3f} on {row['gate_a']['votes']}",
              flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, required=True,
                        help="a bench.loop user's data folder, its version folders kept")
    parser.add_argument("--rounds", default="", help="round ids, comma-separated (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "a_forms")
    args = parser.parse_args(argv)
    if not (args.store / "feedback.db").is_file() or not (args.store / "reports").is_dir():
        parser.error(f"{args.store} holds no feedback.db and reports folder: give a bench.loop "
                     "user's data folder, e.g. bench/results/loop/tips/data")
    from bench.gate_replay import fresh_work, keep_rows

    args.out.mkdir(parents=True, exist_ok=True)
    work = fresh_work(args.out, args.store)
    rows = rounds_of(args.store, [r for r in args.rounds.split(",") if r], work)
    if not rows:
        shutil.rmtree(work, ignore_errors=True)
        parser.error(f"no round with a gate among {args.store / 'reports'}")
    return keep_rows(args.out / "a_forms.json", str(args.store), rows, work)


if __name__ == "__main__":
    main()
