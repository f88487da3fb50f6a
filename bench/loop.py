"""Does the loop learn? Simulated users vote; the real pipeline trains; approval before and after.

    python -m bench.loop [--users concise,example,structured,no_filler,bold,tips] [--rounds 1]
        [--train-prompts 75] [--replies-per-prompt 4] [--test-prompts 62] [--out DIR]
    python -m bench.loop --report [--out DIR]   # the table and plot again, from loop.json
    python -m bench.loop --users bold --compare "LABEL=DIR" ... --out DIR  # runs side by side

For each simulated user (`bench/users.py`), in a data directory of its own (so each user's model
learns only from that user):
  1. approval on the held-out test prompts: the current version answers each (through `serving`,
     batched, the product's default sampling), the user judges;
  2. a round of votes: replies to training prompts from `serving`, each voted with a reason chip
     into the `feedback` store as that user (some users also regenerate and pick);
  3. the real `python -m training run` (its gate decides), timed, with its peak memory;
  4. off the round's clock: the candidate and the version it started from on every regression
     question (`--no-retention` skips it; the gate asks as many as its time allows);
  5. back to 1 with whatever version is now current.
Prompts: `bench/prompts.jsonl` (310, written for the project); `id % 5 == 0` are test prompts,
the rest training prompts. Writes `loop.json` and `loop.png` (approval per round per user) into
the output folder after every round (a run stopped midway keeps the rounds it finished) and
prints a table. A run of some users keeps the other users' rows already in
`loop.json` (each row names its run's settings), so users can be measured one run at a time;
a user measured again starts over from the base model with an empty store.
A benchmark, not a test: it reports what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = Path(__file__).resolve().parent / "prompts.jsonl"


def load_prompts() -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["id"] % 5], [r for r in rows if r["id"] % 5 == 0]


_cache: dict = {}


def replies(prompts: list[dict], n: int, settings,
            version: str | None = None) -> tuple[list[list], str]:
    """`n` replies to each prompt from `version` (default: the current one), batched through
    the engine. Every user starts from the same base version: its replies are generated once
    and shared."""
    from serving.backends import open_engine
    from serving.registry import Registry

    registry = Registry()
    key = (version or registry.current_name(), tuple(repr(p["messages"]) for p in prompts), n)
    if key in _cache:
        return _cache[key]
    engine = open_engine(registry, version)
    try:
        handles = [[engine.submit(p["messages"], settings) for _ in range(n)] for p in prompts]
        _cache[key] = [[h.wait() for h in hs] for hs in handles], engine.version
        return _cache[key]
    finally:
        engine.close()


def reading_flags(parser, test_samples: int) -> None:
    """--test-prompts, --test-samples, --max-new-tokens: how a version's approval is read
    (`bench.interpolate`, `bench.approval`)."""
    from serving.setting import Allowed, flag_type
    at_least_1 = flag_type(int, Allowed(low=1))
    parser.add_argument("--test-prompts", type=at_least_1, default=62)
    parser.add_argument("--test-samples", type=at_least_1, default=test_samples)
    parser.add_argument("--max-new-tokens", type=at_least_1, default=256)


def approval(user, texts: list[list[str]]) -> float:
    flat = [t for ts in texts for t in ts]
    return sum(user.judge(t)[0] for t in flat) / len(flat)


def judged(user, texts: list[list[str]]) -> dict:
    """The user's approval of `texts` and its 95% interval, as the rows store them."""
    return {"approval": approval(user, texts), "approval_interval": approval_interval(user, texts)}


def approval_interval(user, texts: list[list[str]]) -> list[float]:
    """95% bootstrap interval of the approval, resampling test prompts (a prompt's replies
    go together)."""
    from training.stats import paired_mean
    per_prompt = [sum(user.judge(t)[0] for t in ts) / len(ts) for ts in texts if ts]
    iv = paired_mean(per_prompt, confidence=0.95, samples=2000)
    return [round(iv.low, 3), round(iv.high, 3)]


def judge_on_test(user, prompts: list[dict], current: list[list[str]],
                  candidate: list[list[str]], version: str) -> dict | None:
    """Does a round's judge agree with its user on the replies the gate has it compare? The
    round checks its judge on held-out votes, which rate the replies the serving version gave
    before the round; the gate's (b) and the synthetic pairs ask it about other replies: the
    candidate's, and fresh ones. This scores both versions' test replies with the judge saved
    with the candidate `version` and compares with the user's own verdicts: the AUC over
    every reply's thumb (with its 95% interval), and per test prompt, where the user's
    approval of the two versions differs, how often the judge's mean score leans the same way.
    None where the round saved no judge."""
    from serving.model import resolve_base
    from serving.registry import Registry
    from training.reward import load_judge
    from training.stats import auc_interval

    t = time.monotonic()
    registry = Registry()
    folder = registry.get(version).dir
    report = Path(os.environ["CHAT_DATA_DIR"]) / "reports" / f"{version}.json"
    if not folder.reward.is_dir() or not report.is_file():
        return None
    max_length = json.loads(report.read_text())["config"]["reward"]["max_length"]
    judge = load_judge(resolve_base()[1], registry.tokenizer(), folder.reward, max_length)
    flat = [(p, r) for texts in (current, candidate) for p, rs in zip(prompts, texts) for r in rs]
    scores = judge.score([p["messages"] + [{"role": "assistant", "content": r}]
                          for p, r in flat])
    labels = [user.judge(r)[0] for _, r in flat]
    half = sum(len(rs) for rs in current)

    def per_prompt(values: list, texts: list[list[str]]) -> list[float]:
        out, i = [], 0
        for rs in texts:
            out.append(sum(values[i:i + len(rs)]) / max(len(rs), 1))
            i += len(rs)
        return out
    judge_gap = [c - o for c, o in zip(per_prompt(scores[half:], candidate),
                                       per_prompt(scores[:half], current))]
    user_gap = [c - o for c, o in zip(per_prompt(labels[half:], candidate),
                                      per_prompt(labels[:half], current))]
    differ = [(j, u) for j, u in zip(judge_gap, user_gap) if u != 0]
    return {"replies": len(flat), "liked": sum(labels),
            "auc": (auc_interval(scores, labels, confidence=0.95, samples=2000).to_dict()
                    if len(set(labels)) == 2 else None),
            "prompts": len(judge_gap),
            "judge_prefers_candidate": sum((j > 0) + 0.5 * (j == 0) for j in judge_gap)
            / max(len(judge_gap), 1),
            "user_prefers": {"candidate": sum(u > 0 for u in user_gap),
                             "current": sum(u < 0 for u in user_gap)},
            "agrees": sum((j > 0) == (u > 0) and j != 0 for j, u in differ),
            "of": len(differ), "seconds": round(time.monotonic() - t, 1)}


def in_share(i: int, share: float) -> bool:
    """Whether the `i`-th prompt is among the `share` of prompts a user acts on (regenerates
    and picks, edits): the first `share` of every hundred."""
    return (i % 100) < share * 100


def edited_prompts(user, count: int) -> list[int]:
    """The indices of the prompts whose replies `user` edits (none for most users)."""
    return [i for i in range(count) if in_share(i, user.edit_share)]


def additions(user, prompts: list[dict], settings, tries: int = 3) -> dict[int, str | None]:
    """For each prompt `user` edits, the words it adds: taken from the first of `tries` replies
    of the serving version to the prompt with `user.edit_request` added that holds them
    (standing in for what the user would write); None where none does."""
    from training.synthetic import with_hint

    chosen = edited_prompts(user, len(prompts))
    if not chosen:
        return {}
    asked = [{**prompts[i], "messages": with_hint(prompts[i]["messages"], user.edit_request)}
             for i in chosen]
    texts, _ = replies(asked, tries, settings)
    found = [[user.addition(t) for t in ts] for ts in texts]
    return {i: next((a for a in words if a), None) for i, words in zip(chosen, found)}


def record_votes(user, prompts: list[dict], texts: list[list[str]], version: str,
                 settings: dict, added: dict[int, str | None] | None = None) -> dict:
    """Store the replies and the user's votes (and picks, and edits: `added` holds the words
    the user adds to a reply it dislikes, by prompt index) through the page's own
    `ChatSession`."""
    from streamlit_app.chat_session import ChatSession

    added = added or {}
    counts = {"votes": 0, "liked": 0, "picks": 0, "with_reason": 0}
    if user.edit_share:
        counts |= {"edits": 0, "edits_without_words": 0}
    chat = ChatSession(ChatSession.sign_in(f"sim-{user.name}"))
    for i, (prompt, options) in enumerate(zip(prompts, texts)):
        parent_id = chat.start_conversation(prompt["messages"])
        shown = []
        for j, text in enumerate(options):
            if not text.strip():
                continue
            message_id = chat.record_reply(parent_id, text, model_version=version,
                                           generation_settings=settings,
                                           source="chat" if j == 0 else "regenerate")
            liked, reasons = user.judge(text)
            chat.vote(message_id, value=1 if liked else -1, reasons=reasons)
            counts["votes"] += 1
            counts["liked"] += liked
            counts["with_reason"] += bool(reasons)
            shown.append((liked, message_id, text))
        # Some users regenerate and pick the reply they like when the replies differ.
        if in_share(i, user.regenerate_share) and len({lk for lk, *_ in shown}) == 2:
            chat.prefer(next(mid for lk, mid, _ in shown if lk))
            counts["picks"] += 1
        # An editing user turns the first reply it dislikes into one it likes.
        disliked = [(mid, text) for lk, mid, text in shown if not lk]
        if user.edit_share and i in added and disliked:
            edited = user.edited(disliked[0][1], added[i])
            if edited:
                chat.edit(disliked[0][0], edited)
                counts["edits"] += 1
            else:
                counts["edits_without_words"] += 1
    return counts


def training_command(command: str, round_config: dict | None, max_minutes: float) -> dict:
    """`python -m training COMMAND` in a subprocess, its output in the store's rounds.log:
    exit code, wall time, its peak memory (MB)."""
    cmd = [sys.executable, "-m", "training", command, "--max-minutes", str(max_minutes)]
    if round_config:
        path = Path(os.environ["CHAT_DATA_DIR"]) / "round-config.json"
        path.write_text(json.dumps(round_config))
        cmd += ["--config", str(path)]
    start = time.monotonic()
    with open(Path(os.environ["CHAT_DATA_DIR"]) / "rounds.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"exit_code": os.waitstatus_to_exitcode(status),
            "seconds": round(time.monotonic() - start, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def prepare_next_gate(round_config: dict | None, max_minutes: float) -> dict:
    """`python -m training prepare` (the serving version's half of the next gate, off the
    round's clock): exit code, wall time, peak memory and what it prepared."""
    done = training_command("prepare", round_config, max_minutes)
    prepared = Path(os.environ["CHAT_DATA_DIR"]) / "training" / "prepared.json"
    try:
        done["prepared"] = json.loads(prepared.read_text())
    except (OSError, ValueError):
        done["prepared"] = None
    return done


def run_training_round(round_config: dict | None, max_minutes: float) -> dict:
    """`python -m training run` in a subprocess: exit code, wall time, its peak memory."""
    done = training_command("run", round_config, max_minutes)
    reports = sorted((Path(os.environ["CHAT_DATA_DIR"]) / "reports").glob("r*.json"))
    report = json.loads(reports[-1].read_text()) if reports else {}
    return {**done,
            # the round resets its high-water mark per stage: its peak is the largest stage's
            "peak_rss_mb": round(max([done["peak_rss_mb"],
                                      *(report.get("peak_mb") or {}).values()])),
            "decision": report.get("decision"), "candidate": report.get("round"),
            "current": report.get("current_version"),
            "message": report.get("message"), "timings_s": report.get("timings_s"),
            "peak_mb": report.get("peak_mb"),
            "gate": _gate_summary(report.get("gate")), "tuning": report.get("tuning"),
            "data": report.get("data"),
            # what users thought of the serving version's own replies (the round's first check)
            "serving_votes": report.get("serving_votes"),
            # the judge's held-out AUC and the synthetic pairs made from it
            "reward_model": report.get("reward_model"), "synthetic": report.get("synthetic")}


def _gate_summary(gate: dict | None) -> dict | None:
    if not gate:
        return None
    c = gate["checks"]
    reg = c.get("c_regression", {})
    return {"passed": gate["passed"],
            "a_auc": [c["a_heldout_ranking"].get("current_auc"),
                      c["a_heldout_ranking"].get("candidate_auc")],
            "a_difference": c["a_heldout_ranking"].get("difference"),
            # (b): the judge's direction (its win rate, with its interval since session 18)
            # and the approval it expects, calibrated (current, candidate; their difference).
            # Until session 17 (b) was the win rate alone, in "b_interval"
            "b_approval": [c["b_reward_model"].get("approval_current"),
                           c["b_reward_model"].get("approval_candidate")],
            "b_difference": c["b_reward_model"].get("difference"),
            "b_win_rate": c["b_reward_model"].get("win_rate"),
            "b_direction": c["b_reward_model"].get("direction"),
            "pooled": gate.get("pooled"),
            "c_accuracy_difference": reg.get("accuracy_difference"),
            "c_fluency": reg.get("fluency"),
            "c_retention": reg.get("retention"),
            "c_correct": [reg.get("current", {}).get("correct"),
                          reg.get("candidate", {}).get("correct")],
            "c_questions": reg.get("questions"),
            "why": {k: v["why"] for k, v in c.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", default="concise,example,structured,no_filler")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--train-prompts", type=int, default=75, help="per round")
    parser.add_argument("--replies-per-prompt", type=int, default=4)
    parser.add_argument("--test-prompts", type=int, default=62)
    parser.add_argument("--test-samples", type=int, default=2, help="replies per test prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-minutes", type=float, default=15.0, help="budget of a round")
    parser.add_argument("--round-config", type=json.loads, default=None,
                        help="JSON overrides of RoundConfig for the rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loop")
    parser.add_argument("--measure-rejected", action=argparse.BooleanOptionalAction,
                        default=True, help="also measure a rejected candidate's approval on the "
                        "test prompts (did it learn, and the gate say no?); it never serves")
    parser.add_argument("--judge-check", action=argparse.BooleanOptionalAction, default=True,
                        help="score both versions' test replies with the round's judge and "
                        "compare with the user's verdicts (~1-2 min a round)")
    parser.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=True,
                        help="before each round, `python -m training prepare` (the serving "
                        "version's half of the gate, off the round's clock, as `training "
                        "schedule` does between rounds; timed in the row)")
    parser.add_argument("--prepare-minutes", type=float, default=20.0,
                        help="`training prepare`'s own budget (it runs between rounds, off "
                             "their clock: its reward model, synthetic pairs and reference "
                             "took 648-701 s for 300 votes on 2 cores, session 49)")
    parser.add_argument("--retention", action=argparse.BooleanOptionalAction, default=True,
                        help="after each round that reached its gate, both versions' answers "
                        "to every regression question, off the round's clock (the gate asks "
                        "as many as its time allows; ~1 min a round: most are kept)")
    parser.add_argument("--report", action="store_true",
                        help="only print the table and redraw the plot from loop.json")
    parser.add_argument("--compare", nargs="+", metavar="LABEL=FOLDER",
                        help="one user's rows from several runs' folders (each with a "
                             "loop.json; the user is --users), side by side under their labels: "
                             "writes loop.json and loop.png into --out, runs nothing")
    args = parser.parse_args(argv)
    from bench.users import unknown_users
    if args.rounds < 0:
        parser.error(f"--rounds must be 0 (the base model only) or more, got {args.rounds}")
    if not args.compare and not args.report and (message := unknown_users(
            args.users.split(","))):
        parser.error(f"--users: {message}")
    if args.compare:
        results = {"users": compared(parser, args.users, args.compare)}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "loop.json").write_text(json.dumps(results, indent=2) + "\n")
    elif args.report:
        try:
            results = json.loads((args.out / "loop.json").read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--report: cannot read {args.out / 'loop.json'} ({exc}); give the "
                         "--out folder of a bench.loop run")
    if args.report or args.compare:
        plot(results, args.out / "loop.png")
        print_table(results)
        return results

    from bench.users import make_users, words
    from serving.config import GenerationSettings
    from serving.hardware import cpu_name, dtype_reason, threads
    from training.memory import peak_mb, process_peak_mb, reset_peak

    args.out.mkdir(parents=True, exist_ok=True)
    train_pool, test = load_prompts()
    test = test[:args.test_prompts]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=None)
    shared_models = args.out / "shared-models"  # the base checkpoint, converted once
    run_args = run_settings({k: str(v) for k, v in vars(args).items()})
    results = {"users": earlier_users(args.out / "loop.json", args.users.split(","))}
    calibration = None
    for name in args.users.split(","):
        data = args.out / name / "data"
        # Each run of a user starts over: base model, empty store (not the last run's versions
        # and votes). The link to the shared base checkpoint goes with it, not the checkpoint.
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        os.environ["CHAT_DATA_DIR"] = str(data)
        shared_models.mkdir(exist_ok=True)
        (data / "models").symlink_to(shared_models.resolve())
        t, _ = time.monotonic(), reset_peak()
        before, version = replies(test, args.test_samples, settings)
        eval_s, eval_mb = time.monotonic() - t, peak_mb()
        if calibration is None:  # the base model's own length distribution
            calibration = [words(x) for xs in before for x in xs]
        [user] = make_users([name], calibration)
        row = {"args": run_args, "describe": user.describe, "approval": [approval(user, before)],
               "approval_interval": [approval_interval(user, before)],
               "machine": {"cpu": cpu_name(), "dtype": dtype_reason(), "threads": threads()},
               "versions": [version], "rounds": [], "eval_seconds": [round(eval_s, 1)],
               "eval_peak_mb": [eval_mb],
               "mean_words_before": sum(words(x) for xs in before for x in xs) /
               sum(len(xs) for xs in before)}

        def save() -> None:  # after every round: a run stopped later keeps the rounds done
            results["users"][name] = row
            results["peak_rss_mb_bench_process"] = round(process_peak_mb())
            (args.out / "loop.json").write_text(json.dumps(results, indent=2) + "\n")
            plot(results, args.out / "loop.png")

        print(f"{name}: {user.describe}; round 0 approval {row['approval'][0]:.0%} ({version})",
              flush=True)
        serving = before  # the test replies of the version the next round starts from
        for r in range(args.rounds):
            start = r * args.train_prompts % len(train_pool)
            prompts = (train_pool + train_pool)[start:start + args.train_prompts]
            t, _ = time.monotonic(), reset_peak()
            texts, version = replies(prompts, args.replies_per_prompt, settings)
            gen_s, gen_mb = time.monotonic() - t, peak_mb()
            added = additions(user, prompts, settings)
            counts = record_votes(user, prompts, texts, version, settings.to_dict(), added)
            prepared = prepare_next_gate(args.round_config, args.prepare_minutes) \
                if args.prepare else None
            training = run_training_round(args.round_config, args.max_minutes)
            t, _ = time.monotonic(), reset_peak()
            after, version = replies(test, args.test_samples, settings)
            row["eval_seconds"].append(round(time.monotonic() - t, 1))
            row["eval_peak_mb"].append(peak_mb())
            row["approval"].append(approval(user, after))
            row["approval_interval"].append(approval_interval(user, after))
            row["versions"].append(version)
            row["rounds"].append({"votes": counts, "generate_seconds": round(gen_s, 1),
                                  "generate_peak_mb": gen_mb,
                                  "prepare": prepared, "training": training,
                                  "mean_words_after": sum(words(x) for xs in after for x in xs)
                                  / sum(len(xs) for xs in after)})
            # the candidate's test replies: served now, or measured though rejected
            candidate_texts = after if training["decision"] == "promoted" else None
            if (args.measure_rejected and training["decision"] == "rejected"
                    and training["candidate"]):
                t = time.monotonic()
                theirs, _ = replies(test, args.test_samples, settings, training["candidate"])
                row["rounds"][-1]["rejected_candidate"] = {
                    "version": training["candidate"], **judged(user, theirs),
                    "eval_seconds": round(time.monotonic() - t, 1)}
                print(f"{name}: round {r + 1}: the rejected candidate would have scored "
                      f"{row['rounds'][-1]['rejected_candidate']['approval']:.0%}", flush=True)
                candidate_texts = theirs
            if args.judge_check and candidate_texts is not None:
                check = judge_on_test(user, test, serving, candidate_texts,
                                      training["candidate"])
                if check:
                    row["rounds"][-1]["judge_on_test"] = check
                    auc = (check["auc"] or {}).get("estimate", float("nan"))
                    print(f"{name}: round {r + 1}: its judge on the test replies: AUC "
                          f"{auc:.2f} by the user's thumbs; where the user's approval of the "
                          f"two versions differs, it leans the user's way on {check['agrees']} "
                          f"of {check['of']} prompts", flush=True)
            if args.retention and training.get("gate"):
                t = time.monotonic()
                full = retention_all(data)
                if full:
                    row["rounds"][-1]["retention_all"] = {
                        **full, "seconds": round(time.monotonic() - t, 1)}
                    print(f"{name}: round {r + 1}: the candidate answers {full['candidate']} of "
                          f"{full['questions']} regression questions against "
                          f"{full['current']} ({full['retention']:.0%}; lost {full['lost']}, "
                          f"gained {full['gained']})", flush=True)
            serving = after
            edits = f", {counts['edits']} edits" if "edits" in counts else ""
            print(f"{name}: round {r + 1}: {counts['votes']} votes ({counts['liked']} liked, "
                  f"{counts['picks']} picks{edits}), training {training['decision']} in "
                  f"{training['seconds']:.0f}s; approval {row['approval'][-1]:.0%} ({version})",
                  flush=True)
            save()
        save()  # --rounds 0: the base model's approval alone
    print_table(results)
    return results


def retention_all(data: Path) -> dict | None:
    """The latest round's candidate against the version it started from on every regression
    question (`bench.c_match`: the replies its gate and `prepare` kept, the rest written
    now): correct counts, lost and gained, retention, the gate's accuracy check and a sign
    test. The gate's own (c) asks as many as its time allows; this asks them all, so a
    round's retention is read on the same questions whatever its gate had time for."""
    from bench.c_match import gate_row
    reports = sorted((data / "reports").glob("r*.json"))
    row = gate_row(data, json.loads(reports[-1].read_text()), answer=True) if reports else None
    return {"questions": row["questions"], **row["now"]} if row else None


def earlier_users(path: Path, rerun: list[str]) -> dict:
    """The rows of users an earlier run measured into the same folder and this run does not
    redo, so users can be measured one invocation at a time into one table and plot."""
    try:
        earlier = json.loads(path.read_text())
        users, shared_args = earlier["users"], earlier.get("args", {})
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    kept = {name: row for name, row in users.items() if name not in rerun}
    for row in kept.values():  # files from before each row named its own run's settings
        row.setdefault("args", run_settings(shared_args))
    return kept


def compared(parser, user: str, entries: list[str]) -> dict:
    """`user`'s row from each `LABEL=FOLDER` run, keyed by its label (e.g. the same user under
    three round configs). A folder without that user, or an entry without a label, is refused
    with a message that names it."""
    rows = {}
    for entry in entries:
        label, sep, folder = entry.partition("=")
        if not sep or not label or not folder:
            parser.error(f"--compare takes LABEL=FOLDER entries, got {entry!r}")
        try:
            rows[label] = json.loads((Path(folder) / "loop.json").read_text())["users"][user]
        except (OSError, ValueError) as exc:
            parser.error(f"--compare {entry!r}: cannot read {folder}/loop.json ({exc})")
        except KeyError:
            parser.error(f"--compare {entry!r}: {folder}/loop.json has no row for {user!r} "
                         "(give one user with --users)")
    return rows


def run_settings(args: dict) -> dict:
    """A run's arguments that shape its figures (not which users, not where they went)."""
    return {k: v for k, v in args.items() if k not in ("users", "out")}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, kept) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    users = results["users"]
    measured = max(len(r["approval"]) for r in users.values())  # the base, then each round
    for k, (name, row) in enumerate(users.items()):
        x = range(len(row["approval"]))
        y = [100 * a for a in row["approval"]]
        ivs = row.get("approval_interval") or [[a, a] for a in row["approval"]]
        err = [[a - 100 * lo for a, (lo, _) in zip(y, ivs)],
               [100 * hi - a for a, (_, hi) in zip(y, ivs)]]
        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
        shift = 0.06 * (k - (len(users) - 1) / 2)  # points of equal value stay apart
        tried = [(i + 1.06 + shift, 100 * r["rejected_candidate"]["approval"])  # beside it
                 for i, r in enumerate(row["rounds"]) if r.get("rejected_candidate")]
        if tried:  # what a rejected candidate would have scored: hollow, not joined
            ax.scatter(*zip(*tried), marker="o", facecolors="none",
                       edgecolors=line.lines[0].get_color(), s=60)
        retained = [(i + 1 + shift, 100 * retention, r["training"]["decision"] == "promoted")
                    for i, r in enumerate(row["rounds"])
                    if (retention := retention_of(r)) is not None]
        for served in (True, False):  # each round's candidate: filled served, hollow rejected
            points = [(x, y) for x, y, s in retained if s == served]
            if points:
                kept.scatter(*zip(*points), marker="o", s=50,
                             facecolors=line.lines[0].get_color() if served else "none",
                             edgecolors=line.lines[0].get_color())
    ax.set_xticks(range(measured))
    ax.set_xlabel("round")
    ax.set_ylabel("held-out approval (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Approval per round, per simulated user (95% intervals)\n"
                 "hollow: a rejected candidate's own approval", fontsize=10)
    ax.grid(alpha=0.3)
    kept.axhline(95, color="grey", linestyle="--", linewidth=1)  # the target
    kept.set_xticks(range(1, measured))
    kept.set_xlabel("round")
    kept.set_ylabel("regression retention (%)")
    kept.set_title("Regression retention of each round's candidate\n(every question "
                   "where measured, else the gate's); filled: promoted, hollow: rejected",
                   fontsize=10)
    kept.grid(alpha=0.3)
    fig.tight_layout()
    # under the figure: inside the axes, some corner always hid a line or a rejected candidate
    fig.legend(*ax.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(users), 6), frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend under the figure included


def retention_of(rnd: dict) -> float | None:
    """A round's regression retention: on every question where measured (`retention_all`,
    since session 43), else on those its gate asked."""
    full = rnd.get("retention_all")
    return full["retention"] if full else (rnd["training"].get("gate") or {}).get("c_retention")


def _pct(v: float | None) -> str:
    return f"{v:.0%}" if v is not None else "-"


def all_questions(rnd: dict | None) -> str:
    """The table's retention on every regression question ('94%/240'), or '-'."""
    full = (rnd or {}).get("retention_all")
    return f"{full['retention']:.0%}/{full['questions']}" if full else "-"


def print_table(results: dict) -> None:
    """One line per user and round: approval before -> after with 95% intervals, the round's
    decision and minutes, each stage's seconds, the judge's held-out AUC and pair accuracy, its
    AUC on both versions' test replies by the user's thumbs and how often it leaned the user's
    way where the user's approval of them differed (`judge_on_test`), the synthetic pairs, the
    tuning steps, peak memory and regression retention (the gate's, and on every question where
    measured). A rejected candidate's own approval,
    where measured, follows its row; the machine that ran it, where the row says, ends it."""
    w = max([11, *map(len, results["users"])])
    print(f"\n{'user':<{w}} {'rnd':>3} {'approval before -> after (95%)':<34} {'decision':>9} "
          f"{'min':>5} {'RM s':>5} {'AUC':>5} {'pairacc':>7} {'on test':>10} {'synth':>9} "
          f"{'tune':>11} {'gate':>5} {'peak MB':>8} {'retain':>6} {'all Qs':>10}")
    for name, row in results["users"].items():
        ivs = row.get("approval_interval") or [[None, None]] * len(row["approval"])

        def shown(i):
            lo, hi = ivs[i]
            band = f" [{lo:.0%},{hi:.0%}]" if lo is not None else ""
            return f"{row['approval'][i]:.0%}{band}"
        for i, rnd in enumerate(row["rounds"] or [None]):
            t = rnd["training"] if rnd else {}
            gate, times = t.get("gate") or {}, t.get("timings_s") or {}
            tuning = t.get("tuning") or {}
            judge = (t.get("reward_model") or {}).get("judge") or {}
            synth = t.get("synthetic") or {}
            auc = (judge.get("auc") or {}).get("estimate")
            on_test = rnd.get("judge_on_test") if rnd else None
            test_auc = ((on_test or {}).get("auc") or {}).get("estimate")
            on_test = "-" if not on_test else (
                f"{'-' if test_auc is None else f'{test_auc:.2f}'} "
                f"{on_test['agrees']}/{on_test['of']}")
            moved = f"{shown(i)} -> {shown(i + 1)}" if rnd else shown(0)
            print(f"{name if i == 0 else '':<{w}} {i + 1 if rnd else 0:>3} {moved:<34} "
                  f"{t.get('decision') or '-':>9} {t.get('seconds', 0) / 60:>5.1f} "
                  f"{times.get('reward_model', 0):>5.0f} "
                  f"{'-' if auc is None else f'{auc:.2f}':>5} "
                  f"{_pct(judge.get('pair_accuracy')):>7} {on_test:>10} "
                  f"{synth.get('pairs', 0):>3}/{times.get('synthetic', 0):>3.0f}s "
                  f"{times.get('tuning', 0):>4.0f}s/{tuning.get('steps', 0):>2} st "
                  f"{times.get('gate', 0):>4.0f}s {t.get('peak_rss_mb', 0):>8} "
                  f"{_pct(gate.get('c_retention')):>6} {all_questions(rnd):>10}")
            if rnd and rnd.get("rejected_candidate"):
                cand = rnd["rejected_candidate"]
                lo, hi = cand["approval_interval"]
                print(f"{'':<{w}} {'':>3}   (rejected candidate: {cand['approval']:.0%} "
                      f"[{lo:.0%},{hi:.0%}])")
        if row.get("machine"):  # rows written before this field (session 24) do not say
            m = row["machine"]
            print(f"{'':<{w}}       on {m['cpu']}, {m['threads']} threads, {m['dtype']}")


if __name__ == "__main__":
    main()
