"""Are the gate's greedy replies the same in every run? Only where they are decoded in the same
batches.

    python -m bench.reply_batching [--questions 40] [--out bench/results/reply_batching_zen3_s41]

The serving version (the data folder's CURRENT: the embedded model on a fresh folder), through
llama.cpp as the gate uses it, answers (c)'s first `--questions` regression questions greedily
at (c)'s reply length and repetition penalty four ways: twice in chunks of 20 over 8 slots (as
`prepare` and the gate ask them), once in chunks of 8 over 8 slots, once one at a time on one
slot. Counts, for each way, the replies that differ from the first run's and the answers (c)
counts correct. A reply that differs with its batch moves (b) and (c) between two runs of one
gate on the same models, which their intervals (drawn over prompts) do not include. Writes
`reply_batching.json` (the replies too); prints a table. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

WAYS = (("chunks of 20, 8 slots", 8, 20), ("chunks of 20, 8 slots, again", 8, 20),
        ("chunks of 8, 8 slots", 8, 8), ("one at a time, 1 slot", 1, 1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "reply_batching")
    args = parser.parse_args(argv)
    if args.questions < 1:
        parser.error("--questions must be at least 1")

    from serving.backends import open_engine
    from serving.config import ServingConfig
    from serving.registry import Registry
    from training.config import GateConfig
    from training.evaluate import answered, answers, regression_questions

    cfg, registry = GateConfig(), Registry()
    regression, questions = regression_questions()
    regression, questions = regression[:args.questions], questions[:args.questions]
    rows, first = [], None
    for name, slots, chunk in WAYS:
        engine = open_engine(registry, None, ServingConfig(slots=slots))
        start, got = time.monotonic(), []
        try:
            for i in range(0, len(questions), chunk):
                got += answers(engine, questions[i:i + chunk], cfg.reply_max_new_tokens,
                               cfg.repetition_penalty)
        finally:
            engine.close()
        first = first or got
        rows.append({"way": name, "slots": slots, "chunk": chunk,
                     "seconds": round(time.monotonic() - start, 1),
                     "differ_from_first": sum(a != b for a, b in zip(first, got)),
                     "correct": sum(map(answered, regression, got)),
                     "replies": got})
    result = {"version": registry.current_name(), "questions": len(questions),
              "max_new_tokens": cfg.reply_max_new_tokens,
              "repetition_penalty": cfg.repetition_penalty, "ways": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reply_batching.json").write_text(json.dumps(result, indent=1))
    print(f"{result['version']}, {len(questions)} questions, greedy, "
          f"{cfg.reply_max_new_tokens} new tokens")
    print(f"{'way':32} {'seconds':>8} {'differ from the first':>22} {'correct':>8}")
    for r in rows:
        print(f"{r['way']:32} {r['seconds']:>8} {r['differ_from_first']:>22} "
              f"{r['correct']:>8}")
    return result


if __name__ == "__main__":
    main()
