"""A small run of the learning-loop benchmark, so it cannot silently break: one user, two rounds,
a few prompts, the tiny model, the real store, serving and `python -m training run`."""

from __future__ import annotations

import json

import sqlite3

import pytest
import torch

from bench import (a_check, approval, b_budget, b_forms, b_sample, c_match, ceiling,
                   gate_replay, hints, interpolate, judge_lr, judge_picks, reasons,
                   reply_batching, variants)
from bench.loop import load_prompts, main
from bench.users import make_users
from serving.config import ServingConfig
from serving.registry import Registry
from training.evaluate import load_regression_set

FAST_ROUND = {"tune": {"max_steps": 2, "batch_size": 4, "bf16": False},
              "reward": {"max_steps": 2, "batch_size": 4},
              "gate": {"max_heldout_prompts": 2, "reply_max_new_tokens": 8,
                       "judged_max_new_tokens": 8},
              "data": {"heldout_fraction": 0.5, "min_votes": 4, "min_per_label": 1}}


def store_votes(data) -> int:
    with sqlite3.connect(data / "feedback.db") as db:
        return db.execute("SELECT count(*) FROM votes").fetchone()[0]


def test_prompt_set_and_users():
    train, test = load_prompts()
    assert len(train) + len(test) >= 300 and len(test) >= 60
    assert {p["id"] for p in train}.isdisjoint(p["id"] for p in test)
    assert any(len(p["messages"]) == 3 for p in test)  # multi-turn prompts are tested too
    concise, example, structured, filler = make_users(
        ["concise", "example", "structured", "no_filler"], list(range(1, 101)))
    assert concise.judge("one two three") == (True, ["clear"])
    # a reason only when the case is clear-cut
    assert concise.judge("word " * 200) == (False, ["too verbose"])
    assert concise.judge("word " * 40) == (False, [])
    assert example.judge("For example, tea. For instance, coffee.") == (True, ["thorough"])
    assert example.judge("Tea.") == (False, []) and example.judge("tea " * 120)[1]
    assert example.judge("Use less salt, for example in soups.")[0]
    assert structured.judge("Steps:\n1. Boil water\n2. Add tea")[0]
    assert not filler.judge("Sure! Here you go.")[0] and filler.judge("Tea needs 3 minutes.")[0]


def test_the_users_own_rule_reads_and_picks_synthetic_pairs(tmp_path):
    """`bench.variants` reads a round's synthetic pairs by the simulated user's rule (right,
    wrong, both liked, neither) and, with --synthetic-by-user, picks them by it: 1 for a reply
    it likes, 0 for one it does not. An unreadable file reads as nothing."""
    [tips] = make_users(["tips"], list(range(1, 101)))
    liked, disliked = "Boil it. Tip: salt the water.", "Boil it."
    judge = variants.UserAsJudge(tips)
    assert judge.score([[{"role": "user", "content": "How?"},
                         {"role": "assistant", "content": t}] for t in (liked, disliked)]) \
        == [1.0, 0.0]

    def pair(chosen, rejected):
        return {"prompt": [{"role": "user", "content": "Pasta?"}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps({"pairs": [pair(liked, disliked), pair(liked, disliked),
                                          pair(disliked, liked), pair(liked, liked),
                                          pair(disliked, disliked)]}))
    assert variants.synthetic_by_user(tips, path) == {
        "pairs": 5, "right": 2, "wrong": 1, "both liked": 1, "neither liked": 1}
    path.write_text("{not json")
    assert variants.synthetic_by_user(tips, path) is None
    assert variants.synthetic_by_user(tips, tmp_path / "none.json") is None


def test_the_editing_user_stores_each_edit_as_a_pair_over_the_original(tiny_model):
    """`tips_edits` adds a tip to the first reply it dislikes on its share of the prompts,
    through the page's own edit: the store keeps the edit as the selected reply and a pair
    (source "edit") over the original, which training reads. No words to add, or words that
    would not please it, and it leaves the reply alone."""
    from bench.loop import additions, edited_prompts, record_votes, replies
    from serving.config import GenerationSettings
    from bench.users import tip_sentence
    from feedback import db, io
    from training.dataset import load_feedback

    assert tip_sentence("Boil it.\n\n- **Tip:** Salt the water. It helps.") == \
        "Tip: Salt the water."
    assert tip_sentence("Boil it. Then eat.") is None
    assert tip_sentence("Remember " + "this " * 60) is None  # too long to be a sentence added
    [user] = make_users(["tips_edits"], list(range(1, 101)))
    [tips] = make_users(["tips"], [1])
    for reply in ("Boil it.", "Remember the salt.", "word " * 120):
        assert user.judge(reply) == tips.judge(reply)  # wants what tips wants
    assert edited_prompts(user, 100) == list(range(34)) and edited_prompts(user, 3) == [0, 1, 2]
    assert user.edited("Boil it.", "Keep in mind the salt.") == \
        "Boil it.\n\nKeep in mind the salt."
    assert user.edited("Boil it.", "Add salt.") is None  # still no tip: not an edit it makes
    assert user.edited("Boil it.", None) is None

    prompts = load_prompts()[0][:4]
    texts = [["Boil it.", "Tip: salt the water."], ["Plain.", "Also plain."],
             ["Remember the lid.", "Make sure it boils."], ["Stir.", ""]]
    added = {0: "Remember to salt the water.", 1: None, 2: "Keep in mind the time.",
             3: "Add salt."}
    counts = record_votes(user, prompts, texts, "base", {}, added)
    assert counts == {"votes": 7, "liked": 3, "picks": 0, "with_reason": 0, "edits": 1,
                      "edits_without_words": 2}
    with db.transaction() as session:
        pairs = list(io.iter_pair_rows(session=session))
    assert [(p["source"], p["chosen"][0]["content"], p["rejected"][0]["content"])
            for p in pairs] == [("edit", "Boil it.\n\nRemember to salt the water.", "Boil it.")]
    assert pairs[0]["prompt"] == prompts[0]["messages"]
    data = load_feedback()
    assert any(p["chosen"][0]["content"].endswith("salt the water.") for p in data.pairs)

    assert "edits" not in record_votes(tips, prompts, texts, "base", {}, added)  # no others
    assert additions(tips, prompts, GenerationSettings(max_new_tokens=8)) == {}

    # the words come from the serving version asked for a tip: each of the user's prompts
    # gets some (a sentence with a tip word) or None; the asked replies are kept apart from
    # the plain replies to the same prompts
    settings = GenerationSettings(max_new_tokens=8, seed=None)
    words = additions(user, prompts[:2], settings, tries=2)
    assert set(words) == {0, 1}
    assert all(w is None or tip_sentence(w) == w for w in words.values())
    asked = [{**p, "messages": p["messages"][:-1] + [{**p["messages"][-1], "content": p[
        "messages"][-1]["content"] + "\n\n" + user.edit_request}]} for p in prompts[:2]]
    asked_texts = replies(asked, 2, settings)[0]  # kept from the call above, by its messages
    assert len(asked_texts) == 2 and replies(prompts[:2], 2, settings)[0] is not asked_texts
    with db.transaction() as session:
        assert len(list(io.iter_pair_rows(session=session))) == 1


def test_bench_command_lines_refuse_bad_input_before_any_work(tmp_path, capsys):
    """An unknown user, a negative round count, a --report without a run, a gate setting that
    does not exist or is out of range, results that are not there, no questions to ask: a
    message naming the problem at once, nothing written (before, an unknown user failed after
    minutes of the base model's replies, and --report on an empty folder with a traceback)."""
    out = tmp_path / "loop"
    store = tmp_path / "store"  # votes and models, as a bench.loop run leaves them
    store.mkdir()
    (store / "feedback.db").touch()
    (store / "models").mkdir()
    cases = [
        (main, ["--users", "concise,nobody", "--out", str(out)], "unknown users ['nobody']"),
        (main, ["--users", "concise", "--rounds", "-1", "--out", str(out)], "--rounds"),
        (main, ["--report", "--out", str(out)], "cannot read"),
        (variants.main, ["--user", "nobody", "--store", str(tmp_path), "--variants", "{}"],
         "unknown users ['nobody']"),
        (judge_picks.main, ["--store", str(store), "--user", "nobody"], "unknown users"),
        (judge_picks.main, ["--store", str(store), "--user", "concise"], "read another user"),
        (judge_picks.main, ["--store", str(store), "--user", "tips", "--samples", "1"],
         "--samples: 2 to 16 replies a prompt, not 1"),
        (judge_picks.main, ["--store", str(store), "--user", "tips", "--hinted", "17"],
         "--hinted: 0 to 16"),
        (hints.main, ["--prompts", "0"], "--prompts: 1 to 248 training prompts, not 0"),
        (hints.main, ["--samples", "17"], "--samples: 1 to 16 replies, not 17"),
        (hints.main, ["--hints", " | "], "--hints: at least one request"),
        (hints.main, ["--places", "system,nowhere"], "--places: one or both of system, message"),
        (hints.main, ["--max-new-tokens", "-1"], "--max-new-tokens: 0"),
        (judge_picks.main, ["--store", str(store), "--user", "tips", "--margins", "1,x"],
         "--margins: numbers separated by commas, not '1,x'"),
        (judge_picks.main, ["--store", str(store), "--user", "tips", "--margins", "-1"],
         "--margins: at least one, each a finite number >= 0"),
        (judge_picks.main, ["--store", str(store), "--user", "tips", "--out", str(out)],
         "holds no reward model prepared by `training prepare`"),
        (variants.main, ["--user", "tips", "--store", str(store), "--variants", '{"a": {}}',
                         "--synthetic-by-user", "--no-prepare", "--out", str(out)],
         "--synthetic-by-user replaces the pairs `training prepare` makes: drop --no-prepare"),
        (reasons.main, ["--users", "tips,nobody", "--out", str(tmp_path / "reasons")],
         "unknown users ['nobody']"),
        (b_sample.main, ["--store", str(tmp_path), "--user", "nobody"],
         "unknown users ['nobody']"),
        (gate_replay.main, ["--store", str(tmp_path), "--gate", "judged_samples=0"],
         "gate.judged_samples must be in [1, 16]"),
        (gate_replay.main, ["--store", str(tmp_path), "--gate", "judged_samples"],
         "expected NAME=VALUE"),
        (gate_replay.main, ["--store", str(tmp_path), "--gate", "judged=2"],
         "unknown setting 'gate.judged'"),
        (gate_replay.main, ["--store", str(tmp_path), "--extra-seconds", "-30"],
         "argument --extra-seconds: must be in [0, inf), not -30.0"),
        (gate_replay.main, ["--store", str(tmp_path), "--extra-seconds", "nan"],
         "argument --extra-seconds: must be in [0, inf), not nan"),
        (gate_replay.main, ["--store", str(tmp_path), "--extra-seconds", "inf"],
         "argument --extra-seconds: must be in [0, inf), not inf"),
        (gate_replay.main, ["--store", str(tmp_path), "--extra-seconds", "1m"],
         "argument --extra-seconds: invalid float value: '1m'"),
        (interpolate.main, ["--store", str(tmp_path), "--scales", "0,1,-1"],
         "argument --scales: every scale must be a finite number >= 0, not -1.0"),
        (interpolate.main, ["--store", str(tmp_path), "--scales", "nan"],
         "every scale must be a finite number >= 0, not nan"),
        (interpolate.main, ["--store", str(tmp_path), "--scales", "0.5,1,0.5"],
         "a scale is given twice: '0.5,1,0.5'"),
        (interpolate.main, ["--store", str(tmp_path), "--scales", "half"],
         "not numbers separated by commas: 'half'"),
        (interpolate.main, ["--store", str(tmp_path)], "holds no reports and versions folders"),
        (approval.main, ["--user", "nobody", "--version", f"a={tmp_path}"],
         "unknown users ['nobody']"),
        (approval.main, ["--user", "tips", "--version", str(tmp_path)],
         "expected LABEL=STORE[@VERSION]"),
        (approval.main, ["--user", "tips", "--version", f"a={tmp_path}"],
         "holds no versions folder"),
        (approval.main, ["--user", "tips", "--version", f"a={tmp_path}",
                         "--version", f"a={tmp_path}@base"], "a label is given twice"),
        (approval.main, ["--user", "tips", "--version", f"a={tmp_path}", "--test-samples", "0"],
         "--test-samples"),
        (b_budget.main, ["--results", str(tmp_path / "none.json")], "cannot read"),
        (reply_batching.main, ["--questions", "0", "--out", str(tmp_path / "batching")],
         "--questions must be at least 1"),
        (b_forms.main, ["--results", str(tmp_path / "none"), "--out", str(tmp_path / "b.json")],
         "is not a folder of results"),
        (b_forms.main, ["--results", str(tmp_path), "--out", str(tmp_path / "b.json")],
         "no loop.json")]
    for command, argv, message in cases:
        with pytest.raises(SystemExit) as exited:
            command(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err
    # nothing written, no store deleted or made
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
    assert sorted(p.name for p in store.iterdir()) == ["feedback.db", "models"]


def test_small_loop_runs_the_real_pipeline(tiny_model, tmp_path):
    out = tmp_path / "loop"
    main(["--users", "concise", "--rounds", "2", "--train-prompts", "12",
          "--replies-per-prompt", "2", "--test-prompts", "4", "--test-samples", "1",
          "--max-new-tokens", "12", "--max-minutes", "10",
          "--round-config", json.dumps(FAST_ROUND), "--out", str(out)])
    result = json.loads((out / "loop.json").read_text())
    row = result["users"]["concise"]
    assert len(row["approval"]) == 3 and all(0 <= a <= 1 for a in row["approval"])
    assert len(row["approval_interval"]) == len(row["versions"]) == 3
    rnd, second = row["rounds"]
    assert rnd["votes"]["votes"] == second["votes"]["votes"] == 24
    if second["training"]["exit_code"] not in (3, 6):  # the second reads both rounds' votes
        # (identical replies to one prompt merge into one row)
        assert 24 < second["training"]["data"]["all"]["votes"] <= 48
    assert rnd["training"]["exit_code"] in (0, 3, 5, 6) and rnd["training"]["peak_rss_mb"] > 0
    for i, r in enumerate(row["rounds"]):  # each round's gate prepared for the version serving
        assert r["prepare"]["exit_code"] == 0 and r["prepare"]["seconds"] > 0
        assert r["prepare"]["prepared"]["version"] == row["versions"][i]
    stages = rnd["training"]["peak_mb"]  # each stage's own peak memory, beside its time
    assert set(stages) == set(rnd["training"]["timings_s"]) - {"total"}
    if rnd["training"]["exit_code"] not in (3, 6):
        assert set(stages) == {"data", "reward_model", "synthetic", "tuning", "gate"}
        # the judge's check and the synthetic pairs (or why none) reach the bench's row
        assert "judge" in rnd["training"]["reward_model"]
        assert "pairs" in rnd["training"]["synthetic"]
    assert all(mb > 0 for mb in stages.values())
    assert rnd["training"]["peak_rss_mb"] >= max(stages.values()) - 1
    assert len(row["eval_peak_mb"]) == 3 and rnd["generate_peak_mb"] > 0
    assert (out / "loop.png").stat().st_size > 0
    assert row["args"]["train_prompts"] == "12"
    assert row["machine"]["dtype"].startswith(("bfloat16 (", "float32 (")) and \
        row["machine"]["threads"] >= 1 and row["machine"]["cpu"]  # which machine measured it
    for r in row["rounds"]:  # a rejected candidate is measured too, on the same test prompts
        t = r["training"]
        if t["decision"] == "rejected":
            cand = r["rejected_candidate"]
            assert cand["version"] == t["candidate"] and 0 <= cand["approval"] <= 1
            assert cand["approval_interval"][0] <= cand["approval"] <= cand["approval_interval"][1]
        else:
            assert "rejected_candidate" not in r
        # the round's judge on both versions' test replies, against the user's own thumbs
        if t["decision"] in ("promoted", "rejected") and t["candidate"]:
            check = r["judge_on_test"]
            assert check["replies"] == 2 * 4 and check["prompts"] == 4
            assert 0 <= check["agrees"] <= check["of"] <= check["prompts"]
            assert check["of"] == sum(check["user_prefers"].values())
            assert 0 <= check["judge_prefers_candidate"] <= 1
            assert check["auc"] is None or 0 <= check["auc"]["estimate"] <= 1
        else:
            assert "judge_on_test" not in r
        if t.get("gate"):  # both versions on every regression question, off the round's clock
            full = r["retention_all"]
            assert full["questions"] == len(load_regression_set()) >= t["gate"]["c_questions"]
            assert full["candidate"] - full["current"] == full["gained"] - full["lost"]
            assert t["gate"]["c_correct"][0] <= full["current"] <= full["questions"]
            assert full["retention"] == (full["candidate"] / full["current"]
                                         if full["current"] else 1.0)
        else:
            assert "retention_all" not in r

    # (c) read again from the replies its gates kept: two ways on the questions each gate
    # asked, and on every question (all kept now, by the loop's own retention above)
    store = out / "concise" / "data"
    gated = [r for r in row["rounds"] if r["training"].get("gate")]
    for answer in (False, True):
        found = c_match.main(["--store", str(store), "--out", str(tmp_path / "c")]
                             + ["--answer"] * answer)
        assert len(found) == len(gated)
        for r, got in zip(gated, sorted(found.values(), key=lambda g: g["round"])):
            assert got["round"] == r["training"]["candidate"]
            assert got["questions"] == (len(load_regression_set()) if answer
                                        else r["training"]["gate"]["c_questions"])
            if answer:
                assert {k: got["now"][k] for k in ("current", "candidate", "lost", "gained")} \
                    == {k: r["retention_all"][k] for k in ("current", "candidate", "lost",
                                                             "gained")}
            else:  # the gate's own reading of its questions, by today's matcher
                assert [got["now"]["current"], got["now"]["candidate"]] == \
                    r["training"]["gate"]["c_correct"]
            assert 0 <= got["before"]["current"] <= got["questions"]  # the old matcher too
    assert json.loads((tmp_path / "c" / "c_match_all.json").read_text()) == \
        json.loads(json.dumps(found))  # what it returned is what it wrote
    # the same replies cut to their first 2 tokens: what a shorter reply cap would read
    cut = c_match.main(["--store", str(store), "--out", str(tmp_path / "c"), "--cap", "2"])
    assert cut.keys() == found.keys()
    for k, got in cut.items():
        assert got["tokens"]["cap"] == 2 and got["tokens"]["within_cap"] <= 2 * 2 * \
            got["questions"] and got["tokens"]["within_cap"] <= got["tokens"]["all"]
    assert json.loads((tmp_path / "c" / "c_match_cap2.json").read_text()) == cut
    for bad in (["--store", str(tmp_path)], ["--store", str(store), "--cap", "0"]):
        with pytest.raises(SystemExit):  # not a loop's data folder, or no tokens: named
            c_match.main([*bad, "--out", str(tmp_path / "c")])

    # two round configs trained on the same votes (a copy each: the loop's store is untouched)
    votes_before = store_votes(store)
    found = variants.main(["--user", "concise", "--store", str(store), "--variants",
                           json.dumps({"a": {}, "b lr": {"tune": {"learning_rate": 1e-3,
                                                                   "replay_weight": 0.5}}}),
                           "--round-config", json.dumps(FAST_ROUND), "--test-prompts", "2",
                           "--test-samples", "1", "--max-new-tokens", "8",
                           "--synthetic-by-user", "--out", str(tmp_path / "variants")])
    assert found == json.loads((tmp_path / "variants" / "variants.json").read_text())
    vrow = found["users"]["concise"]
    assert 0 <= vrow["base"]["approval"] <= 1 and set(vrow["variants"]) == {"a", "b lr"}
    assert vrow["variants"]["b lr"]["config"]["tune"]["learning_rate"] == 1e-3
    assert vrow["variants"]["b lr"]["config"]["reward"] == FAST_ROUND["reward"]
    for name, v in vrow["variants"].items():
        copy = tmp_path / "variants" / "concise" / name.replace(" ", "-") / "data"
        assert store_votes(copy) == votes_before
        # its gate prepared for the base model, which serves in the fresh copy
        assert v["prepare"]["exit_code"] == 0
        assert v["prepare"]["prepared"]["version"] == row["versions"][0]
        # the pairs prepare made (if its judge was trusted) replaced by ones the user picked,
        # then prepared again for their reference; the round's report says who picked them
        picked = v["synthetic_picked_by_user"]
        assert picked["prepare_again"]["exit_code"] == 0
        if "why" in picked["sampled"]:
            assert picked["judge's"] is None and v["synthetic_by_user"] is None
        else:
            assert picked["sampled"]["picked_by"] == "the simulated user concise"
            assert v["synthetic_by_user"]["pairs"] == picked["sampled"]["pairs"]
            assert v["synthetic_by_user"]["right"] == picked["sampled"]["pairs"]
        # trained and gated (promoted or rejected), or, as in the loop's rounds above, the tiny
        # model's votes gave too little to train on (exit 3: one label, too few pairs; exit 6:
        # the user liked nearly all the serving version's replies)
        assert v["training"]["exit_code"] in (0, 3, 5, 6)
        if v["training"]["exit_code"] not in (3, 6):
            assert 0 <= v["candidate"]["approval"] <= 1 and v["base"] == vrow["base"]
            assert (copy / "versions" / v["training"]["candidate"]).is_dir()
            full = v["retention_all"]  # the candidate and the base on every question
            assert full["questions"] == len(load_regression_set())
            assert full["candidate"] - full["current"] == full["gained"] - full["lost"]
            tuning = v["training"]["tuning"]  # "b lr" replays the base's own replies
            if name == "a":
                assert "replay" not in tuning and "replay" not in v["prepare"]["prepared"]
            elif tuning["method"] == "dpo":
                assert tuning["replay"]["rows"] == 96 and tuning["replay"]["rows_taken"] > 0
                assert v["prepare"]["prepared"]["replay"]["written"] == 96
            else:  # the tiny model's votes gave KTO too few pairs: replay joins DPO only
                assert tuning["replay"]["why"] == f"off: replay joins DPO's steps, and this " \
                                                  f"round ran {tuning['method']}"
    assert store_votes(store) == votes_before
    with pytest.raises(SystemExit):  # a folder without votes: a clear message, nothing run
        variants.main(["--user", "concise", "--store", str(tmp_path), "--variants", "{}"])

    # a variant's prepared judge read against a user's rule on fresh samples of its prompts
    copy = tmp_path / "variants" / "concise" / "a" / "data"
    if (copy / "training" / "judge" / "judge.json").is_file():
        files = sorted(p.relative_to(copy) for p in copy.rglob("*"))
        found = judge_picks.main(["--store", str(copy), "--user", "tips", "--samples", "2",
                                  "--hinted", "1", "--margins", "0,1", "--max-new-tokens", "8",
                                  "--out", str(tmp_path / "picks")])
        assert found == json.loads((tmp_path / "picks" / "judge_picks.json").read_text())
        got = found[str(copy)]
        assert got["replies"] == 3 * got["prompts"] > 0 and 0 <= got["liked"] <= got["replies"]
        assert got["auc_all"] is None or 0 <= got["auc_all"] <= 1
        assert set(got["picks"]) == {"2", "2+1 hinted"}
        for pick in got["picks"].values():
            assert set(pick["judge"]) == {"0", "1"}
            for c in pick["judge"].values():
                assert c["pairs"] == (c["right"] + c["wrong"] + c["both liked"]
                                      + c["neither liked"]) <= got["prompts"]
        liked, everything = {}, {}
        for i, _, ok, asked in got["scored"]:
            everything.setdefault(i, []).append(ok)
            if asked == -1:  # a plain sample
                liked.setdefault(i, []).append(ok)
        assert len(got["scored"]) == got["replies"] and len(liked) == got["prompts"]
        assert got["picks"]["2"]["user would make"] == sum(any(v) and not all(v)
                                                           for v in liked.values())
        assert got["picks"]["2+1 hinted"]["user would make"] == sum(
            any(v) and not all(v) for v in everything.values())
        plain, *asked = got["by_hint"]  # one request a prompt, rotating over the hints
        assert plain["request"] is None and plain["replies"] == 2 * got["prompts"]
        assert sum(h["replies"] for h in asked) == got["prompts"]
        assert sum(h["liked"] for h in got["by_hint"]) == got["liked"]
        assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == files  # nothing written

    # a round's judge trained again at other learning rates, in its time, checked the same way
    lr_out = ["--out", str(tmp_path / "judge_lr")]
    if any(r["training"]["exit_code"] not in (3, 6) for r in row["rounds"]):
        found = judge_lr.main(["--store", str(store), "--rates", "1e-4,1e-3", "--seconds", "60",
                               *lr_out])
        (key, jrow), = found.items()
        assert key.startswith("concise r") and set(jrow["rates"]) == {"0.0001", "0.001"}
        for run in jrow["rates"].values():
            assert run["steps"] >= 1 and isinstance(run["judge"]["trusted"], bool)
        assert found == json.loads((tmp_path / "judge_lr" / "judge_lr.json").read_text())
        assert store_votes(store) == votes_before
    for bad in (["--store", str(store), "--rates", "fast"], ["--store", str(store), "--rates", "0"],
                ["--store", str(tmp_path)]):  # not rates; a rate of 0; no round reached a gate
        with pytest.raises(SystemExit):
            judge_lr.main([*bad, *lr_out])

    # (a) now and before session 21, from the log-probabilities the store's gates kept: the
    # same figures the gates reported, and a store without reports refused
    reports = [json.loads(p.read_text()) for p in sorted((store / "reports").glob("r*.json"))]
    judged = {r["round"]: r["gate"]["checks"]["a_heldout_ranking"] for r in reports
              if "difference" in (r.get("gate") or {}).get("checks", {}).get(
                  "a_heldout_ranking", {})}
    found = a_check.main(["--store", str(store), "--out", str(tmp_path / "a_check")])
    assert found == json.loads((tmp_path / "a_check" / "a_check.json").read_text())
    # the replay orders the votes as the gate did, so its bootstrap is the gate's exactly
    assert {r["round"]: r["now"]["difference"] for r in found.values()} == \
        {name: a["difference"] for name, a in judged.items()}
    assert all(r["votes"] == judged[r["round"]]["votes"] for r in found.values())
    with pytest.raises(SystemExit):
        a_check.main(["--store", str(tmp_path), "--out", str(tmp_path / "a_check")])

    # (b)'s two forms, greedy and sampled, on the rounds that reached a gate: the round's judge
    # and the simulated user on the same replies
    if any(r.get("gate") for r in reports):
        found = b_sample.main(["--store", str(store), "--samples", "2", "--max-prompts", "2",
                               "--out", str(tmp_path / "b_sample")])
        assert found == json.loads((tmp_path / "b_sample" / "b_sample.json").read_text())
        for r in found["concise"]:
            assert r["prompts"] <= 2 and r["samples"] == 2
            for form in ("greedy", "sampled"):
                f = r[form]
                assert 0 <= f["judge_prefers_candidate"]["estimate"] <= 1 and f["seconds"] > 0
                assert all(0 <= a <= 1 for a in f["user_approval"])
                assert 0 <= f["judge_agrees"] <= f["user_tells_apart"] <= r["prompts"]
                assert len(f["per_reply"]["candidate"]["judge"]) == \
                    r["prompts"] * (2 if form == "sampled" else 1)
        assert store_votes(store) == votes_before
        # the same replies replayed at equal reply budgets: greedy 2 x 1, sampled 1 x 2 and 2 x 2
        replayed = b_budget.main(["--results", str(tmp_path / "b_sample" / "b_sample.json"),
                                  "--draws", "3", "--budgets", "2,4"])
        for key, forms in replayed.items():
            r = next(r for r in found["concise"] if key == f"concise {r['round']}")
            if r["prompts"] == 2:
                assert [(f["form"], f["prompts"], f["replies_per_prompt"]) for f in forms] == \
                    [("greedy", 2, 1), ("sampled", 1, 2), ("sampled", 2, 2)]
                whole = forms[-1]  # every reply: b_sample's own figures
                assert whole["confidence"] == pytest.approx(
                    r["sampled"]["judge_prefers_candidate"]["p_better"])
                assert whole["user_approval"] == pytest.approx(r["sampled"]["user_approval"])
        with pytest.raises(SystemExit):
            b_budget.main(["--results", str(tmp_path / "b_sample" / "b_sample.json"),
                           "--budgets", "0"])
    with pytest.raises(SystemExit):  # no round reached a gate there
        b_sample.main(["--store", str(tmp_path), "--user", "concise",
                       "--out", str(tmp_path / "b_sample")])

    # a round's change scaled: half of it is a version of its own, its weights halfway between
    # the parent's and the candidate's; 0 and 1 are the parent and the candidate themselves
    made = [r["training"]["candidate"] for r in row["rounds"] if r["training"]["candidate"]]
    if made:
        found = interpolate.main(["--store", str(store), "--user", "concise", "--scales",
                                  "0,0.5,1", "--test-prompts", "2", "--test-samples", "1",
                                  "--max-new-tokens", "8", "--out", str(tmp_path / "interp")])
        assert found == json.loads((tmp_path / "interp" / "interpolate.json").read_text())
        (irow,) = found.values()
        cand, parent = made[-1], irow["parent"]
        assert irow["round"] == cand and (tmp_path / "interp" / "interpolate.png").is_file()
        assert 0 <= irow["base"]["approval"] <= 1  # the base model's, as the loop measures it
        assert [s["version"] for s in irow["scales"].values()] == [parent, f"{cand}-x0.5", cand]
        half = json.loads((store / "versions" / f"{cand}-x0.5" / "meta.json").read_text())
        assert (half["kind"], half["scale"], half["scaled_from"], half["parent"]) == \
            ("scaled", 0.5, cand, parent)
        weights = {}
        for name in (parent, f"{cand}-x0.5", cand):
            model = Registry().load(name, ServingConfig(dtype="float32")).model
            weights[name] = {k: w.detach() for k, w in model.named_parameters()}
        changed = 0
        for k, w in weights[cand].items():
            start = weights[parent][k]
            changed += not torch.equal(w, start)
            assert torch.allclose(weights[f"{cand}-x0.5"][k], start + 0.5 * (w - start),
                                  atol=1e-6)
        assert changed  # the round changed some weights (its LoRA's blocks)
        for s in irow["scales"].values():
            assert s["approval_interval"][0] <= s["approval"] <= s["approval_interval"][1]
            full = s["retention"]
            assert full["questions"] == len(load_regression_set())
            assert full["candidate"] - full["current"] == full["gained"] - full["lost"]
        zero = irow["scales"]["0"]["retention"]  # the parent against itself
        assert zero["lost"] == zero["gained"] == 0 and zero["retention"] == 1.0
        by_round = {r["training"]["candidate"]: r for r in row["rounds"]}
        if "retention_all" in by_round[cand]:  # the candidate's count is the loop's own
            assert irow["scales"]["1"]["retention"]["candidate"] == \
                by_round[cand]["retention_all"]["candidate"]
        measured = ["--test-prompts", "2", "--test-samples", "1", "--max-new-tokens", "8"]
        again = interpolate.main(["--store", str(store), "--user", "concise", "--scales",
                                  "0.5,0.25", *measured, "--out", str(tmp_path / "interp")])
        assert json.loads((store / "versions" / f"{cand}-x0.5" / "meta.json").read_text()) == \
            half  # the scaled version made once, used again
        (irow,) = again.values()  # measured the same way: the earlier scales stay beside
        assert list(irow["scales"]) == ["0", "0.5", "1", "0.25"]
        measured[1] = "1"  # measured another way: the row starts over
        again = interpolate.main(["--store", str(store), "--user", "concise", "--scales", "0.5",
                                  *measured, "--out", str(tmp_path / "interp")])
        assert list(again[next(iter(again))]["scales"]) == ["0.5"]
        with pytest.raises(SystemExit):  # a round that is not in the store: named
            interpolate.main(["--store", str(store), "--user", "concise", "--round", "r0",
                              "--out", str(tmp_path / "interp")])

    # versions read with more replies a prompt, each against the first, paired by prompt: the
    # base model and the store's latest candidate (the base when no round made one)
    read = ["--user", "concise", "--test-prompts", "2", "--test-samples", "2",
            "--max-new-tokens", "8", "--out", str(tmp_path / "approval")]
    found = approval.main(["--version", f"base={store}@base", "--version", f"latest={store}",
                           *read])
    base_name = Registry().base_name
    assert [(r["label"], r["version"]) for r in found["last"]] == \
        [("base", base_name), ("latest", made[-1] if made else base_name)]
    first, latest = found["last"]
    # the first against itself: no difference, and no leaning (ties count half)
    assert first["difference"] == {"estimate": 0, "interval": [0, 0], "p_better": 0.5}
    for r in found["last"]:
        kept = found["versions"][f"{store.resolve()}@{r['version']}"]
        assert len(kept["per_prompt"]) == 2 and all(0 <= a <= 1 for a in kept["per_prompt"])
        assert r["approval"] == pytest.approx(sum(kept["per_prompt"]) / 2)
        assert r["approval_interval"][0] <= r["approval"] <= r["approval_interval"][1]
    assert latest["difference"]["estimate"] == pytest.approx(
        latest["approval"] - first["approval"])
    assert (tmp_path / "approval" / "approval-concise.png").is_file()
    # the other way round: the same readings (kept, not sampled again), the difference negated
    again = approval.main(["--version", f"latest={store}", "--version", f"base={store}@base",
                           *read])
    assert again["versions"] == found["versions"]
    assert again["last"][1]["difference"]["estimate"] == \
        pytest.approx(-latest["difference"]["estimate"])
    assert list(json.loads((tmp_path / "approval" / "approval.json").read_text()).values()) \
        == [again]
    with pytest.raises(SystemExit) as exited:  # a version the store does not hold: named
        approval.main(["--version", f"x={store}@r0", *read])
    assert exited.value.code == 2

    # users measured one run at a time land in one table: a later run keeps the earlier rows
    main(["--users", "no_filler", "--rounds", "0", "--test-prompts", "2", "--test-samples", "1",
          "--max-new-tokens", "8", "--out", str(out)])
    both = json.loads((out / "loop.json").read_text())["users"]
    assert set(both) == {"concise", "no_filler"} and both["concise"] == row
    assert len(both["no_filler"]["approval"]) == 1 and both["no_filler"]["args"]["rounds"] == "0"

    # a user measured again starts over: the base model, an empty store, no earlier rounds
    main(["--users", "concise", "--rounds", "0", "--test-prompts", "2", "--test-samples", "1",
          "--max-new-tokens", "8", "--out", str(out)])
    again = json.loads((out / "loop.json").read_text())["users"]["concise"]
    assert again["versions"] == [row["versions"][0]] and again["rounds"] == []
    assert not (out / "concise" / "data" / "reports").exists()
    # the table and the plot again from loop.json, running nothing
    (out / "loop.png").unlink()
    assert main(["--report", "--out", str(out)])["users"]["concise"] == again
    assert (out / "loop.png").stat().st_size > 0
    # one user's rows from several runs, side by side under labels, running nothing
    side = tmp_path / "side"
    both = main(["--users", "concise", "--compare", f"now={out}", f"then={out}",
                 "--out", str(side)])
    assert both["users"] == {"now": again, "then": again}
    assert json.loads((side / "loop.json").read_text()) == both and (side / "loop.png").is_file()
    for user, entry in (("concise", str(out)), ("concise", f"x={tmp_path / 'nothing'}"),
                        ("bold", f"x={out}")):  # no label; no loop.json; no row for that user
        with pytest.raises(SystemExit):
            main(["--users", user, "--compare", entry, "--out", str(side)])
    assert json.loads((side / "loop.json").read_text()) == both  # a refused call wrote nothing


def test_reasons_bench_trains_both_judges_on_the_same_votes(tiny_model, tmp_path):
    out = tmp_path / "reasons"
    result = reasons.main(["--users", "concise", "--prompts", "16", "--replies-per-prompt", "2",
                           "--max-new-tokens", "12", "--max-steps", "2", "--out", str(out)])
    row = json.loads((out / "reasons.json").read_text())["users"]["concise"]
    assert row == result["users"]["concise"] and row["votes"]["votes"] == 32
    plain, margin = row["runs"]["0.0"], row["runs"]["1.0"]
    assert plain["steps"] == margin["steps"] == 2 and plain["pairs"] == margin["pairs"]
    assert plain["pairs_with_margin"] == 0
    assert -1 <= row["auc_difference"]["low"] <= row["auc_difference"]["high"] <= 1


def test_hints_bench_reads_every_user_plain_and_asked_in_each_place(tiny_model, tmp_path):
    out = tmp_path / "hints"
    found = hints.main(["--prompts", "3", "--samples", "2", "--hints", "Say A.|Say B.",
                        "--max-new-tokens", "8", "--out", str(out)])
    assert found == json.loads((out / "hints.json").read_text())
    [row] = found.values()
    assert row["prompts"] == 3 and row["samples"] == 2
    assert list(row["readings"]) == ["plain", "system: Say A.", "message: Say A.",
                                     "system: Say B.", "message: Say B."]
    for reading in row["readings"].values():
        assert set(reading) == {u.name for u in make_users(
            ["bold", "concise", "example", "no_filler", "structured", "tips"], [1])}
        for r in reading.values():
            low, high = r["approval_interval"]
            assert 0 <= low <= r["approval"] <= high <= 1 and 0 <= r["prompts_liked"] <= 3
    # a second reading with other settings joins the first
    again = hints.main(["--prompts", "2", "--samples", "1", "--hints", "Say A.", "--places",
                        "message", "--max-new-tokens", "8", "--out", str(out)])
    assert len(again) == 2 and list(again[[k for k in again if k.endswith("2x1")][0]][
        "readings"]) == ["plain", "message: Say A."]


def test_b_forms_counts_each_measured_round_once_by_its_change(tmp_path, capsys):
    """`bench.b_forms`: a promoted round's change is the next approval, a rejected one's its
    measured candidate's; a round without its candidate measured, or kept twice, is left out;
    each form of (b) decides by the gate's rule."""
    def rnd(candidate, decision, a, direction, size, **extra):
        return {"training": {"decision": decision, "candidate": candidate, "gate": {
            "a_difference": {"p_better": a}, "b_direction": {"p_better": direction},
            "b_difference": {"p_better": size}}}, **extra}
    row = {"approval": [0.2, 0.6, 0.6, 0.6],
           "rounds": [rnd("r1", "promoted", 0.5, 0.5, 0.99),  # +40: only the size shows it
                      rnd("r2", "rejected", 0.85, 0.85, 0.85,  # +5: pooled 0.93 either way
                          rejected_candidate={"approval": 0.65}),
                      rnd("r3", "rejected", 0.1, 0.99, 0.1)]}  # not measured: left out
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "loop.json").write_text(json.dumps({"users": {"u": row}}))
    out = tmp_path / "b_forms.json"
    assert b_forms.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    kept = json.loads(out.read_text())
    assert [(r["round"], round(r["change"], 2)) for r in kept["rounds"]] == [(1, 0.4), (2, 0.05)]
    by = {t["change"]: t for t in kept["table"]}
    assert (by["+30 or more"]["direction"], by["+30 or more"]["size"]) == (0, 1)
    assert by["at most +5"]["direction"] == by["at most +5"]["size"] == 1
    assert "2 recorded rounds" in capsys.readouterr().out


def test_the_ceiling_replay_adds_up_a_versions_votes_and_counts_a_run_once(tmp_path, capsys):
    """`bench.ceiling`: a version's votes add up while it serves (after a rejected round the
    next sees both rounds'), a row's own `serving_votes` is used as it is, and the same run kept
    in two folders counts once."""
    def rnd(liked, decision, **extra):
        return {"votes": {"votes": 300, "liked": liked},
                "training": {"decision": decision, **extra.pop("training", {})}, **extra}
    row = {"approval": [0.3, 0.9, 0.9, 0.9], "versions": ["base", "v1", "v1", "v1"],
           "rounds": [rnd(100, "promoted"),
                      rnd(280, "rejected", rejected_candidate={"approval": 0.95}),
                      rnd(295, "rejected"),
                      rnd(0, "skipped", training={"serving_votes": {
                          "version": "v1", "votes": 10, "disliked": 5,
                          "disliked_share": {"high": 0.8}}})]}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "loop.json").write_text(json.dumps({"users": {"u": row}}))
    out = tmp_path / "ceiling.json"
    assert ceiling.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    rounds = json.loads(out.read_text())["rounds"]
    assert [(r["own_votes"], r["own_disliked"], r["rule"]) for r in rounds] == \
        [(300, 200, "train"), (300, 20, "train"), (600, 25, "skip"), (10, 5, "train")]
    assert rounds[1]["candidate_change"] == pytest.approx(0.05)  # the rejected one, measured
    assert "1 of 4 rounds skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # nothing to replay: a clear refusal
        ceiling.main(["--results", str(tmp_path / "nothing"), "--out", str(out)])
