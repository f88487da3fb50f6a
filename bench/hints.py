"""Does asking for an answer form make the model write it? Each simulated user's approval of the
base model's replies to training prompts asked plainly, and asked each request of
`synthetic.hints` in the system prompt and at the end of the user's message.

    python -m bench.hints [--prompts 24] [--samples 2] [--hints 'A.|B.'] [--places system,message]
        [--max-new-tokens 192] [--out bench/results/hints]

A round's hinted samples (`synthetic.hinted_samples`) add a request to the training prompts so
that the judge has replies in forms the serving version seldom writes on its own; they help
only where the model does what it is asked. This reads, for each request and place, the share
of replies each simulated user likes (its 95% interval, the prompts resampled) and on how many
prompts at least one reply is liked, against the plain replies, at the synthetic stage's
sampling (`synthetic.temperature`, `max_new_tokens`; top-p 0.95). The concise user's word limit
is the 35th percentile of the plain replies' lengths, as `bench.loop` takes the base model's.
Writes `hints.json`. A benchmark, not a test: 24 prompts x 2 replies x 13 readings take about
6-7 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from bench import earlier_results
from bench.loop import judged, load_prompts

PLACES = ("system", "message")


def asked(messages: list[dict], hint: str | None, place: str, settings):
    """(messages, settings) that ask `hint` in `place`, or the prompt as it is."""
    from training.synthetic import with_hint

    if hint is None:
        return messages, settings
    if place == "system":
        return messages, replace(settings, system_prompt=hint)
    return with_hint(messages, hint), settings


def sampled(engine, prompts: list[dict], samples: int, hint: str | None, place: str,
            settings) -> list[list[str]]:
    handles = [[engine.submit(*asked(p["messages"], hint, place, settings))
                for _ in range(samples)] for p in prompts]
    for group in handles:
        for reply in group:
            reply.wait(3600)
    return [[r.text for r in group] for group in handles]


def reading(users, texts: list[list[str]]) -> dict:
    """Per user: its approval with the interval, and the prompts where it likes a reply."""
    return {u.name: {**judged(u, texts),
                     "prompts_liked": sum(any(u.judge(t)[0] for t in ts) for ts in texts)}
            for u in users}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=24, help="training prompts asked")
    parser.add_argument("--samples", type=int, default=2, help="replies a prompt and request")
    parser.add_argument("--hints", default=None,
                        help="requests separated by '|' (default: synthetic.hints)")
    parser.add_argument("--places", default=",".join(PLACES),
                        help="where a request goes: system (the system prompt), message (the "
                             "end of the last user message), comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=0,
                        help="a reply's token cap (default: synthetic.max_new_tokens)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hints")
    args = parser.parse_args(argv)
    from training.config import SyntheticConfig
    train, _ = load_prompts()
    if not 1 <= args.prompts <= len(train):
        parser.error(f"--prompts: 1 to {len(train)} training prompts, not {args.prompts}")
    if not 1 <= args.samples <= 16:
        parser.error(f"--samples: 1 to 16 replies, not {args.samples}")
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens: 0 (synthetic.max_new_tokens) or more")
    cfg = SyntheticConfig() if args.hints is None else SyntheticConfig(hints=args.hints)
    cfg = replace(cfg, max_new_tokens=args.max_new_tokens or cfg.max_new_tokens)
    if not cfg.hint_list:
        parser.error("--hints: at least one request, separated by '|'")
    places = [p.strip() for p in args.places.split(",") if p.strip()]
    if not places or set(places) - set(PLACES):
        parser.error(f"--places: one or both of {', '.join(PLACES)}, not {args.places!r}")

    from bench.users import RULES, make_users, words
    from serving.backends import open_engine
    from serving.config import GenerationSettings, ServingConfig
    from serving.registry import Registry

    prompts = train[:args.prompts]
    settings = GenerationSettings(temperature=cfg.temperature, top_p=0.95,
                                  max_new_tokens=cfg.max_new_tokens, seed=None)
    registry = Registry()
    engine = open_engine(registry, registry.base_name, ServingConfig(slots=16))
    readings, start = {}, time.monotonic()
    try:
        plain = sampled(engine, prompts, args.samples, None, "", settings)
        users = make_users(list(RULES), [words(t) for ts in plain for t in ts])
        readings["plain"] = reading(users, plain)
        print(f"plain: {_line(readings['plain'])}", flush=True)
        for hint in cfg.hint_list:
            for place in places:
                texts = sampled(engine, prompts, args.samples, hint, place, settings)
                readings[f"{place}: {hint}"] = reading(users, texts)
                print(f"{place}: {hint}\n    {_line(readings[f'{place}: {hint}'])}",
                      flush=True)
    finally:
        engine.close()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "hints.json"
    results = earlier_results(path)
    key = f"{registry.base_name}, {len(prompts)}x{args.samples}"
    results[key] = {"prompts": len(prompts), "samples": args.samples,
                    "settings": {"temperature": cfg.temperature, "top_p": 0.95,
                                 "max_new_tokens": cfg.max_new_tokens},
                    "seconds": round(time.monotonic() - start, 1), "readings": readings}
    path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _line(row: dict) -> str:
    return ", ".join(f"{name} {r['approval']:.0%} ({r['prompts_liked']} prompts)"
                     for name, r in row.items())


if __name__ == "__main__":
    main()
