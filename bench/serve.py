"""Serving speed through the page's own path: time to first token and decode tokens/s.

    python -m bench.serve [--out bench/results] [--max-new-tokens 128] [--runs 3]

Measures one stream alone, then 4 streams started together, each through `Engine.submit` and
`Reply.stream()` exactly as the chat page consumes them, then the aggregate throughput of the
batch path (`Engine.generate`, what `python -m serving generate` uses) at batch 1 and 32, on the current model version (the
embedded one unless `CHAT_MODEL` or a promotion says otherwise). Prints a table and writes
`serve.json`. A benchmark, not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from serving.config import GenerationSettings, ServingConfig
from serving.engine import Engine
from serving.registry import Registry

PROMPTS = [
    "Explain how a rainbow forms.",
    "Give me three tips for a job interview.",
    "What is the difference between a virus and a bacterium?",
    "Write a short poem about autumn.",
]


def consume(engine: Engine, prompt: str, settings: GenerationSettings, out: dict) -> None:
    start = time.monotonic()
    reply = engine.submit([{"role": "user", "content": prompt}], settings)
    first = None
    for _ in reply.stream(poll_s=0.01):
        if first is None:
            first = time.monotonic()
    end = time.monotonic()
    out.update(ttft_s=first - start, total_s=end - start, tokens=reply.n_tokens,
               decode_tok_s=(reply.n_tokens - 1) / max(end - first, 1e-9))


def run_streams(engine: Engine, n: int, settings: GenerationSettings) -> dict:
    results = [{} for _ in range(n)]
    threads = [threading.Thread(target=consume, args=(engine, PROMPTS[i % len(PROMPTS)],
                                                       settings, results[i])) for i in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    return {
        "streams": n,
        "ttft_s_mean": statistics.mean(r["ttft_s"] for r in results),
        "ttft_s_max": max(r["ttft_s"] for r in results),
        "per_stream_decode_tok_s": statistics.mean(r["decode_tok_s"] for r in results),
        "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
        "tokens": sum(r["tokens"] for r in results),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="repeats; the median is reported")
    parser.add_argument("--dtype", default=ServingConfig().dtype)
    args = parser.parse_args(argv)

    config = ServingConfig(dtype=args.dtype)
    loaded = Registry().load(config=config)
    engine = Engine(loaded, config)
    # A fixed length makes runs comparable: sampling on, but the eos token is never final.
    settings = GenerationSettings(temperature=0.7, max_new_tokens=args.max_new_tokens, seed=0)
    loaded.eos_ids.clear()
    run_streams(engine, 1, GenerationSettings(max_new_tokens=8))  # warm-up
    rows = []
    for n in (1, 4):
        runs = [run_streams(engine, n, settings) for _ in range(args.runs)]
        rows.append({k: statistics.median(r[k] for r in runs) for k in runs[0]})
    batches = []
    for size in (1, 32):
        start = time.monotonic()
        done = engine.generate([[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
                                for i in range(size)], settings)
        wall = time.monotonic() - start
        batches.append({"batch": size, "tokens": sum(r.n_tokens for r in done),
                        "seconds": round(wall, 2),
                        "aggregate_tok_s": sum(r.n_tokens for r in done) / wall})
    engine.close()
    report = {"model_version": loaded.version, "dtype": args.dtype, "batch": batches,
              "max_new_tokens": args.max_new_tokens, "runs": args.runs,
              "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or
              platform.machine(), "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"model {loaded.version} ({args.dtype}), {args.max_new_tokens} new tokens, "
          f"median of {args.runs}")
    print(f"{'streams':>7} {'TTFT mean':>10} {'TTFT max':>9} {'tok/s each':>11} "
          f"{'tok/s total':>12}")
    for r in rows:
        print(f"{r['streams']:>7} {r['ttft_s_mean']:>9.2f}s {r['ttft_s_max']:>8.2f}s "
              f"{r['per_stream_decode_tok_s']:>11.1f} {r['aggregate_tok_s']:>12.1f}")
    for b in batches:
        print(f"batch {b['batch']:>2}: {b['aggregate_tok_s']:.1f} tok/s aggregate")
    print(f"saved {args.out / 'serve.json'}")
    return report


if __name__ == "__main__":
    main()
