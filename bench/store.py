"""The store under load: vote writes per second and their latency, and import speed.

    python -m bench.store [--out bench/results] [--votes 400]

Separate processes (as separate page servers would be) cast votes on a real SQLite file in
WAL mode: 1, 4, 8 and 16 writers, each vote its own write transaction (as the page writes one),
then 8 writers while a 5,000-conversation import runs. Counts every vote lost (an exception, or
missing from the database afterwards). Prints a table, writes `store.json`. Nothing passes or
fails here; the targets are in the README.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _conversation(i: int) -> dict:
    return {"user": f"u{i % 50}", "messages": [
        {"role": "user", "content": f"Question {i}: how do I do thing {i}?"},
        {"role": "assistant", "content": "Do it like this. " * 10,
         "vote": {"value": 1, "reasons": ["clear"]}, "rejected": ["A worse answer."]},
        {"role": "user", "content": "Thanks, and then?"},
        {"role": "assistant", "content": "Then that. " * 8, "vote": -1}]}


def _writer(data: str, message_ids: list[int], user_id: int, ready, go, out) -> None:
    os.environ["CHAT_DATA_DIR"] = data
    from feedback import db, store
    db.get_engine()  # opened before the clock starts, as a running page server has it
    ready.put(1)
    go.wait()
    began = time.time()
    latencies, errors = [], 0
    for i, mid in enumerate(message_ids):
        start = time.perf_counter()
        try:
            with db.transaction(write=True) as s:
                store.set_vote(session=s, user_id=user_id, message_id=mid,
                               value=1 if i % 2 else -1, reasons=[])
        except Exception:  # noqa: BLE001 - counted: a lost vote
            errors += 1
        latencies.append(time.perf_counter() - start)
    out.put((latencies, errors, began, time.time()))


def _importer(data: str, path: str, ready, go, out) -> None:
    os.environ["CHAT_DATA_DIR"] = data
    from feedback import db, io
    db.get_engine()
    ready.put(1)
    go.wait()
    start = time.perf_counter()
    with db.transaction(write=True) as s:
        counts = io.import_jsonl(session=s, path=Path(path))
    out.put(("import", counts["conversations"], time.perf_counter() - start))


def _setup(data: str, writers: int, per_writer: int) -> tuple[list[list[int]], list[int]]:
    """Each writer gets its own user with replies to vote on (votes are per user)."""
    os.environ["CHAT_DATA_DIR"] = data
    from feedback import db, store
    ids, users = [], []
    with db.transaction(write=True) as s:
        for w in range(writers):
            uid = store.get_or_create_user(session=s, username=f"writer{w}").id
            conv = store.create_conversation(session=s, user_id=uid)
            mine = []
            for i in range(per_writer):
                q = store.add_user_message(session=s, user_id=uid, conversation_id=conv.id,
                                           content=f"q{i}")
                mine.append(store.add_reply(session=s, user_id=uid, parent_id=q.id,
                                            content="a", model_version="m",
                                            generation_settings={}).id)
            ids.append(mine)
            users.append(uid)
    return ids, users


def run(writers: int, total_votes: int, import_path: str | None = None) -> dict:
    data = tempfile.mkdtemp(prefix="bench-store-")
    per_writer = max(1, total_votes // writers)
    ids, users = _setup(data, writers, per_writer)
    ctx = mp.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_writer, args=(data, ids[w], users[w], ready, go, out))
             for w in range(writers)]
    if import_path:
        procs.append(ctx.Process(target=_importer, args=(data, import_path, ready, go, out)))
    for p in procs:
        p.start()
    for _ in procs:  # every process has imported its code and opened the database
        ready.get()
    go.set()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    spans = [r for r in results if r[0] != "import"]
    wall = max(r[3] for r in spans) - min(r[2] for r in spans)
    latencies = sorted(x for r in results if r[0] != "import" for x in r[0])
    errors = sum(r[1] for r in results if r[0] != "import")
    os.environ["CHAT_DATA_DIR"] = data
    from feedback import db
    from sqlalchemy import text
    with db.transaction(url=f"sqlite:///{data}/feedback.db") as s:
        stored = s.execute(text("select count(*) from votes where user_id in "
                                f"({','.join(map(str, users))})")).scalar()
    row = {"writers": writers, "votes": len(latencies), "lost": errors + len(latencies) - stored,
           "votes_per_s": len(latencies) / wall,
           "p50_ms": 1000 * statistics.median(latencies),
           "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}
    for r in results:
        if r[0] == "import":
            row["import"] = {"conversations": r[1], "seconds": r[2],
                             "conversations_per_s": r[1] / r[2]}
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--votes", type=int, default=400, help="votes per configuration")
    args = parser.parse_args(argv)
    big = Path(tempfile.mkdtemp(prefix="bench-import-")) / "import.jsonl"
    big.write_text("".join(json.dumps(_conversation(i)) + "\n" for i in range(5000)))
    rows = [run(w, args.votes) for w in (1, 4, 8, 16)]
    rows.append({**run(8, args.votes, str(big)), "during_import": True})
    report = {"measured_at": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'writers':>8} {'votes/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'lost':>5}")
    for r in rows:
        extra = ""
        if "import" in r:
            extra = (f"  (during an import: {r['import']['conversations']} conversations in "
                     f"{r['import']['seconds']:.1f}s, "
                     f"{r['import']['conversations_per_s']:.0f}/s)")
        print(f"{r['writers']:>8} {r['votes_per_s']:>8.0f} {r['p50_ms']:>7.1f} "
              f"{r['p99_ms']:>7.1f} {r['lost']:>5}{extra}")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
