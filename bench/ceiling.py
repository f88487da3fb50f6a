"""Would `data.min_disliked_share` have changed the recorded rounds? A replay on `loop.json` rows.

    python -m bench.ceiling [--results bench/results] [--min-share 0.1]
        [--out bench/results/ceiling.json]

A round trains only while users may still dislike at least `min_disliked_share` of the serving
version's own replies (`training.round.liked_enough`, the top of the Wilson interval at the gate's
confidence). Every `loop.json` under `--results` records, per user and round, the votes the
simulated user cast on the serving version's replies before the round (`votes`), what the round
decided and the approval it left (measured on unseen test prompts, with a rejected candidate's
own approval where `--measure-rejected` measured it). Votes on a version add up while it serves:
after a rejected round the next one sees both rounds' votes, as the store does. Rows recorded since
session 25 carry the round's own count (`serving_votes`), which is used as it is. The same run kept
in two folders is counted once. Prints one line per round and the summary: which rounds the rule
would skip and what they did, and the least room any round that gained had. Writes the rows and
the summary to `--out`. Reads only; a benchmark of a rule, not a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.config import DataConfig, GateConfig
from training.dataset import own_counts
from training.round import liked_enough

RESULTS = Path(__file__).parent / "results"


def user_rounds(label: str, user: str, row: dict, min_share: float, confidence: float) -> list:
    out, version, liked, votes = [], None, 0, 0
    approval = row.get("approval") or []
    for i, r in enumerate(row.get("rounds") or []):
        t, v = r.get("training") or {}, r.get("votes") or {}
        serving = (row.get("versions") or [None] * (i + 1))[i]
        if serving != version:  # a new version serves: its votes start from nothing
            version, liked, votes = serving, 0, 0
        liked, votes = liked + v.get("liked", 0), votes + v.get("votes", 0)
        own = t.get("serving_votes")
        if not own or not own.get("votes"):
            own = own_counts(serving, votes, votes - liked, confidence=confidence)
        before = approval[i] if i < len(approval) else None
        served = approval[i + 1] if i + 1 < len(approval) else None
        rejected = (r.get("rejected_candidate") or {}).get("approval")
        candidate = served if t.get("decision") == "promoted" else rejected
        out.append({"run": label, "user": user, "round": i + 1, "own_votes": own["votes"],
                    "own_disliked": own["disliked"],
                    "disliked_high": (own["disliked_share"] or {}).get("high"),
                    "rule": "skip" if liked_enough(own, min_share) else "train",
                    "decision": t.get("decision"), "approval_before": before,
                    "approval_served_after": served, "approval_candidate": candidate,
                    "candidate_change": None if candidate is None or before is None
                    else candidate - before})
    return out


def replay(results: Path, min_share: float, confidence: float) -> list[dict]:
    rows, seen = [], set()
    for path in sorted(results.rglob("loop.json")):
        label = str(path.parent.relative_to(results))
        for user, row in json.loads(path.read_text()).get("users", {}).items():
            key = json.dumps([row.get("approval"), [r.get("votes") for r in row.get("rounds", [])]])
            if key in seen or not row.get("rounds"):
                continue
            seen.add(key)
            rows += user_rounds(label, user, row, min_share, confidence)
    return rows


def summary(rows: list[dict], min_share: float) -> dict:
    skipped = [r for r in rows if r["rule"] == "skip"]
    gained = [r for r in rows if (r["candidate_change"] or 0) >= 0.02]
    return {"min_disliked_share": min_share, "rounds": len(rows),
            "skipped": [{k: r[k] for k in ("run", "user", "round", "decision",
                                           "candidate_change", "disliked_high")}
                        for r in skipped],
            "skipped_served_change": sum((r["approval_served_after"] or 0) - r["approval_before"]
                                         for r in skipped if r["approval_before"] is not None),
            "gained_rounds": len(gained),
            "least_room_of_a_gain": min((r["disliked_high"] for r in gained
                                         if r["disliked_high"] is not None), default=None)}


def fmt(x: float | None, spec: str = ".0%") -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--min-share", type=float, default=DataConfig().min_disliked_share)
    parser.add_argument("--out", type=Path, default=RESULTS / "ceiling.json")
    args = parser.parse_args(argv)
    confidence = GateConfig().confidence
    rows = replay(args.results, args.min_share, confidence)
    if not rows:
        parser.error(f"no loop.json with rounds under {args.results}")
    print(f"{'run':<22} {'user':<24} rnd {'own votes':>10} {'disliked <=':>11} rule  "
          f"{'decision':>9} {'before':>6} {'candidate':>9} {'change':>7}")
    for r in rows:
        print(f"{r['run']:<22} {r['user'][:24]:<24} {r['round']:>3} "
              f"{r['own_disliked']:>4}/{r['own_votes']:<5} {fmt(r['disliked_high'], '.1%'):>11} "
              f"{r['rule']:<5} {r['decision'] or '-':>9} {fmt(r['approval_before']):>6} "
              f"{fmt(r['approval_candidate']):>9} {fmt(r['candidate_change'], '+.0%'):>7}")
    s = summary(rows, args.min_share)
    print(f"\nmin_disliked_share {args.min_share:.0%}: {len(s['skipped'])} of {s['rounds']} "
          f"rounds skipped; their candidates' changes: "
          + ", ".join(f"{r['user']} {r['run']} r{r['round']} {fmt(r['candidate_change'], '+.0%')}"
                      for r in s["skipped"])
          + f"; served approval they changed, summed: {s['skipped_served_change']:+.0%}. "
          f"{s['gained_rounds']} rounds gained at least 2 points; the least room any had: "
          f"{fmt(s['least_room_of_a_gain'], '.1%')}.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": s, "rounds": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
