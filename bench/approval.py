"""Which of these versions does a user like more? Each read on the same test prompts with many
replies a prompt, and compared with the first one prompt by prompt.

    python -m bench.approval --user USER --version LABEL=STORE[@VERSION] [--version ...]
        [--test-prompts 62] [--test-samples 8] [--max-new-tokens 256]
        [--out bench/results/approval]

`bench.loop` and `bench.variants` read a version's approval from 2 sampled replies to each of
the 62 test prompts: a reading carries about +-10 points (the same candidate read twice gave
+55 and +40), as much as the differences between round configs they are asked to show. Here
each version (a data folder's, served like any version: merged, through the serving engine)
answers each test prompt `--test-samples` times at the page's sampling, the user judges every
reply, and each version's approval comes with its 95% interval (the prompts resampled, a
prompt's replies together) and, for every version after the first, its difference from the
first's, paired by prompt (the prompts are the same, so what they contribute to both readings
cancels). VERSION: a version name in STORE's registry, `base`, or `current` (what STORE
serves); left out, STORE's latest round candidate, promoted or not (not a `bench.interpolate`
scaled version).

Writes `approval.json` (one row per user and measuring settings; a version read before with
the same user, store, version and settings is not read again, so a comparison can grow one
version at a time) and `approval-<user>.png`. The concise user's word limit is the 35th
percentile of the first version's reply lengths its row read (as `bench.loop` takes the base
model's): read the base model first. A benchmark, not a test: 62 prompts x 8 replies take
about 4-8 minutes a version on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench import earlier_results
from bench.loop import judged, load_prompts, reading_flags, replies


def version_spec(text: str) -> tuple[str, Path, str | None]:
    """`--version LABEL=STORE[@VERSION]`: (label, store, version or None)."""
    label, sep, rest = text.partition("=")
    if not sep or not label.strip() or not rest:
        raise argparse.ArgumentTypeError(f"expected LABEL=STORE[@VERSION], not {text!r}")
    store, _, version = rest.partition("@")
    return label.strip(), Path(store), version or None


def resolved(parser, store: Path, version: str | None) -> str:
    """The version name `version` means in `store` (its env already set), or a parser error."""
    from serving.registry import Registry, UnknownVersion
    registry = Registry()
    if version == "base":
        return registry.base_name
    if version == "current":
        return registry.current_name()
    if version is None:
        made = [v for v in registry.versions() if v.meta.get("kind") != "scaled"]
        return made[-1].name if made else registry.base_name
    try:
        return registry.get(version).name
    except (UnknownVersion, ValueError) as exc:
        parser.error(f"{store}: {exc}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--user", required=True, help="the simulated user who judges")
    parser.add_argument("--version", type=version_spec, action="append", required=True,
                        dest="versions", metavar="LABEL=STORE[@VERSION]",
                        help="a version to read (the first: the one the others are compared "
                             "with); STORE a data folder with a versions folder")
    reading_flags(parser, test_samples=8)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "approval")
    args = parser.parse_args(argv)
    from bench.users import make_users, unknown_users, words
    if message := unknown_users([args.user]):
        parser.error(f"--user: {message}")
    labels = [label for label, _, _ in args.versions]
    if len(set(labels)) != len(labels):
        parser.error(f"--version: a label is given twice: {labels}")
    for _, store, _ in args.versions:
        if not (store / "versions").is_dir():
            parser.error(f"{store} holds no versions folder: give a data folder, e.g. "
                         "bench/results/loop/tips/data")
    # every name checked before any reply is written
    named = []
    for label, store, version in args.versions:
        os.environ["CHAT_DATA_DIR"] = str(store)
        named.append((label, store, resolved(parser, store, version)))

    from serving.config import GenerationSettings
    from training.stats import paired_mean
    _, test = load_prompts()
    test = test[:args.test_prompts]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=None)
    measured = {"test_prompts": len(test), "test_samples": args.test_samples,
                "max_new_tokens": args.max_new_tokens}
    path = args.out / "approval.json"
    results = earlier_results(path)
    key = f"{args.user} {len(test)}x{args.test_samples}, {args.max_new_tokens} tokens"
    row = results.setdefault(key, {"user": args.user, "settings": measured, "versions": {}})
    args.out.mkdir(parents=True, exist_ok=True)
    # the concise user's word limit: from the first version this row read, kept with the row
    lengths = row.get("calibration_lengths")
    readings = []
    for label, store, version in named:
        os.environ["CHAT_DATA_DIR"] = str(store)
        read = f"{store.resolve()}@{version}"
        t = time.monotonic()
        if read in row["versions"]:  # read before the same way: its replies were judged
            reading = row["versions"][read]
        else:
            texts, _ = replies(test, args.test_samples, settings, version)
            if lengths is None:
                lengths = row["calibration_lengths"] = [words(x) for xs in texts for x in xs]
            [user] = make_users([args.user], lengths)
            reading = {"store": str(store), "version": version, **judged(user, texts),
                       "per_prompt": [sum(user.judge(x)[0] for x in xs) / len(xs)
                                      for xs in texts],
                       "mean_words": sum(words(x) for xs in texts for x in xs)
                       / sum(map(len, texts)),
                       "seconds": round(time.monotonic() - t, 1)}
            row["versions"][read] = reading
            path.write_text(json.dumps(results, indent=2) + "\n")  # so far
        readings.append((label, reading))
    first = readings[0][1]["per_prompt"]
    table = []
    for label, r in readings:
        diff = paired_mean([v - f for v, f in zip(r["per_prompt"], first)], confidence=0.95,
                           samples=2000)
        table.append({"label": label, "store": r["store"], "version": r["version"],
                      "approval": r["approval"], "approval_interval": r["approval_interval"],
                      "difference": {"estimate": round(diff.estimate, 4),
                                     "interval": [round(diff.low, 4), round(diff.high, 4)],
                                     "p_better": round(diff.p_better, 4)},
                      "mean_words": round(r["mean_words"], 1)})
        low, high = r["approval_interval"]
        print(f"{label:<28} {r['version']}: {r['approval']:.0%} [{low:.0%}, {high:.0%}], "
              f"vs {readings[0][0]}: {diff.estimate:+.0%} [{diff.low:+.0%}, {diff.high:+.0%}]"
              f", {r['mean_words']:.0f} words", flush=True)
    row["last"] = table
    path.write_text(json.dumps(results, indent=2) + "\n")
    plot(row, args.out / f"approval-{args.user}.png")
    print(f"wrote {path}")
    return row


def plot(row: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = row["last"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(table) + 1.5))
    ys = list(range(len(table)))[::-1]
    ax.errorbar([100 * r["approval"] for r in table], ys, fmt="o", capsize=3,
                xerr=[[100 * (r["approval"] - r["approval_interval"][0]) for r in table],
                      [100 * (r["approval_interval"][1] - r["approval"]) for r in table]])
    ax.set_yticks(ys, [r["label"] for r in table], fontsize=8)
    s = row["settings"]
    ax.set_xlabel(f"{row['user']}'s approval on {s['test_prompts']} test prompts x "
                  f"{s['test_samples']} replies, % (95% interval)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
