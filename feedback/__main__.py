"""`python -m feedback import|export|stats`: the store without the browser.

    python -m feedback import conversations.jsonl
    python -m feedback export --votes-out votes.jsonl --pairs-out pairs.jsonl
    python -m feedback stats [--json]

The database is `CHAT_DATABASE_URL`, else the SQLite file in `CHAT_DATA_DIR`; `--database-url`
overrides both for one command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from feedback import io
from feedback.db import transaction
from feedback.errors import FeedbackError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m feedback", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit codes: 0 done, 1 bad input or store fault "
                                            "(nothing written), 2 usage error.")
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: the configured store)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="import conversations with votes from JSONL",
                       description="Import conversations (one JSON object a line). Format:\n"
                                   + io.IMPORT_FORMAT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="JSONL file")
    p = sub.add_parser("export", help="export votes (KTO rows) and pairs (DPO rows) as JSONL")
    p.add_argument("--votes-out", type=Path, help="unpaired rows: prompt, completion, label")
    p.add_argument("--pairs-out", type=Path, help="preference rows: prompt, chosen, rejected")
    p = sub.add_parser("stats", help="counts: votes by model version, reasons, pairs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        if args.command == "import":
            if not args.path.is_file():
                raise FeedbackError(f"{args.path} is not a file.")
            with transaction(write=True, url=args.database_url) as session:
                counts = io.import_jsonl(session=session, path=args.path)
            print("imported " + ", ".join(f"{v} {k}" for k, v in counts.items()) if counts
                  else "the file holds no conversations; nothing imported")
        elif args.command == "export":
            if not (args.votes_out or args.pairs_out):
                raise FeedbackError("Say where to write: --votes-out FILE and/or --pairs-out FILE.")
            if args.votes_out and args.pairs_out and \
                    args.votes_out.resolve() == args.pairs_out.resolve():
                raise FeedbackError(f"--votes-out and --pairs-out are both {args.votes_out}: "
                                    f"the pairs would overwrite the votes; give two files.")
            with transaction(url=args.database_url) as session:
                if args.votes_out:
                    n = io.write_jsonl(io.iter_vote_rows(session=session), args.votes_out)
                    print(f"{n} vote rows -> {args.votes_out}")
                if args.pairs_out:
                    n = io.write_jsonl(io.iter_pair_rows(session=session), args.pairs_out)
                    print(f"{n} preference pairs -> {args.pairs_out}")
        else:
            with transaction(url=args.database_url) as session:
                s = io.stats(session=session)
            if args.json:
                print(json.dumps(s, indent=2))
            else:
                print(_format_stats(s))
    except FeedbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if getattr(exc, "detail", ""):
            print(f"  ({exc.detail})", file=sys.stderr)
        return 1
    return 0


def _format_stats(s: dict) -> str:
    lines = [f"users {s['users']}  conversations {s['conversations']}  messages {s['messages']}  "
             f"replies {s['replies']}",
             f"votes: {s['votes_up']} up, {s['votes_down']} down, "
             f"{s['votes_withdrawn']} withdrawn",
             "preferences: " + (", ".join(f"{n} {k}" for k, n in s["preferences"].items())
                                or "none"),
             "", f"{'model version':<32} {'up':>5} {'down':>5} {'approval':>9}"]
    for version, row in sorted(s["by_model_version"].items()):
        approval = f"{row['approval']:.0%}" if row["approval"] is not None else "-"
        lines.append(f"{version:<32} {row['up']:>5} {row['down']:>5} {approval:>9}")
    if s["reasons"]:
        lines += ["", "reasons: " + ", ".join(f"{k} ({n})" for k, n in s["reasons"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
