"""`python -m training run|status|rollback|schedule`: the learning loop without the browser.

    python -m training run [--max-minutes N] [--config round.json] [--method kto|dpo|online|auto]
    python -m training status [--json]
    python -m training rollback [VERSION]
    python -m training schedule --min-new-votes 50 --interval-minutes 30
    python -m training prepare [--max-minutes N] [--config round.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

STARTED = time.monotonic()  # `run --max-minutes` counts from here: the imports take seconds

from serving.setting import add_flags, given
from training.config import ConfigError, RoundConfig, TuneConfig

RUN_EXIT_CODES = """exit codes:
  0  the candidate passed the gate and now serves
  1  an error (the message says what); serving is unchanged
  2  usage error
  3  not enough feedback (too few votes, or one label only); serving is unchanged
  4  another round is running
  5  the candidate failed the gate; the current version keeps serving (see the report)
  6  users like nearly all the serving version's replies (data.min_disliked_share): no round
     trains; the current version keeps serving"""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    sub = parser.add_subparsers(dest="command", required=True)

    def round_options(p):
        p.add_argument("--config", type=Path, help="JSON with RoundConfig fields to override, "
                       'e.g. {"tune": {"learning_rate": 1e-4}, "gate": {"min_retention": 0.9}}')
        add_flags(p, RoundConfig, ["max_minutes"])
        add_flags(p, TuneConfig, ["method", "full_finetune"])

    p = sub.add_parser("run", help="one round: data, reward model, tuning, gate, promote or not",
                       epilog=RUN_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    round_options(p)
    p = sub.add_parser("status", help="versions, the current one, the last rounds")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("rollback", help="serve VERSION (default: the one before the current)")
    p.add_argument("version", nargs="?")
    p = sub.add_parser("schedule", help="run a round whenever enough new votes arrived",
                       epilog=RUN_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    round_options(p)
    p.add_argument("--min-new-votes", type=int, default=50)
    p.add_argument("--interval-minutes", type=float, default=30.0)
    p.add_argument("--max-checks", type=int, help="stop after this many checks (default: never)")
    p.add_argument("--no-prepare", action="store_true",
                   help="do not prepare the next gate between rounds (see `prepare`)")
    p = sub.add_parser(
        "prepare", help="compute the serving version's half of the next gate, and the "
        "tuning's reference, now, off the round's clock", description="The serving version's "
        "replies to the gate's regression questions and held-out prompts, and its and the base "
        "model's log-probabilities of the held-out votes, kept where the next round's gate "
        "reads them: that gate then computes only the candidate's, and judges more prompts and "
        "votes in its time. Also the reference log-probabilities of the training pairs under "
        "the version the next round tunes (when it will run DPO): its steps then skip the "
        "reference forward (a fifth of a step on a 2-core CPU). What is kept already costs "
        "nothing. `schedule` runs it between rounds.")
    p.add_argument("--config", type=Path, help="JSON with RoundConfig fields (its data, gate "
                   "and tune settings are the round's)")
    add_flags(p, RoundConfig, ["max_minutes"])
    return parser


def round_config(args) -> RoundConfig:
    cfg = RoundConfig()
    if args.config:  # a partial config: every field it leaves out keeps its default
        try:
            cfg = RoundConfig.from_dict(json.loads(args.config.read_text()))
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {args.config}: "
                              f"{exc.strerror or exc}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{args.config} is not valid JSON: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"{args.config}: {exc}") from exc
    # the flags override the file; `add_flags` checked each against its declaration
    for section, names in ((cfg, ["max_minutes"]), (cfg.tune, ["method", "full_finetune"])):
        for name, value in given(args, names).items():
            setattr(section, name, value)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from feedback.errors import FeedbackError
    from serving.model import ModelUnavailable
    from serving.registry import Registry, UnknownVersion
    from training.lock import RoundBusy
    from training.round import BUSY, ERROR, USAGE, run_round, status

    try:
        echo = functools.partial(print, flush=True)  # lines reach a pipe as they happen
        if args.command == "run":
            return run_round(round_config(args), log=echo, started=STARTED).exit_code
        if args.command == "schedule":
            from training.schedule import run_schedule
            for flag, value, bad, rule in (
                    ("--min-new-votes", args.min_new_votes, args.min_new_votes < 1,
                     "at least 1"),
                    ("--interval-minutes", args.interval_minutes,
                     not 0 < args.interval_minutes < float("inf"), "a finite number above 0"),
                    ("--max-checks", args.max_checks,
                     args.max_checks is not None and args.max_checks < 1, "at least 1")):
                if bad:  # before any check: a wrong flag never loops or runs a round
                    raise ConfigError(f"{flag} must be {rule}, not {value}.")
            return run_schedule(round_config(args), min_new_votes=args.min_new_votes,
                                interval_s=args.interval_minutes * 60,
                                max_checks=args.max_checks, prepare=not args.no_prepare,
                                log=echo)
        if args.command == "prepare":
            from training.round import prepare_gate, prepared_line
            done = prepare_gate(round_config(args), log=echo, started=STARTED)
            print(f"prepared in {done['seconds']:.0f}s: {prepared_line(done)}")
            return 0
        if args.command == "status":
            s = status()
            print(json.dumps(s, indent=2) if args.json else format_status(s))
            return 0
        registry = Registry()
        target = args.version or registry.previous()
        if target is None:
            print("error: nothing to roll back to: no earlier version has served. "
                  "Name one: python -m training rollback VERSION", file=sys.stderr)
            return USAGE
        was = registry.current_name()
        registry.set_current(target, why="rollback")
        print(f"{target} now serves (was {was})")
        return 0
    except RoundBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BUSY
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except (FeedbackError, ModelUnavailable, UnknownVersion, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ERROR


def format_status(s: dict) -> str:
    from training.round import prepared_line

    lines = [f"serving: {s['current']}   (base: {s['base']})",
             f"machine: {s['machine']['dtype']}, {s['machine']['threads']} threads, llama.cpp "
             f"weight repacking {s['machine']['llama_repack']}", ""]
    if s.get("current_problem"):
        lines[1:1] = [f"warning: {s['current_problem']}"]
    lines += [f"{'version':<22} {'parent':<22} {'method':<7} {'votes':>6}  created"]
    for v in s["versions"]:
        mark = " *" if v["name"] == s["current"] else ""
        lines.append(f"{v['name'] + mark:<22} {v['parent'] or '':<22} {v['method'] or '':<7} "
                     f"{v['votes'] or 0:>6}  {(v['created_at'] or '')[:19]}")
    if p := s.get("prepared"):
        lines += ["", f"next gate prepared for {p['version']} at {p['finished_at'][:19]}: "
                  f"{prepared_line(p)}"]
    if s["rounds"]:
        lines += ["", "last rounds:"]
        lines += [f"  {r['round']}  {r['decision']:<9} {r['message']}" for r in s["rounds"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
