"""How much of a round's change should serve? Its candidate scaled toward the version it started
from, or past it, judged by its user and on every regression question.

    python -m bench.interpolate --store <a bench.loop user's data folder> [--user NAME]
        [--round ID] [--scales 0,0.5,0.75,1,1.25,1.5] [--test-prompts 62] [--test-samples 2]
        [--max-new-tokens 256] [--out bench/results/interpolate]

A round's candidate differs from its parent (the version it tuned) by a change to some weights
(a merged LoRA adapter: the adapted blocks' matrices only). For each scale s the weights
`parent + s x (candidate - parent)` are written as a version of the store (`<round>-x<s>`,
`kind` "scaled", its `meta.json` naming the parent, the candidate and s), served like any
version (merged, Q8_0 through llama.cpp): s = 0 is the parent itself, 1 the candidate, below 1
an interpolation toward the parent (WiSE-FT; WARP's interpolation toward the initialisation),
above 1 an extrapolation (ExPO). Each one then answers the test prompts as in `bench.loop`
(sampled, `--test-samples` a prompt; approval by the store's simulated user with its 95%
interval) and every regression question (greedy, as the gate asks them, kept in the store's
gate cache; counted against the parent with the round's own (c) settings, as
`bench.c_match --answer` does). A scaled version already in the store is used again.

`--round` defaults to the store's latest round whose candidate is registered (promoted or
rejected); `--user` to the store's folder name (`bench.loop` keeps each user's store in
`<out>/<user>/data`). Writes `interpolate.json` (rows keyed by store and round; other rows kept,
and a row's scales measured before with the same user and test settings kept beside new ones)
and `interpolate.png` (approval and retention against the scale, one line per round). A
benchmark, not a test: each scale costs about 2 min of test replies and 2 of regression answers
on 2 cores, and about 700 MB of disk for its weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from bench import earlier_results
from bench.loop import judged, load_prompts, reading_flags, replies
from serving.setting import Allowed


SCALE = Allowed(low=0.0, high=math.inf, high_open=True)


def scales(text: str) -> list[float]:
    """`--scales`: distinct finite numbers >= 0, comma-separated, in the order given."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not numbers separated by commas: {text!r}") from None
    bad = [v for v in values if not SCALE.admits(v)]
    if bad:
        raise argparse.ArgumentTypeError(f"every scale must be a finite number >= 0, not {bad[0]}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a scale is given twice: {text!r}")
    return values


def scaled_name(candidate: str, scale: float) -> str:
    return f"{candidate}-x{scale:g}"


def scaled_version(registry, parent: str, candidate: str, scale: float) -> str:
    """The version `parent + scale x (candidate - parent)`, registered once under
    `scaled_name`; returns its name (the parent's or the candidate's own at 0 and 1)."""
    if scale in (0, 1):
        return parent if scale == 0 else candidate
    name = scaled_name(candidate, scale)
    if (registry.root / name / "meta.json").is_file():
        return name
    from serving.config import ServingConfig
    from training.tune import scale_change
    fp32 = ServingConfig(dtype="float32")
    start = {k: w.detach() for k, w in registry.load(parent, fp32).model.named_parameters()}
    loaded = registry.load(candidate, fp32)
    scale_change(loaded.model, scale, start)  # what `tune.change_scale` does in a round
    staging = registry.staging(name)
    loaded.model.save_pretrained(staging.model)
    loaded.tokenizer.save_pretrained(staging.model)
    meta = registry.get(candidate).meta
    registry.register(name, staging, {
        "parent": parent, "base": meta.get("base", registry.base_name), "kind": "scaled",
        "scaled_from": candidate, "scale": scale, "round": meta.get("round", candidate)})
    return name


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, required=True,
                        help="a bench.loop user's data folder (feedback.db, reports, versions)")
    parser.add_argument("--user", help="the simulated user who voted (default: the store's "
                                       "folder name, as bench.loop lays it out)")
    parser.add_argument("--round", help="the round whose candidate is scaled (default: the "
                                        "latest with a registered candidate)")
    parser.add_argument("--scales", type=scales, default=scales("0,0.5,0.75,1,1.25,1.5"),
                        help="comma-separated scales of the round's change (0: its parent, "
                             "1: the candidate)")
    reading_flags(parser, test_samples=2)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "interpolate")
    args = parser.parse_args(argv)
    from bench.users import make_users, unknown_users, words
    store = args.store
    if not (store / "reports").is_dir() or not (store / "versions").is_dir():
        parser.error(f"{store} holds no reports and versions folders: give a bench.loop "
                     "user's data folder, e.g. bench/results/loop/tips/data")
    user_name = args.user or store.resolve().parent.name
    if message := unknown_users([user_name]):
        parser.error(f"--user: {message}" if args.user else
                     f"the store's folder name is not a user ({message}): give --user")
    reports = {r["round"]: r for r in (json.loads(p.read_text())
                                       for p in sorted((store / "reports").glob("r*.json")))
               if r.get("round") and (store / "versions" / r["round"] / "meta.json").is_file()}
    if not reports:
        parser.error(f"no round in {store} registered a candidate: nothing to scale")
    if args.round is not None and args.round not in reports:
        parser.error(f"--round {args.round!r} is not a round of {store} with a registered "
                     f"candidate; those are: {', '.join(reports)}")
    report = reports[args.round or list(reports)[-1]]

    from serving.config import GenerationSettings
    from serving.registry import Registry
    from training.config import RoundConfig, as_ran
    from training.evaluate import answered
    from bench.c_match import judged as retention, kept_answers

    os.environ["CHAT_DATA_DIR"] = str(store)
    registry = Registry()
    candidate = report["round"]
    parent = registry.get(candidate).meta["parent"]
    gate_cfg = RoundConfig.from_dict(as_ran(report["config"])).gate
    _, test = load_prompts()
    test = test[:args.test_prompts]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=None)
    base_texts, _ = replies(test, args.test_samples, settings, registry.base_name)
    [user] = make_users([user_name], [words(x) for xs in base_texts for x in xs])
    path = args.out / "interpolate.json"
    results = earlier_results(path)
    base = judged(user, base_texts)
    print(f"{user_name}: the base model's approval {base['approval']:.0%}", flush=True)
    key = f"{store}:{candidate}"
    measured = {"test_prompts": len(test), "test_samples": args.test_samples,
                "max_new_tokens": args.max_new_tokens}
    earlier = results.get(key, {})
    row = results[key] = {"store": str(store), "user": user_name, "round": candidate,
                          "parent": parent, "decision": report.get("decision"),
                          "settings": measured, "base": base,
                          # scales measured before the same way stay beside the new ones
                          "scales": earlier.get("scales", {}) if earlier.get("settings") ==
                          measured and earlier.get("user") == user_name else {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for scale in args.scales:
        t = time.monotonic()
        version = scaled_version(registry, parent, candidate, scale)
        built = time.monotonic() - t
        texts, _ = replies(test, args.test_samples, settings, version)
        tested = time.monotonic() - t - built
        found = kept_answers(store, (parent, version), gate_cfg, answer=True)
        if isinstance(found, str):
            raise SystemExit(f"{version}: {found}")
        items, (theirs, ours) = found
        row["scales"][f"{scale:g}"] = {
            "version": version, **judged(user, texts),
            "mean_words": sum(words(x) for xs in texts for x in xs) / sum(map(len, texts)),
            "retention": {"questions": len(items),
                          **retention(items, theirs, ours, answered, gate_cfg)},
            "seconds": {"build": round(built, 1), "test": round(tested, 1),
                        "regression": round(time.monotonic() - t - built - tested, 1)}}
        print(line(scale, row["scales"][f"{scale:g}"]), flush=True)
        path.write_text(json.dumps(results, indent=2) + "\n")  # so far
    plot(results, args.out / "interpolate.png")
    print(f"wrote {path}")
    return results


def line(scale: float, s: dict) -> str:
    r = s["retention"]
    low, high = s["approval_interval"]
    return (f"x{scale:<5g} {s['version']}: approval {s['approval']:.0%} [{low:.0%}, {high:.0%}], "
            f"{s['mean_words']:.0f} words; regression {r['candidate']} vs {r['current']} of "
            f"{r['questions']} ({r['retention']:.0%}; -{r['lost']} +{r['gained']}, "
            f"{'passes' if r['accuracy_passes'] else 'WORSE'})")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for row in results.values():
        xs = sorted(float(k) for k in row["scales"])
        rows = [row["scales"][f"{x:g}"] for x in xs]
        label = f"{row['user']} {row['round']}"
        top.errorbar(xs, [100 * r["approval"] for r in rows], marker="o", capsize=3,
                     yerr=[[100 * (r["approval"] - r["approval_interval"][0]) for r in rows],
                           [100 * (r["approval_interval"][1] - r["approval"]) for r in rows]],
                     label=label)
        bottom.plot(xs, [100 * r["retention"]["retention"] for r in rows], marker="o",
                    label=label)
    top.set_ylabel("approval on the test prompts, %")
    bottom.set_ylabel("regression retention, %")
    bottom.axhline(95, color="grey", linestyle=":", linewidth=1)
    bottom.set_xlabel("scale of the round's change (0: its parent, 1: the candidate)")
    for ax in (top, bottom):
        ax.axvline(1, color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
