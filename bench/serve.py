"""Serving speed against its anchor, in one run: llama.cpp itself on the same GGUF file.

    python -m bench.serve [--out bench/results] [--max-new-tokens 128] [--runs 3]
                          [--generate-rows 300] [--no-transformers]

Measures, on the current version (the embedded model unless `CHAT_MODEL` or a promotion says
otherwise), through the page's own path (`open_engine`, `Reply.stream()`):
- one stream: time to first token (TTFT) and decode tokens/s (after the first token), beside
  llama-cpp-python's own `Llama` on the very same GGUF file and thread count (the anchor);
- 4 and 8 streams started together: aggregate tokens/s and the slowest first token;
- turn 10 of a conversation vs turn 1: TTFT (the evaluated prefix is reused), and the same
  ten turns through the anchor (`Llama` reuses the prefix it evaluated last, as its server does);
- llama.cpp's own ceiling for batching: one `llama_decode` of one token for each of 8 sequences
  against one token for one sequence, on the same file and context (no Python, no sampling);
- `python -m serving generate`'s path on `--generate-rows` rows of `bench/prompts.jsonl`;
- the transformers engine's one stream, for reference (`--no-transformers` skips it).
Prints a table with each ratio, writes `serve.json` and `serve.png`. Nothing passes or fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

from serving.backends import open_engine
from serving.chat import build_prompt
from serving.config import GenerationSettings, ServingConfig
from serving.hardware import dtype_reason, threads
from serving.registry import Registry

PROMPTS = [
    "Explain how a rainbow forms.",
    "Give me three tips for a job interview.",
    "What is the difference between a virus and a bacterium?",
    "Write a short poem about autumn.",
    "How do I make a good cup of tea?",
    "Why is the sky blue?",
    "Describe a walk in a forest.",
    "What should I pack for a weekend trip?",
]
ROOT = Path(__file__).resolve().parent


def one_stream(engine, messages, settings) -> dict:
    start = time.monotonic()
    reply = engine.submit(messages, settings)
    for _ in reply.stream(poll_s=0.005):
        pass
    end = time.monotonic()
    first = reply.first_token_at or end
    return {"ttft_s": first - start, "tokens": reply.n_tokens,
            "decode_tok_s": (reply.n_tokens - 1) / max(end - first, 1e-9)}


def streams(engine, n: int, settings) -> dict:
    results: list[dict] = [{} for _ in range(n)]
    start = time.monotonic()

    def run(i: int) -> None:
        results[i] = one_stream(engine, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                settings)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.monotonic() - start
    return {"streams": n, "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
            "max_ttft_s": max(r["ttft_s"] for r in results)}


TOPICS = ["the moon", "bees", "glass", "rivers", "bread", "clocks", "salt", "maps", "violins",
          "tides"]  # a conversation no slot has seen: turn 1 starts cold


class Anchor:
    """llama-cpp-python's `Llama` on the same file (the engine a user would pick instead), in
    a process of its own: two llama.cpp contexts driven from two threads of one process slow
    each other (their OpenMP thread teams spin on the same two cores; measured: our engine
    went from 141 to 107 tok/s once a `Llama` had run beside it in the process)."""

    def __init__(self, path: Path, tokenizer) -> None:
        import multiprocessing

        self.tokenizer = tokenizer
        self._conn, child = multiprocessing.get_context("spawn").Pipe()
        self._process = multiprocessing.get_context("spawn").Process(
            target=_anchor_worker, args=(child, str(path), threads()), daemon=True)
        self._process.start()

    def complete(self, messages: list[dict], settings: GenerationSettings) -> tuple[dict, str]:
        ids = build_prompt(self.tokenizer, messages, context_window=4096,
                           max_new_tokens=settings.max_new_tokens).input_ids
        self._conn.send((list(ids), settings.to_dict()))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)


def _anchor_worker(conn, path: str, n_threads: int) -> None:
    from llama_cpp import Llama

    from serving.llamacpp import repack_as_set_for_library
    repack_as_set_for_library()  # the same weights as the engine under test (no AMX crash)

    llm = Llama(path, n_ctx=4096, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    while (request := conn.recv()) is not None:
        ids, s = request
        # no reset: like our engine, `Llama` reuses the prompt start it evaluated last time
        start = time.monotonic()
        first, n, text = None, 0, []
        for chunk in llm.create_completion(ids, max_tokens=s["max_new_tokens"],
                                           temperature=s["temperature"], top_p=s["top_p"],
                                           repeat_penalty=s["repetition_penalty"],
                                           seed=s["seed"], stream=True):
            first = first or time.monotonic()
            n += 1
            text.append(chunk["choices"][0]["text"])
        end = time.monotonic()
        conn.send(({"ttft_s": first - start, "tokens": n,
                    "decode_tok_s": (n - 1) / max(end - first, 1e-9)}, "".join(text)))
    llm.close()


def conversation(answer) -> dict:
    """Ten turns of one conversation; `answer(history, settings)` -> (figures, reply text)."""
    history, ttft = [], []
    for t, topic in enumerate(TOPICS):
        history.append({"role": "user", "content": f"Tell me one thing about {topic}."})
        figures, text = answer(history, GenerationSettings(max_new_tokens=64, seed=t))
        ttft.append(figures["ttft_s"])
        history.append({"role": "assistant", "content": text or "..."})
    return {"turn_1_ttft_s": ttft[0], "turn_10_ttft_s": ttft[-1], "ratio": ttft[-1] / ttft[0]}


def engine_answer(engine):
    def answer(history: list[dict], settings: GenerationSettings) -> tuple[dict, str]:
        reply = engine.submit(history, settings)
        reply.wait()
        return {"ttft_s": reply.first_token_at - reply.submitted_at}, reply.text
    return answer


def decode_ceiling(path: Path, tokenizer, flash_attention: str, rows: int = 8,
                   steps: int = 40) -> dict:
    """llama.cpp alone: the median time of one `llama_decode` holding one token of each of
    `rows` sequences vs one token of one sequence (each sequence 64 tokens in), and the
    throughput ratio that allows: what `rows` streams can get over one at best."""
    import llama_cpp as ll

    from serving.llamacpp import GGUFModel

    model = GGUFModel(path, version="ceiling", tokenizer=tokenizer,
                      config=ServingConfig(slots=rows, flash_attention=flash_attention),
                      threads=threads())
    batch = ll.llama_batch_init(model.n_batch, 0, 1)
    position = [0] * rows

    def decode(seqs: list[int], tokens_each: int = 1) -> float:
        n = 0
        for seq in seqs:
            for j in range(tokens_each):
                batch.token[n], batch.pos[n] = 1000 + j, position[seq]
                batch.n_seq_id[n], batch.seq_id[n][0] = 1, seq
                batch.logits[n] = j == tokens_each - 1
                position[seq] += 1
                n += 1
        batch.n_tokens = n
        start = time.perf_counter()
        if ll.llama_decode(model.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - start

    try:
        for seq in range(rows):
            decode([seq], 64)
        one, many = [], []
        for _ in range(steps):  # alternating, as the one-stream runs
            one.append(decode([0]))
            many.append(decode(list(range(rows))))
    finally:
        ll.llama_batch_free(batch)
        model.close()
    t1, tn = statistics.median(one), statistics.median(many)
    return {"rows": rows, "one_row_ms": t1 * 1000, f"{rows}_rows_ms": tn * 1000,
            "throughput_ratio": rows * t1 / tn}


def _median(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def generate_rows(engine, rows: int, settings) -> dict:
    prompts = [json.loads(line) for line in (ROOT / "prompts.jsonl").read_text().splitlines()
               if line.strip()]
    prompts = (prompts * (rows // len(prompts) + 1))[:rows]
    start = time.monotonic()
    replies = [engine.submit(p["messages"], settings) for p in prompts]
    for r in replies:
        r.wait()
    wall = time.monotonic() - start
    tokens = sum(r.n_tokens for r in replies)
    return {"rows": rows, "tokens": tokens, "seconds": wall, "aggregate_tok_s": tokens / wall}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5, help="one-stream runs each (median)")
    parser.add_argument("--generate-rows", type=int, default=300)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--flash-attention", choices=("auto", "on", "off"),
                        default=ServingConfig.flash_attention)
    args = parser.parse_args(argv)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=1)
    registry = Registry()
    config = ServingConfig(flash_attention=args.flash_attention)
    engine = open_engine(registry, config=config, backend="llama.cpp")
    model = engine._model
    report: dict = {"model_version": engine.version, "gguf": model.path.name,
                    "flash_attention": args.flash_attention,
                    "threads": threads(), "dtype": dtype_reason(),
                    "max_new_tokens": args.max_new_tokens, "machine": platform.processor()
                    or platform.machine(), "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    try:
        # Alternating runs, anchor then ours, so a busy neighbour on a shared machine slows
        # both alike; each figure is the median of its runs.
        llm = Anchor(model.path, model.tokenizer)
        theirs, ours = [], []
        engine.submit([{"role": "user", "content": "warm up"}], settings).wait()
        for i in range(args.runs):
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            theirs.append(llm.complete(messages, settings)[0])
            ours.append(one_stream(engine, messages, settings))
        report["anchor_turns"] = conversation(llm.complete)
        llm.close()
        report["anchor_llama_cpp"] = _median(theirs)
        report["one_stream"] = _median(ours)
        report["concurrent"] = [streams(engine, n, settings) for n in (4, 8)]
        report["turns"] = {**conversation(engine_answer(engine)), "reuse": dict(engine.stats)}
    finally:
        engine.close()
    report["decode_ceiling"] = decode_ceiling(model.path, model.tokenizer, args.flash_attention)
    if args.generate_rows:  # as `python -m serving generate` runs: its default 16 slots
        batch_engine = open_engine(
            registry, config=ServingConfig(slots=16, flash_attention=args.flash_attention),
            backend="llama.cpp")
        try:
            report["generate"] = generate_rows(batch_engine, args.generate_rows, settings)
        finally:
            batch_engine.close()
    if not args.no_transformers:
        t_engine = open_engine(registry, config=config, backend="transformers")
        try:
            t_engine.submit([{"role": "user", "content": "warm up"}], settings).wait()
            report["transformers_one_stream"] = {
                **_median([one_stream(t_engine, [{"role": "user", "content": PROMPTS[i]}],
                                      settings) for i in range(args.runs)]),
                "engine": t_engine.describe()}
        finally:
            t_engine.close()
    a, o = report["anchor_llama_cpp"], report["one_stream"]
    report["ratios"] = {
        "decode_vs_llama_cpp": o["decode_tok_s"] / a["decode_tok_s"],
        "ttft_vs_llama_cpp": o["ttft_s"] / a["ttft_s"],
        "8_streams_vs_one": report["concurrent"][1]["aggregate_tok_s"] / o["decode_tok_s"],
        "8_rows_vs_one_llama_decode": report["decode_ceiling"]["throughput_ratio"],
        "turn_10_vs_turn_1_ttft": report["turns"]["ratio"],
        "anchor_turn_10_vs_turn_1_ttft": report["anchor_turns"]["ratio"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "serve.png")
    print_table(report)
    return report


def print_table(r: dict) -> None:
    a, o = r["anchor_llama_cpp"], r["one_stream"]
    print(f"model {r['model_version']} ({r['gguf']}), {r['threads']} threads, "
          f"{r['max_new_tokens']} new tokens")
    print(f"{'':<34} {'TTFT':>8} {'tok/s':>8}")
    print(f"{'llama.cpp (anchor), one stream':<34} {a['ttft_s']:>7.3f}s {a['decode_tok_s']:>8.1f}")
    print(f"{'this project, one stream':<34} {o['ttft_s']:>7.3f}s {o['decode_tok_s']:>8.1f}")
    for c in r["concurrent"]:
        print(f"{'this project, %d streams (total)' % c['streams']:<34} "
              f"{c['max_ttft_s']:>7.3f}s {c['aggregate_tok_s']:>8.1f}")
    if "generate" in r:
        g = r["generate"]
        print(f"{'serving generate, %d rows' % g['rows']:<34} {'':>8} {g['aggregate_tok_s']:>8.1f}")
    if "transformers_one_stream" in r:
        t = r["transformers_one_stream"]
        print(f"{'transformers engine, one stream':<34} {t['ttft_s']:>7.3f}s "
              f"{t['decode_tok_s']:>8.1f}")
    d, t, at = r["decode_ceiling"], r["turns"], r["anchor_turns"]
    print(f"llama_decode alone: 1 row {d['one_row_ms']:.1f} ms, {d['rows']} rows "
          f"{d['%d_rows_ms' % d['rows']]:.1f} ms a step")
    print(f"turn 10 vs turn 1 TTFT: this project {t['turn_10_ttft_s']:.3f}s vs "
          f"{t['turn_1_ttft_s']:.3f}s, llama.cpp {at['turn_10_ttft_s']:.3f}s vs "
          f"{at['turn_1_ttft_s']:.3f}s")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["llama.cpp\n1 stream", "ours\n1 stream"] + [
        f"ours\n{c['streams']} streams" for c in r["concurrent"]]
    values = [r["anchor_llama_cpp"]["decode_tok_s"], r["one_stream"]["decode_tok_s"]] + [
        c["aggregate_tok_s"] for c in r["concurrent"]]
    if "generate" in r:
        labels.append(f"generate\n{r['generate']['rows']} rows")
        values.append(r["generate"]["aggregate_tok_s"])
    if "transformers_one_stream" in r:
        labels.append("transformers\n1 stream")
        values.append(r["transformers_one_stream"]["decode_tok_s"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(labels, values, color=["#888"] + ["#3a7"] * (len(values) - 1))
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{r['model_version']}, {r['threads']} threads, {r['max_new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
