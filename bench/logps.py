"""How fast the gate's (a) scores held-out votes: `training.evaluate.mean_logps` (one row at a
time, the vocabulary head over the reply only) against the padded batches of 8 it replaced
(log-softmax over every position's whole vocabulary), on the same rows and model.

    python -m bench.logps --store bench/results/loop/concise/data [--version V] [--rows 32]
        [--out bench/results/logps.json]

Rows: the store's held-out votes (its latest round's split), else the bundled prompts with
their replies unknown; prints seconds a row for both, the ratio and the largest difference
between their figures (they must agree), and writes them to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


@torch.inference_mode()
def padded_batches(loaded, rows: list[dict], batch_size: int = 8) -> list[float]:
    """The reference: right-padded batches, the whole vocabulary at every position."""
    from training.evaluate import chat_ids

    model = loaded.model
    encoded = [chat_ids(loaded.tokenizer, r["prompt"], r["completion"], loaded.context_window)
               for r in rows]
    out = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in chunk])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])[..., 0]
        for row, (row_ids, p_len) in enumerate(chunk):
            reply = logp[row, p_len - 1:len(row_ids) - 1]
            out.append(float(reply.mean()) if len(reply) else 0.0)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, required=True,
                        help="a data folder with feedback.db and reports/ (a bench.loop store)")
    parser.add_argument("--version", default=None, help="model version (default: the base)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "logps.json")
    args = parser.parse_args(argv)
    os.environ["CHAT_DATA_DIR"] = str(args.store)

    from serving.config import ServingConfig
    from serving.hardware import resolve_dtype
    from serving.registry import Registry
    from training.config import RoundConfig, as_ran
    from training.dataset import load_feedback, split
    from training.evaluate import alternating, mean_logps

    reports = sorted((args.store / "reports").glob("*.json"))
    if not reports:
        parser.error(f"no round report in {args.store / 'reports'}: run bench.loop first")
    cfg = RoundConfig.from_dict(as_ran(json.loads(reports[-1].read_text())["config"]))
    _, heldout = split(load_feedback(cfg.data, url=f"sqlite:///{args.store / 'feedback.db'}"),
                       cfg.data)
    rows = alternating(heldout.votes, cfg.gate.seed)[:args.rows]
    loaded = Registry().load(args.version, ServingConfig(dtype=resolve_dtype()))
    timings, figures = {}, {}
    for name, fn in (("padded_batches_of_8", padded_batches), ("row_by_row", mean_logps)):
        t = time.perf_counter()
        figures[name] = fn(loaded, rows)
        timings[name] = (time.perf_counter() - t) / len(rows)
        print(f"{name}: {timings[name]:.3f} s a row", flush=True)
    result = {"version": loaded.version, "dtype": resolve_dtype(), "rows": len(rows),
              "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "seconds_a_row": timings,
              "speedup": timings["padded_batches_of_8"] / timings["row_by_row"],
              "max_difference": max(abs(a - b) for a, b in zip(*figures.values()))}
    print(f"row by row is {result['speedup']:.2f}x the padded batches; figures differ by at "
          f"most {result['max_difference']:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
