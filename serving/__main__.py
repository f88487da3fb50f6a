"""`python -m serving generate`: batched replies for a JSONL file of conversations.

Each input line is a JSON object with `messages` (user/assistant turns, ending with a user
turn) and optionally `id` and `system`; a bare JSON list of messages works too. Each output line
has the input's `id`, `messages`, the `reply`, the `model_version` that wrote it, the
`finish_reason`, how many old messages were `trimmed`, and the `generation_settings`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import sys
import time
from pathlib import Path

from tqdm import tqdm

from serving.chat import PromptTooLong
from serving.config import GenerationSettings, InvalidSettings, ServingConfig
from serving.model import ModelUnavailable
from feedback.config import output_file
from feedback.errors import InvalidInput
from feedback.io import write_jsonl
from feedback.jsonl import read_jsonl
from feedback.store import MAX_MESSAGE_CHARS
from serving.backends import BACKEND_ENV, BACKENDS
from serving.hardware import DTYPE_ENV, DTYPES, BadSetting, resolve_dtype
from serving.registry import Registry, UnknownVersion
from serving.setting import add_flags, given

SAMPLING = ["temperature", "top_p", "max_new_tokens", "repetition_penalty", "seed",
            "system_prompt"]  # a row's own "system" replaces --system-prompt
ENGINE = ["max_batch", "slots"]
GENERATE_SLOTS = 16


class InputError(ValueError):
    pass


EXPECTED = ('expected {"id": ..., "system": "...", "messages": [{"role": "user", "content": '
            '"..."}, ...]} (or a bare list of messages): turns alternate user, assistant, '
            'each with text, ending with a user turn')


def check_row(lineno: int, obj) -> dict:
    """One parsed line as a row to answer, or `InputError` naming the line and the field."""
    def bad(why: str) -> InputError:
        return InputError(f"line {lineno}: {why}; {EXPECTED}.")

    obj = {"messages": obj} if isinstance(obj, list) else obj
    if not isinstance(obj, dict):
        raise bad("not an object or a list")
    unknown = set(obj) - {"id", "system", "messages"}
    if unknown:
        raise bad(f"unknown field(s) {', '.join(sorted(map(repr, unknown)))}")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad('"messages" must be a non-empty list')
    for i, m in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != expected or set(m) - {"role", "content"}:
            raise bad(f"message {i + 1} must be {{\"role\": \"{expected}\", \"content\": ...}}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise bad(f"message {i + 1} has no text")
        if len(m["content"]) > MAX_MESSAGE_CHARS:
            raise bad(f"message {i + 1} is {len(m['content']):,} characters; the limit is "
                      f"{MAX_MESSAGE_CHARS:,}")
    if msgs[-1]["role"] != "user":
        raise bad("the last message must be the user's")
    system = obj.get("system")
    if system is not None and (not isinstance(system, str) or len(system) > MAX_MESSAGE_CHARS):
        raise bad(f'"system" must be text of at most {MAX_MESSAGE_CHARS:,} characters')
    row_id = obj.setdefault("id", lineno)
    if row_id is None or isinstance(row_id, (dict, list, bool)) or (
            isinstance(row_id, str) and not row_id.strip()):
        raise bad('"id" must be a number or a non-empty string')
    return obj


def read_conversations(path: Path) -> list[dict]:
    """Every line checked before any generation starts; errors name the line."""
    try:
        return [check_row(lineno, value) for lineno, value in read_jsonl(path)]
    except InvalidInput as exc:
        raise InputError(str(exc)) from None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="batched replies for a JSONL file of conversations",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Exit codes: 0 done, 1 bad input or model, 2 usage error.")
    g.add_argument("--in", dest="inp", type=Path, required=True, help="input JSONL")
    g.add_argument("--out", type=Path, required=True, help="output JSONL")
    g.add_argument("--version", help="model version (default: the current one)")
    add_flags(g, GenerationSettings, SAMPLING)
    # more slots than the page's: a batch job fills them all (16 vs 8: a few % more tok/s
    # on 2 cores, about 1.5 GB of cache)
    add_flags(g, ServingConfig, ENGINE, rename={"max_batch": "batch_size"},
              defaults={"slots": GENERATE_SLOTS})
    g.add_argument("--backend", choices=BACKENDS,
                   help=f"engine (default: ${BACKEND_ENV}, else auto: llama.cpp where the "
                        "version converts to GGUF, else transformers)")
    g.add_argument("--dtype", choices=("auto",) + DTYPES,
                   help=f"transformers weights (default: ${DTYPE_ENV}, else auto: bfloat16 "
                        "only where the hardware has it natively)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from serving.backends import open_engine

    try:
        settings = GenerationSettings(**given(args, SAMPLING)).validate()
        rows = read_conversations(args.inp)
        output_file(args.out)  # before any reply is generated: nothing written is lost
        if args.out.resolve() == args.inp.resolve():
            raise InputError(f"--out is --in ({args.inp}): the replies would overwrite the "
                             f"conversations they answer; give another file.")
        config = ServingConfig(**{"slots": GENERATE_SLOTS, **given(args, ENGINE)},
                               dtype=resolve_dtype(args.dtype) if args.dtype else "auto")
        engine = open_engine(Registry(), args.version, config, backend=args.backend)
    except (InputError, InvalidSettings, UnknownVersion, ModelUnavailable, BadSetting,
            OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    start = time.monotonic()
    try:
        replies = []
        for row in rows:
            try:
                replies.append(engine.submit(row["messages"], replace(
                    settings, system_prompt=row.get("system") or settings.system_prompt)))
            except PromptTooLong as exc:
                print(f"error: conversation {row['id']}: {exc}", file=sys.stderr)
                return 1
        bar = tqdm(total=len(rows), unit="reply", disable=not sys.stderr.isatty(),
                   desc=f"{engine.version} ({engine.kind})")

        def written():  # each reply as it finishes, in the input's order
            for row, reply in zip(rows, replies):
                reply.wait()
                bar.update()
                tokens = sum(r.n_tokens for r in replies)
                bar.set_postfix_str(f"{tokens / max(time.monotonic() - start, 1e-9):.0f} tok/s")
                yield {"id": row["id"], "messages": row["messages"], "reply": reply.text,
                       "model_version": reply.version, "finish_reason": reply.finish_reason,
                       "trimmed": reply.trimmed, "generation_settings": reply.settings.to_dict()}

        try:  # written whole or not at all (a disk full, say: no half-written file left)
            with bar:
                write_jsonl(written(), args.out)
        except InvalidInput as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    finally:
        engine.close()
    tokens = sum(r.n_tokens for r in replies)
    elapsed = time.monotonic() - start
    print(f"{len(replies)} replies, {tokens} tokens in {elapsed:.1f}s "
          f"({tokens / max(elapsed, 1e-9):.1f} tok/s) -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
