"""Which of (b)'s two statistics tells a better candidate apart? A replay on `loop.json` rows.

    python -m bench.b_forms [--results bench/results] [--out bench/results/b_forms.json]

The gate's (b) has the judge score both versions' replies to the held-out prompts and keeps two
statistics, each with a bootstrap over the prompts: its direction (the share of prompts where
the candidate's reply scores higher: what (b) counts as better) and its size (the approval it
expects, calibrated on held-out votes, candidate minus current). Every `loop.json` under
`--results` records both one-sided confidences for each round that reached its gate, with (a)'s,
and what the candidate did for its user on the unseen test prompts (the served approval after a
promoted round, a rejected candidate's own where `--measure-rejected` measured it). For each
form of (b), the direction, the size, and both pooled, this counts by how much the candidate
raised approval the rounds the gate's rule would call better: (a) or (b) alone with its
interval above no change (a one-sided confidence above 0.975 at the gate's 95%), or both
pooled (`training.stats.pooled`) at `pooled_confidence`. Recorded gates ran the code of their
day ((a)'s form changed in session 21), so this compares the forms of (b) on the same rounds,
not today's gate; (c) is left out. Rows of a run kept in two folders are counted once. Reads
only; a benchmark of a rule, not a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.config import GateConfig
from training.stats import pooled

RESULTS = Path(__file__).parent / "results"
FORMS = ("direction", "size", "both pooled")
BINS = ((None, 0.055, "at most +5"), (0.055, 0.155, "+6 to +15"), (0.155, 0.295, "+16 to +29"),
        (0.295, None, "+30 or more"))


def recorded(results: Path) -> list[dict]:
    """One row per round that reached its gate and whose candidate was measured."""
    rows, seen = [], set()
    for path in sorted(results.rglob("loop.json")):
        for user, row in json.loads(path.read_text()).get("users", {}).items():
            approval = row.get("approval") or []
            for i, r in enumerate(row.get("rounds") or []):
                t = r.get("training") or {}
                g = t.get("gate") or {}
                sides = [(g.get(k) or {}).get("p_better")
                         for k in ("a_difference", "b_direction", "b_difference")]
                if None in sides or (user, t.get("candidate")) in seen or i >= len(approval):
                    continue
                after = (approval[i + 1] if t.get("decision") == "promoted"
                         and i + 1 < len(approval)
                         else (r.get("rejected_candidate") or {}).get("approval"))
                if after is None:
                    continue
                seen.add((user, t.get("candidate")))
                rows.append({"run": str(path.parent.relative_to(results)), "user": user,
                             "round": i + 1, "decision": t.get("decision"),
                             "change": after - approval[i], "a": sides[0],
                             "direction": sides[1], "size": sides[2]})
    return rows


def alone(cfg: GateConfig) -> float:
    """The one-sided confidence at which a check's two-sided interval leaves no change out."""
    return 1 - (1 - cfg.confidence) / 2


def better(row: dict, form: str, cfg: GateConfig) -> bool:
    b = (pooled([row["direction"], row["size"]]) if form == "both pooled" else row[form])
    return (row["a"] > alone(cfg) or b > alone(cfg)
            or pooled([row["a"], b]) >= cfg.pooled_confidence)


def tally(rows: list[dict], cfg: GateConfig) -> list[dict]:
    out = []
    for low, high, label in BINS:
        chosen = [r for r in rows if (low is None or r["change"] > low)
                  and (high is None or r["change"] <= high)]
        out.append({"change": label, "rounds": len(chosen),
                    **{form: sum(better(r, form, cfg) for r in chosen) for form in FORMS},
                    **{f"{form} alone": sum(r[form] > alone(cfg) for r in chosen)
                       for form in FORMS[:2]}})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.b_forms", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=RESULTS / "b_forms.json")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"{args.results} is not a folder of results")
    rows = recorded(args.results)
    if not rows:
        parser.error(f"no loop.json under {args.results} records (a) and both forms of (b)")
    cfg = GateConfig()
    table = tally(rows, cfg)
    print(f"{len(rows)} recorded rounds; better by the gate's rule ((a) or (b) alone above "
          f"{alone(cfg):g}, or pooled at {cfg.pooled_confidence:g}) with (b) as:")
    print(f"{'approval change':<16} {'rounds':>6} " + " ".join(f"{f:>12}" for f in FORMS)
          + f" {'direction alone':>16} {'size alone':>11}")
    for t in table:
        print(f"{t['change']:<16} {t['rounds']:>6} " + " ".join(f"{t[f]:>12}" for f in FORMS)
              + f" {t['direction alone']:>16} {t['size alone']:>11}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"table": table, "rounds": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
