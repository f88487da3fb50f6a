"""Training rounds for real: TRL on the tiny model, a real store, the real CLI in subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoTokenizer

from feedback import db, store
from serving.registry import Registry
from tests.conftest import ROOT
from training.config import DataConfig, RoundConfig
from training.dataset import (KTO_RATIO_RANGE, check_enough, interleave, kto_weights,
                              load_feedback, split, NotEnoughFeedback)

GOOD = "Yes. Short and clear."
BAD = "Well, um, so, you know, it depends, maybe, perhaps, who can say really, well, um."
LOOP = "Yes. " + "Step one, then step two. " * 6  # fails the gate's fluency check
FAST = {"tune": {"max_steps": 4, "batch_size": 4, "learning_rate": 2e-3, "bf16": False},
        "reward": {"max_steps": 3, "batch_size": 4},
        "gate": {"max_heldout_prompts": 4, "reply_max_new_tokens": 8,
                 "judged_max_new_tokens": 12},
        "data": {"heldout_fraction": 0.3, "heldout_min_votes": 0, "min_votes": 4},
        "synthetic": {"samples_per_prompt": 2, "max_prompts": 4, "max_new_tokens": 16}}
LENIENT = {**FAST, "gate": {**FAST["gate"], "enforce": False}}


def fill(n: int = 16, *, user: str = "alice", good: str = GOOD, bad: str = BAD,
         liked_good=True, first: int = 0) -> None:
    """n conversations, each with a good and a bad reply, both voted; `liked_good` is a bool
    or a function of the conversation id (which reply the user liked); questions numbered
    from `first` (the same question twice merges its rows)."""
    with db.transaction(write=True) as s:
        uid = store.get_or_create_user(session=s, username=user).id
        for i in range(n):
            conv = store.create_conversation(session=s, user_id=uid)
            liked = liked_good(conv.id) if callable(liked_good) else liked_good
            q = store.add_user_message(session=s, user_id=uid, conversation_id=conv.id,
                                       content=f"Question {first + i}: is this fine?")
            a = store.add_reply(session=s, user_id=uid, parent_id=q.id, content=good,
                                model_version="m", generation_settings={})
            b = store.add_reply(session=s, user_id=uid, parent_id=q.id, content=bad,
                                model_version="m", generation_settings={}, source="regenerate")
            store.set_vote(session=s, user_id=uid, message_id=a.id, value=1 if liked else -1)
            store.set_vote(session=s, user_id=uid, message_id=b.id, value=-1 if liked else 1)


def round_report(name: str) -> dict:
    """The JSON report of the round that made version `name` (a version is named by its round)."""
    return json.loads((Path(os.environ["CHAT_DATA_DIR"]) / "reports" / f"{name}.json").read_text())


def training_cli(*args: str, config: dict | None = None, tmp_path: Path | None = None,
                 **popen) -> subprocess.CompletedProcess:
    extra = []
    if config is not None:
        path = tmp_path / "round.json"
        path.write_text(json.dumps(config))
        extra = ["--config", str(path)]
    return subprocess.run([sys.executable, "-m", "training", *args, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, **popen)


# ---- data -------------------------------------------------------------------------------------

def test_dataset_rules_split_and_weights(tiny_model):
    fill(20)
    with db.transaction(write=True) as s:  # a changed vote counts once, a withdrawn one not
        store.set_vote(session=s, user_id=1, message_id=2, value=-1)
        store.set_vote(session=s, user_id=1, message_id=2, value=1)
        store.set_vote(session=s, user_id=1, message_id=3, value=None)
    data = load_feedback()
    assert [r["label"] for r in data.votes if r["message_id"] == 2] == [True]
    assert not [r for r in data.votes if r["message_id"] == 3]
    assert len(data.votes) == 39
    # Pairs: 20 regenerate... none recorded here, so liked x disliked per prompt (19 left).
    assert len(data.pairs) == 19 and all(p["source"] == "votes" for p in data.pairs)
    cfg = DataConfig(heldout_fraction=0.3)
    train, held = split(data, cfg)
    assert {r["conversation_id"] for r in train.votes}.isdisjoint(
        r["conversation_id"] for r in held.votes)
    assert split(load_feedback(), cfg)[1].votes == held.votes  # deterministic
    for pos, neg in [(30, 10), (10, 30), (7, 7), (1, 50)]:
        dw, uw = kto_weights(pos, neg)
        assert KTO_RATIO_RANGE[0] <= dw * pos / (uw * neg) <= KTO_RATIO_RANGE[1]
    rows = interleave([{"label": i % 5 == 0} for i in range(40)])
    batches = [rows[i:i + 8] for i in range(0, 40, 8)]  # KTO batches of 8, taken in order
    assert all({r["label"] for r in b} == {True, False} for b in batches)


def test_training_leaves_out_liked_loops_and_pairs_preferring_them_not_the_users_evidence():
    from training.dataset import fluency_failure

    assert fluency_failure(LOOP) == "repetition loop" and fluency_failure("") == "empty"
    assert fluency_failure(GOOD) is None and fluency_failure(BAD) is None
    fill(12)  # GOOD liked over BAD
    fill(6, good=LOOP, first=12)  # a looping reply liked over BAD: a pair preferring a loop
    fill(6, good=LOOP, liked_good=False, first=18)  # a disliked loop: BAD preferred over it
    fill(4, good=LOOP, bad=LOOP + " Again.", first=24)  # both loop: teaches nothing on loops
    data = load_feedback()
    cfg = DataConfig(heldout_fraction=0.3, heldout_min_votes=0)
    kept, held = split(data, cfg)
    every, held_too = split(data, replace(cfg, drop_disfluent=False))
    assert held == held_too and any(fluency_failure(v["completion"][0]["content"]) and
                                    v["label"] for v in held.votes)  # the users' evidence
    assert every.left_out == {} and kept.left_out["liked_votes"] > 0

    def text(row, part):
        return row[part][0]["content"]
    liked_loops = [v for v in every.votes
                   if v["label"] and fluency_failure(text(v, "completion"))]
    assert {v["message_id"] for v in kept.votes} == \
        {v["message_id"] for v in every.votes} - {v["message_id"] for v in liked_loops}
    preferring = [p for p in every.pairs if fluency_failure(text(p, "chosen"))
                  and not fluency_failure(text(p, "rejected"))]
    assert preferring and kept.pairs == [p for p in every.pairs if p not in preferring]
    assert kept.left_out == {"liked_votes": len(liked_loops), "pairs": len(preferring)}
    # what stays: disliked loops, and pairs against a loop or between two loops
    assert any(not v["label"] and fluency_failure(text(v, "completion")) for v in kept.votes)
    assert any(fluency_failure(text(p, "rejected")) for p in kept.pairs)
    assert kept.counts["votes"] == every.counts["votes"] - len(liked_loops)


def test_a_small_store_holds_out_more_and_no_training_conversation_is_held_out_later():
    from training.dataset import MAX_HELDOUT_SHARE, heldout_share, is_heldout

    cfg = DataConfig(heldout_fraction=0.2, heldout_min_votes=100)
    assert heldout_share(0, cfg) == 0.2  # nothing to hold out yet: the plain fraction
    assert heldout_share(150, cfg) == MAX_HELDOUT_SHARE == 0.5  # capped: half
    assert heldout_share(300, cfg) == pytest.approx(1 / 3)  # about 100 of 300 votes
    assert heldout_share(500, cfg) == heldout_share(5000, cfg) == 0.2
    assert heldout_share(300, DataConfig(heldout_fraction=0.2, heldout_min_votes=0)) == 0.2
    assert heldout_share(300, DataConfig(heldout_fraction=0.6, heldout_min_votes=100)) == 0.6
    shares = [heldout_share(n, cfg) for n in range(1, 1000)]
    assert all(a >= b for a, b in zip(shares, shares[1:]))  # falls as votes arrive, never rises

    # on a real store: 40 votes (half held out), then 300 (a third), then 600 (the fraction)
    fill(20)
    small = split(load_feedback(), cfg)
    fill(130, first=20)
    mid = split(load_feedback(), cfg)
    fill(150, first=150)
    large = split(load_feedback(), cfg)
    assert len(large[0].votes) + len(large[1].votes) == 600
    convs = [{r["conversation_id"] for r in part.votes} for part in (*small, *mid, *large)]
    (s_train, s_held), (m_train, m_held), (l_train, l_held) = zip(convs[::2], convs[1::2])
    for held, n, share in ((s_held, 20, 0.5), (m_held, 150, 1 / 3), (l_held, 300, 0.2)):
        assert len(held) == sum(is_heldout(c, cfg, share) for c in range(1, n + 1))
        assert n < 100 or abs(len(held) / n - share) < 0.1  # the hash spreads them evenly
    # a conversation trained on stays in training; a held-out one may move into training
    assert s_train <= m_train <= l_train and (m_held | l_held) & s_train == set()
    assert l_held & set(range(1, 21)) <= s_held and l_held & set(range(1, 151)) <= m_held
    assert len(m_held & set(range(1, 21))) < len(s_held)  # the share fell: some moved
    # a report from before the setting is replayed as it ran: the plain fraction
    from training.config import as_ran
    before = as_ran({"data": {"heldout_fraction": 0.2}, "tune": {"learning_rate": 1e-3}})
    assert before == {"data": {"heldout_fraction": 0.2, "heldout_min_votes": 0,
                               "drop_disfluent": False}, "tune": {"learning_rate": 1e-3}}
    assert as_ran({"data": {"heldout_min_votes": 100}})["data"] == {
        "heldout_min_votes": 100, "drop_disfluent": False}  # a round between the two settings
    now = {"data": {"heldout_min_votes": 100, "drop_disfluent": True}}
    assert as_ran(now) == now


def test_what_users_said_sets_each_pairs_strength_and_the_reward_margin(tiny_model):
    from training.dataset import FeedbackData, reward_pairs
    fill(3)  # bare thumbs: a liked and a disliked reply to each of 3 prompts
    with db.transaction(write=True) as s:  # prompt 1: both votes say why; prompt 2: one does
        store.set_vote(session=s, user_id=1, message_id=2, value=1, reasons=["clear"])
        store.set_vote(session=s, user_id=1, message_id=3, value=-1, comment="rambles")
        store.set_vote(session=s, user_id=1, message_id=6, value=-1, reasons=["too verbose"])
        conv = store.create_conversation(session=s, user_id=1)
        q = store.add_user_message(session=s, user_id=1, conversation_id=conv.id,
                                   content="Pick one?")
        a, b = (store.add_reply(session=s, user_id=1, parent_id=q.id, content=text,
                                model_version="m", generation_settings={}) for text in "AB")
        store.prefer_reply(session=s, user_id=1, message_id=b.id)
    data = load_feedback()
    strength = {p["prompt"][-1]["content"]: p["strength"] for p in data.pairs}
    assert strength == {"Question 0: is this fine?": 1.0, "Question 1: is this fine?": 0.5,
                        "Question 2: is this fine?": 0.0, "Pick one?": 1.0}
    margins = sorted(r["margin"] for r in reward_pairs(data, DataConfig(), 2.0))
    assert margins == [0.0] * 4 + [1.0, 2.0, 2.0]  # 3 top-ups across prompts: no margin
    assert all("margin" not in r for r in reward_pairs(data, DataConfig(), 0.0))
    # votes of one label alone make no top-ups (a training side of liked votes only: the
    # round skips, and `training prepare` must not fail on it): the pairs stand alone
    liked = FeedbackData([v for v in data.votes if v["label"]], data.pairs)
    assert len(reward_pairs(liked, DataConfig())) == len(data.pairs) == 4
    assert reward_pairs(FeedbackData(liked.votes, []), DataConfig()) == []


def test_length_grouped_batches_keep_every_row_and_cut_the_padding():
    import random

    from training.dataset import length_grouped
    rng = random.Random(1)
    rows = [{"id": i, "n": rng.randint(1, 1000)} for i in range(150)]  # 37 batches of 4 + 2

    def padding(order):  # padded slots when each batch is padded to its longest row
        return sum(4 * max(r["n"] for r in order[i:i + 4]) - sum(r["n"] for r in order[i:i + 4])
                   for i in range(0, len(order), 4))
    grouped = length_grouped(rows, 4, seed=0, length=lambda r: r["n"])
    assert sorted(r["id"] for r in grouped) == list(range(150))
    assert padding(grouped) < padding(rows) / 4
    assert length_grouped(rows, 4, seed=0, length=lambda r: r["n"]) == grouped  # seeded
    assert grouped != sorted(grouped, key=lambda r: -r["n"])  # batch order is shuffled


def test_conflicting_votes_follow_the_majority_then_the_latest(tiny_model):
    for user, liked in [("a", True), ("b", True), ("c", False)]:
        fill(1, user=user, liked_good=liked)
    rows = {r["completion"][0]["content"]: r for r in load_feedback().votes}
    assert rows[GOOD]["label"] is True and len(rows[GOOD]["vote_ids"]) == 3
    fill(1, user="d", liked_good=False)  # now 2 against 2: the latest vote decides
    rows = {r["completion"][0]["content"]: r for r in load_feedback().votes}
    assert rows[GOOD]["label"] is False


@pytest.mark.parametrize("setup,why", [
    (lambda: None, "usable training votes"),
    (lambda: fill(1), "usable training votes"),
    (lambda: _only_likes(12), "0 disliked"),
])
def test_not_enough_feedback_is_a_clear_exit_and_changes_nothing(tiny_model, tmp_path, setup,
                                                                  why):
    setup()
    done = training_cli("run", config=FAST, tmp_path=tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert why in done.stdout
    assert Registry().current_name() == tiny_model.name and Registry().versions() == []
    assert list((Path(os.environ["CHAT_DATA_DIR"]) / "reports").glob("r*.md"))


def _only_likes(n: int, *, version: str = "m", value: int = 1) -> None:
    with db.transaction(write=True) as s:
        uid = store.get_or_create_user(session=s, username="alice").id
        for i in range(n):
            conv = store.create_conversation(session=s, user_id=uid)
            q = store.add_user_message(session=s, user_id=uid, conversation_id=conv.id,
                                       content=f"q{i}")
            a = store.add_reply(session=s, user_id=uid, parent_id=q.id,
                                content=f"{version} {value} a{i}", model_version=version,
                                generation_settings={})
            store.set_vote(session=s, user_id=uid, message_id=a.id, value=value)


def test_no_round_trains_while_users_like_nearly_all_the_serving_versions_replies(tiny_model,
                                                                                   tmp_path):
    from training.round import liked_enough
    from training.dataset import own_votes
    fill(16)  # enough feedback of both labels, on replies of an older version "m"
    _only_likes(40, version=tiny_model.name)
    done = training_cli("run", config=FAST, tmp_path=tmp_path)
    assert done.returncode == 6, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Users liked 40 of the 40 replies of {tiny_model.name}" in done.stdout
    assert "at most 8.8% are disliked (95% interval)" in done.stdout
    assert Registry().current_name() == tiny_model.name and Registry().versions() == []
    report = sorted((Path(os.environ["CHAT_DATA_DIR"]) / "reports").glob("r*.md"))[-1]
    assert "Votes on `%s`'s own replies: 0 of 40 disliked" % tiny_model.name in report.read_text()
    # the scheduler counts those votes as used: it waits for as many new ones
    done = training_cli("schedule", "--min-new-votes", "40", "--interval-minutes", "0.001",
                        "--max-checks", "2", config=FAST, tmp_path=tmp_path)
    assert done.returncode == 6, done.stdout[-2000:] + done.stderr[-2000:]
    assert "0 new votes (< 40)" in done.stdout and Registry().versions() == []

    def why(min_share: float = 0.1):
        own = own_votes(load_feedback(), tiny_model.name, confidence=0.95)
        return liked_enough(own, min_share)
    assert why(0.0) is None  # 0: always train
    _only_likes(4, version=tiny_model.name, value=-1)  # 4 of 44 disliked: up to 21%
    assert why() is None and why(0.25) is not None
    assert own_votes(load_feedback(), "never-served", confidence=0.95)["disliked_share"] is None


@pytest.mark.parametrize("config,says", [
    ({"tune": {"learning_rat": 1e-4}}, "unknown setting 'tune.learning_rat'"),
    ({"tune": {"batch_size": 0}}, "tune.batch_size must be at least 1"),
    ({"tune": {"bf16": "yes"}}, "tune.bf16 must be true or false"),
    ({"gate": {"judged_samples": 1.5}}, "gate.judged_samples must be a whole number"),
    ({"reward_share": 1.5}, "reward_share must be in (0, 1)"),
    ({"data": {"min_disliked_share": -0.1}}, "data.min_disliked_share must be in [0, 1]"),
    ([1, 2], "must be a JSON object"),
    ("{not json", "is not valid JSON"),
    ('{"tune": {"learning_rate": NaN}}', "tune.learning_rate must be"),  # JSON's NaN: no range
    (None, "argument --max-minutes: must be above 0"),
    (["schedule", "--min-new-votes", "0"], "--min-new-votes must be at least 1"),
    (["schedule", "--interval-minutes", "-1"], "--interval-minutes must be a finite number"),
    (["schedule", "--interval-minutes", "nan"], "--interval-minutes must be a finite number"),
    (["schedule", "--max-checks", "0"], "--max-checks must be at least 1"),
])
def test_a_wrong_round_config_is_a_usage_error_naming_the_field(tiny_model, tmp_path, config,
                                                                 says):
    fill(16)
    path = tmp_path / "round.json"
    if config is None:
        done = training_cli("run", "--max-minutes", "0")
    elif isinstance(config, list) and config[0] == "schedule":  # refused before any check
        done = training_cli(*config)
    else:
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        done = training_cli("run", "--config", str(path))
        assert str(path) in done.stderr
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr
    assert not (Path(os.environ["CHAT_DATA_DIR"]) / "reports").exists()  # no round started


def test_check_enough_needs_both_labels():
    from training.dataset import FeedbackData
    rows = [{"label": True}] * 10
    with pytest.raises(NotEnoughFeedback, match="0 disliked"):
        check_enough(FeedbackData(votes=rows), DataConfig())


# ---- rounds -----------------------------------------------------------------------------------

def fill_split(n: int, *, invert_training: bool = False) -> None:
    """Like `fill`, but the training side's votes inverted when asked (held-out stays true)."""
    from training.dataset import heldout_share, is_heldout
    cfg = DataConfig(**FAST["data"])
    share = heldout_share(2 * n, cfg)  # the share the round will split its 2n votes at
    fill(n, liked_good=lambda cid: not (invert_training and not is_heldout(cid, cfg, share)))


def assert_merged_equals_parent_plus_adapter(reg: Registry, version) -> None:
    """The version's merged weights give the same logits as its parent with its adapter."""
    import torch

    from serving.config import ServingConfig
    fp32 = ServingConfig(dtype="float32")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        direct = reg.load(version.name, fp32).model(ids).logits
        chained = reg._load_adapter(version, fp32).model(ids).logits
    assert torch.allclose(direct, chained, atol=1e-4)


def test_a_round_trains_registers_promotes_and_rolls_back(tiny_model, tmp_path):
    fill(24)
    fill(4, good=LOOP, first=24)  # liked loops: left out of training, and the report says so
    config = {**LENIENT, "tune": {**LENIENT["tune"], "replay_weight": 0.5}}
    done = training_cli("run", config=config, tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reg = Registry()
    [version] = reg.versions()
    assert reg.current_name() == version.name
    assert version.meta["parent"] == tiny_model.name and version.meta["method"] == "kto"
    # Every LoRA B matrix starts at zero: all of them moved, in the policy and the reward model.
    for part in ("adapter", "reward"):
        weights = load_file(version.path / part / "adapter_model.safetensors")
        lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), part
    # Every backend loads the version directly (its merged weights), equal to parent + adapter.
    assert version.dir.model.is_dir() and not version.dir.trainer.exists()
    assert_merged_equals_parent_plus_adapter(reg, version)
    assert json.loads(version.dir.config.read_text())["tune"]["max_steps"] == 4
    report = json.loads(next((Path(os.environ["CHAT_DATA_DIR"]) / "reports").glob("r*.json"))
                        .read_text())
    assert report["decision"] == "promoted" and report["tuning"]["steps"] == 4
    # replay joins DPO's steps only: this KTO round wrote no replay reply, and says why
    assert "replay" not in report and "ran kto" in report["tuning"]["replay"]["why"]
    assert report["data"]["heldout_share"] == 0.3  # FAST: the plain fraction
    every = split(load_feedback(), DataConfig(**FAST["data"], drop_disfluent=False))[0]
    loops = sum(v["completion"][0]["content"] == LOOP for v in every.votes)
    assert loops and report["data"]["left_out"] == {"liked_votes": loops, "pairs": loops}
    assert report["data"]["train"]["votes"] == len(every.votes) - loops
    # The judge was checked on held-out votes before any synthetic pair was made from it.
    judge = report["reward_model"]["judge"]
    assert judge["heldout_votes"] > 0 and 0 <= judge["auc"]["low"] <= judge["auc"]["high"] <= 1
    assert set(report["gate"]["checks"]) == {"a_heldout_ranking", "b_reward_model",
                                             "c_regression"}
    b = report["gate"]["checks"]["b_reward_model"]
    assert b["prompts"] > 0 and b["max_new_tokens"] == 12
    if judge["trusted"]:
        assert report["synthetic"]["prompts"] > 0
    else:  # a judge at chance makes no pairs (it still judges the candidate: (b))
        assert report["synthetic"]["pairs"] == 0 and "chance" in report["synthetic"]["why"]
    md = next((Path(os.environ["CHAT_DATA_DIR"]) / "reports").glob("r*.md")).read_text()
    assert "Decision: promoted" in md and "Held out for the gate: 30% of the conversations" in md
    assert f"Left out of training as empty or looping (data.drop_disfluent): {loops} liked" in md
    status = json.loads(training_cli("status", "--json").stdout)
    assert status["current"] == version.name and status["rounds"][0]["decision"] == "promoted"

    # The promoted version serves: replies record it.
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps([{"role": "user", "content": "hi"}]) + "\n")
    gen = subprocess.run([sys.executable, "-m", "serving", "generate", "--in", str(src), "--out",
                          str(tmp_path / "out.jsonl"), "--max-new-tokens", "4"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert json.loads((tmp_path / "out.jsonl").read_text())["model_version"] == version.name

    back = training_cli("rollback")
    assert back.returncode == 0 and Registry().current_name() == tiny_model.name
    again = training_cli("rollback", version.name)
    assert again.returncode == 0 and Registry().current_name() == version.name
    assert training_cli("rollback", "no-such-version").returncode == 1


def test_a_round_continues_from_the_serving_version_or_starts_over_from_the_base(tiny_model,
                                                                                   tmp_path):
    fill(24)
    assert training_cli("run", config=LENIENT, tmp_path=tmp_path).returncode == 0
    first = Registry().current_name()
    fill(8, user="bob")
    # On top of a trained version the step is scaled by continue_lr_scale; from the base, never.
    scaled = {**FAST["tune"], "continue_lr_scale": 0.25}
    again = training_cli("run", config={**LENIENT, "tune": scaled}, tmp_path=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    second = Registry().get(Registry().current_name())
    assert second.meta["parent"] == second.meta["replaces"] == first
    assert f"tuning {first} (auto, LoRA, lr 0.0005)" in again.stdout
    assert round_report(second.name)["tuning"]["learning_rate"] == pytest.approx(5e-4)
    fill(8, user="carol")
    anew = training_cli("run", config={**LENIENT, "tune": {**scaled, "start": "base"}},
                        tmp_path=tmp_path)
    assert anew.returncode == 0, anew.stdout[-3000:] + anew.stderr[-3000:]
    reg = Registry()
    third = reg.get(reg.current_name())
    assert third.meta["parent"] == tiny_model.name and third.meta["replaces"] == second.name
    # Its adapter sits on the base: base + adapter gives the version's own weights.
    assert_merged_equals_parent_plus_adapter(reg, third)
    assert f"tuning {tiny_model.name} (auto, LoRA, lr 0.002)" in anew.stdout
    assert round_report(third.name)["tuning"]["learning_rate"] == pytest.approx(2e-3)


def test_a_candidate_trained_on_inverted_labels_is_rejected(tiny_model, tmp_path):
    fill_split(30, invert_training=True)
    strict = {**FAST, "gate": FAST["gate"]}
    done = training_cli("run", config=strict, tmp_path=tmp_path)
    assert done.returncode == 5, done.stdout[-3000:] + done.stderr[-3000:]
    assert "a_heldout_ranking" in done.stdout
    report = json.loads(next((Path(os.environ["CHAT_DATA_DIR"]) / "reports").glob("r*.json"))
                        .read_text())
    a = report["gate"]["checks"]["a_heldout_ranking"]
    assert a["candidate_auc"] < a["current_auc"] == 0.5 and not a["passed"]
    assert a["verdict"] == "worse" and a["difference"]["high"] < 0
    assert a["difference"]["p_better"] < 0.05 and not report["gate"]["pooled"]["better"]
    assert Registry().current_name() == tiny_model.name  # still serving the old one


def test_the_judge_loads_onto_the_base_checkpoint_and_refuses_any_other(tiny_model, tmp_path,
                                                                        capfd):
    """The reward model is the base checkpoint plus a new score head: the head's absence is
    expected and not reported; a checkpoint lacking any other weight is refused by name, not
    turned into a judge with random layers."""
    import shutil

    from safetensors.torch import load_file, save_file

    from training.reward import score_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    capfd.readouterr()
    model = score_model(str(tiny_model), tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id and model.score.out_features == 1
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' own handler, on stderr
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        score_model(str(broken), tokenizer)


def test_the_gate_judges_whole_replies_and_pools_only_both_checks(tiny_model):
    """(b) answers with its own cap (the serving's: whole replies), (c) with its short one; the
    report shows (b)'s replies and scores. Without a judge, or without held-out votes to
    calibrate it on, (b) does not run, and (a) alone is not pooled: alone it must clear its own
    interval."""
    from serving.backends import open_engine
    from serving.config import ServingConfig
    from training.config import GateConfig
    from training.dataset import load_feedback, split
    from training.evaluate import gate, load_regression_set
    from training.reward import RewardModel, score_model
    from training.synthetic import judge_quality

    fill(16, liked_good=lambda cid: cid % 2 == 0)
    _, heldout = split(load_feedback(), DataConfig(heldout_fraction=0.5))
    reg = Registry()
    model = reg.load(None, ServingConfig(dtype="float32"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # untrained: this test is about what it sees
    judge = RewardModel(score_model(str(tiny_model), tokenizer), model.tokenizer)
    _, calibration = judge_quality(judge, heldout, confidence=0.95, samples=200)
    cfg = GateConfig(max_heldout_prompts=3, min_heldout_prompts=1, reply_max_new_tokens=2,
                     judged_max_new_tokens=24)
    engines = [open_engine(reg), open_engine(reg)]
    try:
        run = [gate(current=model, candidate=model, base=model, current_engine=engines[0],
                    candidate_engine=engines[1], heldout=heldout, reward_model=scorer,
                    calibration=cal, cfg=cfg, deadline=deadline)
               for scorer, cal, deadline in ((judge, calibration, None), (None, None, None),
                                             (judge, calibration, time.monotonic()),
                                             (judge, None, None))]
    finally:
        for engine in engines:
            engine.close()

    def tokens(text: str) -> int:  # decoded text need not re-encode to as many tokens: slack
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    b = run[0]["checks"]["b_reward_model"]
    assert b["max_new_tokens"] == 24 and 0 < len(b["examples"]) == b["prompts"] <= 3
    for example in b["examples"]:
        assert tokens(example["current"]) <= 3 * 24 and tokens(example["candidate"]) <= 3 * 24
        assert example["current"] == example["candidate"]  # the same model, greedy
        assert example["current_reward"] == pytest.approx(example["candidate_reward"], abs=1e-3)
    assert all(tokens(e["reply"]) <= 3 * 2 for e in run[0]["checks"]["c_regression"]["examples"])
    assert set(run[0]["pooled"]["of"]) == {"a", "b"}
    # the same replies: the judge expects the same approval of both, whatever its calibration
    assert b["approval_current"] == pytest.approx(b["approval_candidate"])
    assert b["difference"]["low"] <= 0 <= b["difference"]["high"]
    assert b["verdict"] == "no difference" and b["calibration_votes"] == len(heldout.votes)

    for b in (run[1]["checks"]["b_reward_model"], run[3]["checks"]["b_reward_model"]):
        assert b["prompts"] == 0 and "no reward model calibrated" in b["why"]
        assert b["verdict"] == "no difference" and b["prompts_available"] > 0
    assert run[1]["pooled"]["confidence"] is None and "only (a)" in run[1]["pooled"]["why"]

    b = run[2]["checks"]["b_reward_model"]  # no time left: the fewest each check may use
    assert b["prompts"] == cfg.min_heldout_prompts < b["prompts_available"]
    c = [r["checks"]["c_regression"] for r in run]
    assert c[0]["questions"] == c[0]["questions_available"] == len(load_regression_set())
    assert c[2]["questions"] == cfg.min_regression_questions < c[2]["questions_available"]
    assert c[2]["fluency"]["replies"] == cfg.min_regression_questions + b["prompts"]
    assert f"/{cfg.min_regression_questions} vs" in c[2]["why"]
    assert not run[0]["checks"]["b_reward_model"]["sampled"]


def test_sampled_replies_are_seeded_kept_apart_from_greedy_ones_and_judged_by_their_mean(
        tiny_model, tmp_path):
    """(b) with `judged_samples` k: each version writes k replies per prompt at the page's
    settings, seeds 0..k-1, so a version's replies to a prompt are the same in every gate (kept,
    like greedy ones, under keys of their own); the judge's mean per prompt is compared; the
    fluency check counts every reply; the clock counts k replies a prompt. A judge at chance
    on its check gets one greedy reply a prompt."""
    from serving.backends import open_engine
    from serving.config import ServingConfig
    from training.config import GateConfig
    from training.dataset import load_feedback, split
    from training.evaluate import ReplyCache, answers, gate, heldout_prompts
    from training.reward import RewardModel, score_model
    from training.stats import Calibration
    from training.synthetic import judge_quality

    fill(16, liked_good=lambda cid: cid % 2 == 0)
    _, heldout = split(load_feedback(), DataConfig(heldout_fraction=0.5))
    reg = Registry()
    model = reg.load(None, ServingConfig(dtype="float32"))
    judge = RewardModel(score_model(str(tiny_model), AutoTokenizer.from_pretrained(tiny_model)),
                        model.tokenizer)
    _, checked = judge_quality(judge, heldout, confidence=0.95, samples=200)
    # the untrained judge's scores of its held-out votes, with labels they rank perfectly (a
    # judge its round trusts) or alternate along (one at chance)
    ranked = sorted(checked.scores)
    calibration, untrusted = (
        Calibration.of(ranked, [label(i) for i in range(len(ranked))], confidence=0.95,
                       samples=200)
        for label in (lambda i: i >= len(ranked) // 2, lambda i: i % 2 == 0))
    assert calibration.trusted and not untrusted.trusted
    prompts = heldout_prompts(heldout)[:3]
    engines = [open_engine(reg), open_engine(reg)]
    try:
        sampled = answers(engines[0], prompts, 12, 1.1, samples=4)
        assert len(sampled) == 4 * len(prompts)
        assert answers(engines[1], prompts, 12, 1.1, samples=4) == sampled  # seeded
        assert any(len(set(sampled[i:i + 4])) > 1 for i in range(0, len(sampled), 4))
        greedy = answers(engines[0], prompts, 12, 1.1)
        assert len(greedy) == len(prompts)
        kept = ReplyCache(tmp_path, model.version, engines[0], 1.1)
        assert kept.answers(prompts, 12, 4) == sampled and kept.unkept(prompts, 12, 4) == 0
        assert kept.unkept(prompts, 12) == len(prompts)  # greedy replies are others
        assert kept.answers(prompts, 12) == greedy and kept.unkept(prompts, 12, 2) == 0
        assert kept.unkept(prompts, 12, 5) == len(prompts)  # seed 4 not written yet

        cfg = GateConfig(max_heldout_prompts=3, min_heldout_prompts=2, reply_max_new_tokens=2,
                         judged_max_new_tokens=12, judged_samples=3)
        runs = [gate(current=model, candidate=model, base=model, current_engine=engines[0],
                     candidate_engine=engines[1], heldout=heldout, reward_model=judge,
                     calibration=cal, cfg=cfg, deadline=deadline)
                for cal, deadline in ((calibration, None), (calibration, time.monotonic()),
                                      (untrusted, None))]
    finally:
        for engine in engines:
            engine.close()
    b, short, at_chance = (r["checks"]["b_reward_model"] for r in runs)
    # a judge at chance: its direction counts for nothing, so one greedy reply a prompt
    assert not at_chance["sampled"] and at_chance["replies_per_prompt"] == 1
    assert b["sampled"] and b["replies_per_prompt"] == 3 and b["prompts"] == 3
    assert "the mean of its 3 sampled ones" in b["why"]
    for example in b["examples"]:  # the same model and seeds: the same replies and scores
        assert example["current"] == example["candidate"]
        assert example["current_reward"] == pytest.approx(example["candidate_reward"], abs=1e-3)
    assert b["win_rate"] == 0.5 and b["verdict"] == "no difference"
    c = runs[0]["checks"]["c_regression"]
    assert c["fluency"]["replies"] == c["questions"] + 3 * b["prompts"]
    assert short["prompts"] == cfg.min_heldout_prompts  # no time left: the fewest prompts
    assert runs[1]["checks"]["c_regression"]["fluency"]["replies"] == \
        cfg.min_regression_questions + 3 * cfg.min_heldout_prompts


def test_work_in_chunks_starts_no_chunk_that_would_end_past_its_deadline():
    from training.evaluate import in_time

    def run(deadline_s: float) -> list[int]:
        done, deadline = [], time.monotonic() + deadline_s
        for rows in in_time(list(range(100)), deadline, chunk=10, at_least=15):
            time.sleep(0.2)  # the caller's work on a chunk
            done += rows
        return done

    # 0.9 s: four chunks of 0.2 s at most (a fifth would end at 1.0 s or later)
    done = run(0.9)
    assert done == list(range(len(done))) and 20 <= len(done) <= 40
    assert run(-1) == list(range(20))  # no time at all: the chunks holding the first 15

    # Chunks of unequal cost ((a)'s kept log-probabilities first, then votes to score with
    # three models): the estimate scales with the next chunk's cost, so after two cheap chunks
    # (0.1 s each) a chunk three times as costly is not started 0.25 s before the deadline.
    costs, done = [1] * 20 + [3] * 80, []
    deadline = time.monotonic() + 0.45
    for rows in in_time(costs, deadline, chunk=10, at_least=1, cost=sum):
        time.sleep(0.01 * sum(rows))
        done += rows
    assert done == [1] * 20 and time.monotonic() < deadline

    # A second pass over the same kind of work ((c)'s questions after (a) and (b)) starts
    # from the first pass's pace: with 0.2 s a chunk measured, it does not start a chunk 0.1 s
    # before its deadline (blind, it would, and end past it).
    pace: list[float] = []
    first = [rows for rows in in_time(list(range(20)), float("inf"), chunk=10, at_least=0,
                                      pace=pace) if time.sleep(0.2) is None]
    assert len(first) == 2 and pace[0] >= 0.02  # seconds per item
    assert [rows for rows in in_time(list(range(20)), time.monotonic() + 0.1, chunk=10,
                                     at_least=0, pace=pace) if time.sleep(0.2) is None] == []
    blind = [rows for rows in in_time(list(range(20)), time.monotonic() + 0.1, chunk=10,
                                      at_least=0) if time.sleep(0.2) is None]
    assert len(blind) == 1  # started, and ended 0.1 s past its deadline

    # Batched chunks ((b): one wave of the engine's slots, as long as its longest reply): a
    # short last chunk is priced as a full one, so with 0.15 s left after two chunks of 0.2 s
    # the last 2 items are not started; priced by their count (0.1 s) they would be, and end
    # past the deadline.
    for batched, expected in ((True, 8), (False, 10)):
        done, deadline = [], time.monotonic() + 0.55
        for rows in in_time(list(range(10)), deadline, chunk=4, at_least=0, batched=batched):
            time.sleep(0.2)
            done += rows
        assert len(done) == expected
        assert (time.monotonic() < deadline) == batched


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 0.05)])
def test_mean_log_probabilities_count_the_reply_tokens_only(tiny_model, monkeypatch, dtype,
                                                            tolerance):
    """(a)'s figure (the vocabulary head over the reply's positions only) equals the mean of
    the whole model's log-softmax over exactly the reply's tokens, in either dtype the machine
    may score in (each compared with the whole model under the same autocast: bfloat16's
    rounding differs with the matrices' shapes, so it matches to its precision, not float32's);
    a reply the context window cuts off entirely scores 0, not an error."""
    import torch

    from serving.config import ServingConfig
    from serving.hardware import autocast
    from training.evaluate import mean_logps

    monkeypatch.setenv("CHAT_DTYPE", dtype)  # the CPU's own choice must not decide the test
    loaded = Registry().load(None, ServingConfig(dtype="float32"))
    tok = loaded.tokenizer
    rows = [{"prompt": [{"role": "user", "content": q}],
             "completion": [{"role": "assistant", "content": a}]}
            for q, a in [("Is this fine?", GOOD), ("And this one, with a longer question?", BAD),
                         ("Hi", "x")]]
    expected = []
    for r in rows:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)
        start = len(tok(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad(), autocast(loaded.model):
            logits = loaded.model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        expected.append(float(logp[start - 1:-1].gather(1, ids[0, start:, None]).mean()))
    assert mean_logps(loaded, rows) == pytest.approx(expected, abs=tolerance)
    # rows told apart (a wrong slice would not match all three), by more than the tolerance
    assert min(abs(a - b) for i, a in enumerate(expected) for b in expected[i + 1:]) \
        > 2 * tolerance
    long_prompt = [{"role": "user", "content": "word " * loaded.context_window}]
    assert mean_logps(loaded, [{"prompt": long_prompt, "completion": rows[0]["completion"]}]) \
        == [0.0]


def held_out_and_copies(tiny_model: Path):
    """16 voted conversations, half of them held out (returned), and versions v2, v3 and v4:
    copies of the tiny model, so each gate's figures can be told apart by version only."""
    import shutil

    from training.dataset import load_feedback, split

    fill(16, liked_good=lambda cid: cid % 2 == 0)
    _, heldout = split(load_feedback(), DataConfig(heldout_fraction=0.5))
    reg = Registry()
    for name in ("v2", "v3", "v4"):
        staging = reg.staging(name)
        shutil.copytree(tiny_model, staging.model)
        reg.register(name, staging, {"parent": tiny_model.name, "kind": "full"})
    return heldout, reg


def test_the_gate_keeps_log_probabilities_and_replies_for_later_gates(tiny_model, tmp_path):
    """(a)'s log-probabilities and (c)'s replies are kept per version: the next gate reads the
    base model's and the serving version's (computed when it was the candidate) instead of
    computing them again, with the same AUC and accuracy; an unreadable cache file is an empty
    cache, not an error."""
    from serving.backends import open_engine
    from serving.config import ServingConfig
    from training.config import GateConfig
    from training.evaluate import gate, load_regression_set

    heldout, reg = held_out_and_copies(tiny_model)
    fp32 = ServingConfig(dtype="float32")
    base = reg.load(None, fp32)
    cfg = GateConfig(reply_max_new_tokens=2)
    cache = tmp_path / "logps"
    engines = [open_engine(reg), open_engine(reg)]
    try:
        def judged(current: str, candidate: str, penalty: float = 1.1) -> dict:
            return gate(current=reg.load(current, fp32), candidate=reg.load(candidate, fp32),
                        base=base, current_engine=engines[0], candidate_engine=engines[1],
                        heldout=heldout, reward_model=None, calibration=None, cache_dir=cache,
                        cfg=replace(cfg, repetition_penalty=penalty))

        gates = [judged("v2", "v3"), judged("v3", "v4")]
        for path in cache.glob(f"{base.version}.*.json"):
            path.write_text("{not json")
        for path in cache.glob("v4.*.replies.json"):
            path.write_text("[1, 2]")
        gates.append(judged("v4", "v2"))
        # replies written under another repetition penalty are other replies: not reused
        other = [judged("v2", "v3", penalty=1.0), judged("v2", "v3", penalty=1.0)]
    finally:
        for engine in engines:
            engine.close()
    questions = len(load_regression_set())
    assert [g["replies_kept"] for g in gates] == [
        {"v2": 0, "v3": 0}, {"v3": questions, "v4": 0}, {"v4": 0, "v2": questions}]
    assert [g["replies_kept"] for g in other] == [
        {"v2": 0, "v3": 0}, {"v2": questions, "v3": questions}]
    assert [g["checks"]["c_regression"]["repetition_penalty"] for g in gates + other] == \
        [1.1] * 3 + [1.0] * 2
    regression = [g["checks"]["c_regression"] for g in gates]
    assert regression[1]["current"] == regression[0]["candidate"]
    assert regression[2]["candidate"] == regression[0]["current"]
    first, second, third = (g["checks"]["a_heldout_ranking"] for g in gates)
    votes = first["votes"]
    assert votes == first["votes_available"] == second["votes"] > 2  # no deadline: all
    assert first["cached"] == {base.version: 0, "v2": 0, "v3": 0}
    assert second["cached"] == {base.version: votes, "v3": votes, "v4": 0}
    assert second["current_auc"] == first["candidate_auc"]
    assert third["cached"] == {base.version: 0, "v4": votes, "v2": votes}
    assert third["candidate_auc"] == first["current_auc"]


def test_prepare_computes_the_serving_versions_half_of_the_gate_before_it(tiny_model, tmp_path):
    """`prepare` (what `python -m training prepare` runs between rounds) writes the serving
    version's replies to (c)'s questions and (b)'s held-out prompts and its and the base
    model's log-probabilities of (a)'s votes where the gate reads them, under the gate's own
    keys: the gate then computes only the candidate's, with the same figures as a gate that
    computed everything itself. A second prepare writes nothing; one out of time writes
    nothing and says so."""
    from serving.backends import open_engine
    from serving.config import ServingConfig
    from training.config import GateConfig
    from training.evaluate import (ReplyCache, gate, heldout_prompts, load_regression_set,
                                   prepare)

    heldout, reg = held_out_and_copies(tiny_model)
    fp32 = ServingConfig(dtype="float32")
    base, v2, v3, v4 = (reg.load(n, fp32) for n in (None, "v2", "v3", "v4"))
    cfg = GateConfig(reply_max_new_tokens=2, judged_max_new_tokens=3, max_heldout_prompts=3)
    cache, fresh = tmp_path / "prepared", tmp_path / "fresh"
    questions, votes = len(load_regression_set()), len(heldout.votes)
    prompts = heldout_prompts(heldout)[:3]
    engines = [open_engine(reg), open_engine(reg)]
    try:
        def prepared(current, deadline=None) -> dict:
            return prepare(current=current, base=base, current_engine=engines[0],
                           heldout=heldout, cfg=cfg, deadline=deadline, cache_dir=cache)

        first, again = prepared(v2), prepared(v2)
        late = prepared(v4, deadline=time.monotonic() - 1)
        kept = ReplyCache(cache, "v2", engines[0], cfg.repetition_penalty)
        assert kept.unkept(prompts, cfg.judged_max_new_tokens) == 0  # (b)'s, ready
        after, alone = (gate(current=v2, candidate=v3, base=base, current_engine=engines[0],
                             candidate_engine=engines[1], heldout=heldout, reward_model=None,
                             calibration=None, cfg=cfg, cache_dir=folder)
                        for folder in (cache, fresh))
    finally:
        for engine in engines:
            engine.close()
    assert (first["questions"], first["prompts"], first["votes"]) == (questions, 3, votes)
    assert [first[k]["written"] for k in ("c_replies", "b_replies", "a_logps")] == \
        [questions, 3, 2 * votes]  # the base's log-probabilities and the serving version's
    assert [again[k]["written"] for k in ("c_replies", "b_replies", "a_logps")] == [0, 0, 0]
    assert [again[k]["items"] for k in ("c_replies", "b_replies", "a_logps")] == \
        [questions, 3, votes]
    assert [late[k]["items"] for k in ("c_replies", "b_replies", "a_logps")] == [0, 0, 0]
    assert all(json.loads(p.read_text()) == {} for p in cache.glob("v4.*"))  # none kept
    assert after["replies_kept"] == {"v2": questions, "v3": 0}
    assert alone["replies_kept"] == {"v2": 0, "v3": 0}
    a_after, a_alone = (g["checks"]["a_heldout_ranking"] for g in (after, alone))
    assert a_after["cached"] == {base.version: votes, "v2": votes, "v3": 0}
    assert a_after["votes"] == a_alone["votes"] == votes
    assert a_after["difference"] == a_alone["difference"]
    assert after["checks"]["c_regression"]["current"] == \
        alone["checks"]["c_regression"]["current"]


def test_a_candidate_moving_further_the_way_the_serving_version_learned_ranks_better(
        tiny_model, tmp_path):
    """(a) measures the candidate against the serving version, not each against the base: a
    candidate that moves further the way a trained serving version moved (here its weight
    change from the base, doubled) ranks the held-out votes in the same order, so both
    versions' AUCs against the base are alike (before session 21 (a) saw no difference), yet it
    puts more probability on the liked replies: (a) calls it better. The serving version
    judged against itself: no change, AUC 0.5."""
    import shutil

    from safetensors.torch import save_file

    from serving.backends import open_engine
    from serving.config import ServingConfig
    from training.config import GateConfig
    from training.dataset import load_feedback, split
    from training.evaluate import gate

    fill_split(30)
    done = training_cli("run", config=LENIENT, tmp_path=tmp_path)  # a real round trains v1
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reg = Registry()
    [trained] = reg.versions()
    base_w = load_file(tiny_model / "model.safetensors")
    trained_w = load_file(trained.dir.model / "model.safetensors")
    staging = reg.staging("further")
    shutil.copytree(trained.dir.model, staging.model)
    save_file({k: base_w[k] + 2 * (w - base_w[k]) for k, w in trained_w.items()},
              staging.model / "model.safetensors", metadata={"format": "pt"})
    reg.register("further", staging, {"parent": trained.name, "kind": "full"})
    _, heldout = split(load_feedback(), DataConfig(**FAST["data"]))
    fp32 = ServingConfig(dtype="float32")
    base, current = reg.load(tiny_model.name, fp32), reg.load(trained.name, fp32)
    engines = [open_engine(reg, trained.name), open_engine(reg, "further")]
    try:
        checks = [gate(current=current, candidate=candidate, base=base,
                       current_engine=engines[0], candidate_engine=engines[i],
                       heldout=heldout, reward_model=None, calibration=None,
                       cfg=GateConfig(reply_max_new_tokens=2))["checks"]["a_heldout_ranking"]
                  for i, candidate in ((1, reg.load("further", fp32)), (0, current))]
    finally:
        for engine in engines:
            engine.close()
    further, same = checks
    assert further["current_auc"] > 0.9  # the serving version learned the held-out votes
    assert abs(further["candidate_auc"] - further["current_auc"]) < 0.05  # same order
    assert further["verdict"] == "better" and further["auc"] > 0.9
    assert further["difference"]["low"] > 0 and "better" in further["why"]
    assert same["auc"] == 0.5 and same["verdict"] == "no difference"


def test_online_tuning_trains_on_pairs_its_judge_picks_and_needs_a_judge(tiny_model):
    """tune.method online: the model samples two replies per prompt at each step and the reward
    model picks (its margin is reported); the adapter and merged weights are saved like any
    version's. Without a trusted judge the round's tuning falls back to auto and says so."""
    from serving.config import ServingConfig
    from training.config import SyntheticConfig, TuneConfig
    from training.dataset import load_feedback, split
    from training.reward import RewardModel, score_model
    from training.tune import tune

    fill(16, liked_good=lambda cid: cid % 2 == 0)
    train, _ = split(load_feedback(), DataConfig(heldout_fraction=0.25))
    reg = Registry()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # untrained: this test is about the plumbing
    judge = RewardModel(score_model(str(tiny_model), tokenizer), tokenizer)
    cfg = TuneConfig(method="online", max_steps=2, batch_size=2, lora_r=2, lora_alpha=4,
                     bf16=False)
    sampling = SyntheticConfig(max_new_tokens=8, max_prompts=5)
    out = reg.staging("online")
    summary, trainer = tune(reg.load(None, ServingConfig(dtype="float32")).model, tokenizer,
                            train, cfg, out, time.monotonic() + 600, judge=judge,
                            sampling=sampling)
    assert summary["method"] == "online" and summary["steps"] == 2
    assert summary["rows"] == 5 and summary["max_new_tokens"] == 8
    assert summary["mean_judged_margin"] >= 0  # chosen minus rejected, by the judge's scores
    assert 0 <= summary["finished_replies"] <= 1
    assert (out.adapter / "adapter_config.json").exists()
    assert (out.model / "model.safetensors").exists()

    fallback, _ = tune(reg.load(None, ServingConfig(dtype="float32")).model, tokenizer, train,
                       cfg, reg.staging("fallback"), time.monotonic() + 600, judge=None)
    assert fallback["method"] in ("kto", "dpo") and "no trusted reward model" in \
        fallback["online_skipped"]


def test_dpo_reads_the_reference_prepared_before_the_round_and_learns_the_same(tiny_model):
    """`prepare_reference` (part of `training prepare`) keeps DPO's reference log-probabilities
    of the training pairs; the tuning then runs no reference forward in its steps, and its
    losses are those of the in-step reference (same pairs, same seed). A pair voted after
    prepare is computed before training; when most are missing every step computes its own."""
    from serving.config import ServingConfig
    from training.config import TuneConfig
    from training.round import prepare_reference, reference_dir
    from training.schedule import reference_short
    from training.tune import (FILL_SHARE, ReferenceCache, dpo_order, dpo_trainer, tune,
                               use_kept_reference)

    fill(24)  # each conversation a liked and a disliked reply: a pair
    train, _ = split(load_feedback(), DataConfig(heldout_fraction=0.25))
    n = len(train.pairs)
    assert n >= 8
    reg = Registry()
    name = reg.current_name()
    cfg = TuneConfig(method="dpo", max_steps=3, batch_size=4, lora_r=2, lora_alpha=4,
                     bf16=False)

    def run(label: str, reference, reach: int | None = None) -> tuple[dict, list[float]]:
        loaded = reg.load(None, ServingConfig(dtype="float32"))
        summary, trainer = tune(loaded.model, loaded.tokenizer, train, cfg, reg.staging(label),
                                time.monotonic() + 600, reference=reference, reach=reach)
        assert summary["steps"] == 3
        return summary["reference"], [h["loss"] for h in trainer.state.log_history
                                      if "loss" in h]

    in_step, losses = run("in-step", None)
    assert in_step["source"] == "every step" and len(losses) == 3
    # only the pairs the next round's steps can reach, first in the tuning's order
    record = prepare_reference(reg, name, train, cfg, time.monotonic() + 600,
                               log=lambda line: None, reach={"pairs": 4, "source": "a test"})
    assert record["written"] == record["items"] == 4 and record["reach"]["pairs"] == 4
    # the prefix is whole: `schedule` does not prepare again for the pairs beyond it
    assert record["missing"] == 0 and not reference_short(record)
    assert reference_short({**record, "missing": 1})  # the clock cut the prefix short
    assert reference_short({k: v for k, v in record.items() if k != "missing"})  # an older record
    assert not reference_short({**record, "why": "the round runs no DPO"})
    first = ReferenceCache(reference_dir(reg), name, cfg)
    assert set(first.unkept(train.pairs)) == set(dpo_order(train.pairs, cfg)[4:])
    record = prepare_reference(reg, name, train, cfg, time.monotonic() + 600,
                               log=lambda line: None)
    assert record["version"] == name and record["written"] == n - 4 and record["items"] == n
    assert not prepare_reference(reg, name, train, cfg, time.monotonic() + 600,
                                 log=lambda line: None)["written"]  # kept: nothing again
    kept = ReferenceCache(reference_dir(reg), name, cfg)
    assert not kept.unkept(train.pairs)
    # another precision or length cap scores differently: another reference
    assert ReferenceCache(reference_dir(reg), name, replace(cfg, bf16=True)).unkept(
        train.pairs) == list(range(n))

    used, kept_losses = run("kept", kept)
    assert used["source"] == f"kept for {name}" and used["kept"] == n
    assert not used["computed_here"] and kept_losses == pytest.approx(losses, rel=1e-4)

    del kept.values[kept.pair_key(train.pairs[0])]  # a pair voted after prepare
    filled, filled_losses = run("filled", kept)
    assert filled["computed_here"] == 1 and filled["kept"] == n - 1
    assert filled_losses == pytest.approx(losses, rel=1e-4)
    assert not ReferenceCache(reference_dir(reg), name, cfg).unkept(train.pairs)  # saved

    for pair in train.pairs[:n // 2]:
        del kept.values[kept.pair_key(pair)]
    most_missing, again = run("most-missing", kept)
    assert most_missing["source"].startswith(f"every step ({n - n // 2} of {n} kept")
    assert again == pytest.approx(losses, rel=1e-4)


    # the steps read what is kept (a reference moved by 5 nats moves the loss)
    kept.values = {k: [c + 5.0, r] for k, (c, r) in
                   ReferenceCache(reference_dir(reg), name, cfg).values.items()}
    _, moved = run("moved", kept)
    assert moved[0] != pytest.approx(losses[0], rel=1e-2)

    # kept for a prefix of the tuning's order (what prepare writes when the next round's steps
    # cannot take every pair): the steps that reach no further read it, the same losses
    order = dpo_order(train.pairs, cfg)
    kept = ReferenceCache(reference_dir(reg), name, cfg)
    for i in order[4:]:
        kept.values.pop(kept.pair_key(train.pairs[i]), None)
    kept.values.pop(kept.pair_key(train.pairs[order[2]]), None)  # voted after prepare
    prefix, prefix_losses = run("prefix", kept, reach=4)  # a step of 4, then those 4 again
    assert prefix["source"] == f"kept for {name} (the first 4 of {n} rows in the tuning's order)"
    assert prefix["computed_here"] == 1 and prefix["rows"] == 4
    assert prefix_losses[0] == pytest.approx(losses[0], rel=1e-4)
    # the steps reach further than the kept prefix: too many to fill, every step computes
    assert n - 4 > FILL_SHARE * n
    assert run("beyond", kept, reach=n)[0]["source"].startswith("every step")
    # cut to the prefix, the schedule stays the one planned for every row (2 epochs of all)
    loaded = reg.load(None, ServingConfig(dtype="float32"))
    planned = replace(cfg, max_steps=-1, epochs=2.0)
    trainer, _ = dpo_trainer(loaded.model, loaded.tokenizer, train.pairs, planned,
                             reg.staging("planned").trainer, None)
    assert use_kept_reference(trainer, train.pairs, kept, reach=4)["rows"] == 4
    assert len(trainer.train_dataset) == 4 and trainer.args.max_steps == 2 * -(-n // 4)


def _kill_when(line_start: str, tmp_path: Path, config: dict) -> None:
    path = tmp_path / "round.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "training", "run", "--config", str(path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        for line in proc.stdout:
            if line.startswith(line_start):
                proc.send_signal(signal.SIGKILL)
                break
        else:
            raise AssertionError(f"the round ended before {line_start!r}")
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_lora_on_the_top_blocks_leaves_the_blocks_below_as_they_were(tiny_model):
    """`tune.lora_layers` (and the reward model's) under 1: adapters on the top share of the
    transformer blocks only, so the backward pass stops above the rest. A DPO tuning's merged
    weights then change in the top block and nowhere below it; with every block adapted
    (`lora_layers` 1) the lowest changes too. A model whose blocks PEFT cannot count is refused
    with a message, not adapted somewhere unexpected."""
    import torch

    from serving.config import ServingConfig
    from training.config import RewardModelConfig, TuneConfig
    from training.reward import score_model
    from training.tune import lora_config, tune

    fill(16)
    train, _ = split(load_feedback(), DataConfig(heldout_fraction=0.25))
    reg = Registry()

    def changed(share: float) -> set[str]:
        cfg = TuneConfig(method="dpo", max_steps=2, batch_size=4, lora_r=2, lora_alpha=4,
                         bf16=False, learning_rate=1e-2, lora_layers=share)
        loaded = reg.load(None, ServingConfig(dtype="float32"))
        before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
        out = reg.staging(f"share-{share}")
        summary, _ = tune(loaded.model, loaded.tokenizer, train, cfg, out,
                          time.monotonic() + 600)
        assert summary["steps"] == 2
        after = load_file(out.model / "model.safetensors")
        return {k for k, v in after.items() if not torch.equal(v, before[k])}

    top = changed(0.5)  # the tiny model has 2 blocks: the top one adapted
    assert top and all(".layers.1." in k for k in top)
    assert any(".layers.0." in k for k in changed(1.0))

    # the reward model: adapters on the top block, and its new score head, trained
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    judge = score_model(str(tiny_model), tokenizer)
    cfg = RewardModelConfig(lora_r=2, lora_layers=0.5)
    peft = lora_config(TuneConfig(lora_r=cfg.lora_r, lora_layers=cfg.lora_layers), judge,
                       task_type="SEQ_CLS")
    assert peft.layers_to_transform == [1]
    trained = [n for n, p in get_peft_model(judge, peft).named_parameters() if p.requires_grad]
    assert any("score" in n for n in trained)
    assert all(".layers.1." in n for n in trained if "lora_" in n)
    with pytest.raises(ValueError, match="blocks PEFT can count"):
        lora_config(TuneConfig(lora_layers=0.5), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    # the setting's range: above 0, at most 1, refused by name otherwise
    with pytest.raises(ValueError, match="lora_layers"):
        RoundConfig.from_dict({"tune": {"lora_layers": 0}})


def test_the_change_scale_scales_what_the_tuning_changed(tiny_model):
    """`tune.change_scale` s: the candidate is its start plus s times what the tuning changed,
    so the same tuning at s 2 moves every weight twice as far (extrapolation), and a full
    fine-tune at 0.5 half as far; the saved adapter carries the scaled change too, and the
    summary says which scale was used. Its range is refused by name."""
    import torch

    from serving.config import ServingConfig
    from training.config import TuneConfig
    from training.tune import tune

    fill(16)
    train, _ = split(load_feedback(), DataConfig(heldout_fraction=0.25))
    reg = Registry()

    def moved(name: str, **over) -> tuple[dict, Path]:
        cfg = TuneConfig(method="dpo", max_steps=2, batch_size=4, lora_r=2, lora_alpha=4,
                         bf16=False, learning_rate=1e-2, **over)
        loaded = reg.load(None, ServingConfig(dtype="float32"))
        before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
        out = reg.staging(name)
        summary, _ = tune(loaded.model, loaded.tokenizer, train, cfg, out,
                          time.monotonic() + 600)
        assert summary["steps"] == 2 and summary["change_scale"] == cfg.change_scale
        after = load_file(out.model / "model.safetensors")
        return {k: v - before[k] for k, v in after.items()}, out.adapter

    for over, scale in (({}, 2.0), ({"full_finetune": True}, 0.5)):
        plain, plain_adapter = moved(f"plain-{scale}", **over)
        scaled, scaled_adapter = moved(f"scaled-{scale}", change_scale=scale, **over)
        assert any(d.abs().max() > 1e-4 for d in plain.values())  # the tuning changed weights
        for k, d in plain.items():
            assert torch.allclose(scaled[k], scale * d, atol=1e-5), k
        if not over:  # the adapter saved is the scaled one: B doubled, A as trained
            first = load_file(plain_adapter / "adapter_model.safetensors")
            for k, w in load_file(scaled_adapter / "adapter_model.safetensors").items():
                assert torch.allclose(w, first[k] * (scale if "lora_B" in k else 1), atol=1e-6)
    for bad in (0, -1, 5):
        with pytest.raises(ValueError, match="change_scale"):
            RoundConfig.from_dict({"tune": {"change_scale": bad}})


def test_replay_learns_the_start_models_own_replies_beside_the_pairs(tiny_model):
    """`tune.replay_weight`: each DPO step also learns a batch of replay rows (an answer to a
    short question), its prompt masked from the loss and a reply cut at its length cap given
    no end of turn; the rows are taken in turn, every one before any again. The same 3 steps
    with replay leave those replies likelier than without, and the summary says how many rows
    were taken and their loss."""
    from serving.config import ServingConfig
    from training.config import TuneConfig
    from training.evaluate import load_regression_set, mean_logps
    from training.replay import ReplayBatches, replay_conversations
    from training.tune import tune

    requests = replay_conversations()
    assert len(requests) == 96 and len({r[0]["content"] for r in requests}) == 96
    regression = {it["question"].lower() for it in load_regression_set()}
    assert not regression & {r[0]["content"].lower() for r in requests}
    fill(16)
    train, _ = split(load_feedback(), DataConfig(heldout_fraction=0.25))
    reg = Registry()
    tok = reg.load(None, ServingConfig(dtype="float32")).tokenizer
    replies = ["Inflation is when prices rise over time.", "A budget is a plan for money.",
               "Weather changes daily; climate is the long-term pattern.",
               "Exercise keeps the heart strong, the lungs working well, the muscles and bones "
               "firm, the mind calm and sleep deep, and it lifts the mood for the whole day."]
    rows = [{"prompt": requests[i], "reply": r} for i, r in enumerate(replies)]
    cap = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in replies[:3]) + 2
    batches = ReplayBatches(tok, rows, 3, 512, 1.0, cap)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for (ids, labels), row in zip(batches.rows, rows):
        p = len(tok(tok.apply_chat_template(row["prompt"], tokenize=False,
                                            add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"])
        assert labels[:p] == [-100] * p and labels[p:] == ids[p:]
        cut = len(tok(row["reply"], add_special_tokens=False)["input_ids"]) >= cap - 1
        assert cut == (row is rows[3]) and (end in ids[p:]) != cut  # cut: no end of turn
    taken = []
    for _ in range(2):
        batch = batches.next("cpu")
        taken += [tuple(i[m.bool()].tolist()) for i, m in zip(batch["input_ids"],
                                                              batch["attention_mask"])]
    assert len(taken) == 6 and set(taken[:4]) == {tuple(ids) for ids, _ in batches.rows}

    def trained(weight: float) -> tuple[float, dict]:
        cfg = TuneConfig(method="dpo", max_steps=3, batch_size=4, lora_r=2, lora_alpha=4,
                         bf16=False, learning_rate=5e-2, replay_weight=weight)
        loaded = reg.load(None, ServingConfig(dtype="float32"))
        out = reg.staging(f"replay-{weight}")
        summary, trainer = tune(loaded.model, loaded.tokenizer, train, cfg, out,
                                time.monotonic() + 600,
                                replay={"rows": rows, "max_new_tokens": 64})
        model = trainer.model.eval()
        scored = replace(loaded, model=model)
        return sum(mean_logps(scored, [{"prompt": r["prompt"], "completion": [
            {"role": "assistant", "content": r["reply"]}]} for r in rows])), summary

    plain, plain_summary = trained(0.0)
    replayed, summary = trained(5.0)
    assert "replay" not in plain_summary
    assert summary["replay"]["weight"] == 5.0 and summary["replay"]["rows"] == 4
    assert summary["replay"]["rows_taken"] == 3 * 4 and summary["replay"]["first_nll"] > 0
    assert replayed > plain + 1.0  # the replies likelier (mean log-probability per token)
    with pytest.raises(ValueError, match="replay_weight"):
        RoundConfig.from_dict({"tune": {"replay_weight": -1}})

    # Kept replies need no engine: those of a version no registry holds (an engine for it
    # could not open) are read back whole; one missing, and the engine must open.
    from serving.backends import open_engine
    from training.replay import replay_replies
    from training.round import gate_cache_dir, replay_rows

    cfg = RoundConfig.from_dict({"synthetic": {"max_new_tokens": 16}})
    engine = open_engine(reg)
    try:
        made, info = replay_replies(gate_cache_dir(reg), "v-kept-only", engine,
                                    cfg.gate.repetition_penalty, 16)
    finally:
        engine.close()
    assert info["written"] == 96 and engine.kind == "llama.cpp"  # what `auto` opens first
    again, info = replay_rows(reg, "v-kept-only", cfg)
    assert again == made and info["written"] == 0
    with pytest.raises(Exception, match="v-kept-only"):
        replay_rows(reg, "v-kept-only", RoundConfig.from_dict({"synthetic": {
            "max_new_tokens": 17}}))


def test_a_round_killed_in_training_or_promotion_leaves_a_whole_version(tiny_model, tmp_path):
    fill(24)
    _kill_when("tuning", tmp_path, LENIENT)
    reg = Registry()
    assert reg.current_name() == tiny_model.name and reg.versions() == []
    assert training_cli("run", config=LENIENT, tmp_path=tmp_path).returncode == 0  # no stale lock
    first = Registry().current_name()
    assert first != tiny_model.name

    fill(6)
    _kill_when("promoting", tmp_path, LENIENT)
    reg = Registry()
    assert reg.current_name() in {v.name for v in reg.versions()}  # old or new, whole
    reg.load()  # and it loads
    done = training_cli("run", config=LENIENT, tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:]


def test_a_second_round_waits_for_the_first(tiny_model, tmp_path):
    from training.lock import round_lock
    fill(24)
    with round_lock():
        done = training_cli("run", config=FAST, tmp_path=tmp_path)
    assert done.returncode == 4 and "Another round is running" in done.stderr


def test_schedule_runs_a_round_only_when_enough_new_votes(tiny_model, tmp_path):
    fill(24)
    done = training_cli("schedule", "--min-new-votes", "40", "--interval-minutes", "0.001",
                        "--max-checks", "2", config=LENIENT, tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "48 new votes (>= 40): starting a round" in done.stdout
    assert "0 new votes (< 40)" in done.stdout
    assert len(Registry().versions()) == 1
    # between rounds it prepared the next gate for the version serving now
    assert "preparing the next gate" in done.stdout
    prepared = json.loads((Path(os.environ["CHAT_DATA_DIR"]) / "training" / "prepared.json")
                          .read_text())
    assert prepared["version"] == Registry().current_name()


def test_prepare_from_the_command_line_goes_into_the_next_rounds_report(tiny_model, tmp_path):
    """`python -m training prepare` then `run`: the round's gate finds the serving version's
    replies ready (it writes the candidate's alone) and its report says what was prepared;
    while a round runs, prepare waits its turn (exit 4)."""
    from training.lock import round_lock
    from training.evaluate import load_regression_set

    fill(24)
    # a judge that learns GOOD from BAD (12 steps at a high rate): trusted, it makes pairs
    # (every prompt's best and worst: no margin); DPO, whose steps read their reference
    JUDGED = {**LENIENT, "reward": {"max_steps": 12, "batch_size": 4, "learning_rate": 3e-3},
              "synthetic": {**LENIENT["synthetic"], "margin": 0.0},
              "tune": {**LENIENT["tune"], "method": "dpo"}}
    with round_lock():
        busy = training_cli("prepare", config=JUDGED, tmp_path=tmp_path)
    assert busy.returncode == 4 and "Another round is running" in busy.stderr
    done = training_cli("prepare", config=JUDGED, tmp_path=tmp_path)
    questions = len(load_regression_set())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"{questions} of {questions} questions" in done.stdout
    ran = training_cli("run", config=JUDGED, tmp_path=tmp_path)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    [version] = Registry().versions()
    report = round_report(version.name)
    assert report["prepared"]["version"] == tiny_model.name
    assert "Prepared before the round" in (Path(os.environ["CHAT_DATA_DIR"]) / "reports" /
                                           f"{version.name}.md").read_text()
    shown = training_cli("status")
    assert f"next gate prepared for {tiny_model.name}" in shown.stdout, shown.stderr[-2000:]
    assert report["gate"]["replies_kept"][tiny_model.name] >= questions
    a = report["gate"]["checks"]["a_heldout_ranking"]
    assert a["cached"][tiny_model.name] == a["votes"]  # the base serves: one model, prepared
    # the reward model too: trained by prepare (its 12 steps), used by the round, kept with
    # the version like a judge the round trains; its held-out check scored once, in prepare
    assert re.search(r"a reward model \(12 steps on \d+ pairs\)", done.stdout)
    judge = report["reward_model"]
    assert judge["steps"] == 12 and judge["prepared"]["rows_missing"] == 0
    assert judge["prepared"]["rows"] == report["data"]["train"]["votes"] + \
        report["data"]["train"]["pairs"]
    assert judge["judge"]["heldout_votes"] > 0 and "auc" in judge["judge"]
    assert (version.dir.reward / "adapter_config.json").is_file()
    assert "trained by `training prepare`" in (Path(os.environ["CHAT_DATA_DIR"]) / "reports" /
                                               f"{version.name}.md").read_text()
    assert "the reward model trained by `training prepare`" in ran.stdout
    assert "training the reward model" not in ran.stdout
    # the synthetic pairs too: sampled by the serving version, scored by that judge, off the
    # round's clock; the round takes them instead of sampling its own
    prepared = Path(os.environ["CHAT_DATA_DIR"]) / "training" / "prepared.json"
    made = json.loads(prepared.read_text())["synthetic"]
    assert judge["judge"]["trusted"] and made["written"] and made["prompts_finished"] == 4
    assert made["pairs"] > 0 and f"{made['pairs']} synthetic pairs from 4 of 4" in done.stdout
    assert made["reference"]["written"] == made["pairs"]  # their reference, kept too
    syn = report["synthetic"]
    assert syn["pairs"] == made["pairs"] and syn["prepared"]["version"] == tiny_model.name
    assert "synthetic pairs made by `training prepare`" in ran.stdout
    assert "made by `training prepare` (off the round's clock)" in (
        Path(os.environ["CHAT_DATA_DIR"]) / "reports" / f"{version.name}.md").read_text()
    tuned = report["tuning"]
    assert tuned["method"] == "dpo" and tuned["rows"] == report["data"]["train"]["pairs"] + \
        made["pairs"]
    assert tuned["reference"]["kept"] == tuned["rows"]  # none computed in the round
    again = training_cli("prepare", config=JUDGED, tmp_path=tmp_path)  # the same rows:
    assert "prepare (reward model)" not in again.stdout  # nothing trained again
    # the round promoted its candidate: the new serving version samples the next pairs
    assert "prepare (synthetic pairs): " in again.stdout and "prepare (reference)" in again.stdout
    third = training_cli("prepare", config=JUDGED, tmp_path=tmp_path)
    assert third.returncode == 0 and "prepare (synthetic pairs)" not in third.stdout  # kept
    assert json.loads(prepared.read_text())["synthetic"]["written"] is False


def test_a_prepared_judge_serves_the_rounds_whose_training_rows_it_mostly_saw(tmp_path):
    """`PreparedJudge`: usable while it lacks at most `prepared_max_missing` of the training
    rows and was trained the same way; prepare itself (max_missing 0) trains again on any new
    row. A folder without its adapter or with a broken record holds no judge."""
    from training.config import RewardModelConfig
    from training.dataset import FeedbackData
    from training.reward import PreparedJudge

    def vote(i, label=True):
        return {"prompt": [{"role": "user", "content": f"q{i}"}],
                "completion": [{"role": "assistant", "content": f"a{i}"}], "label": label}

    train = FeedbackData(votes=[vote(i) for i in range(8)])
    cfg = RewardModelConfig()
    made = tmp_path / "made"
    (made / "adapter").mkdir(parents=True)
    judge = PreparedJudge.write(tmp_path / "judge", made, {
        "fingerprint": PreparedJudge.fingerprint("base", cfg),
        "rows": PreparedJudge.row_keys(train), "summary": {"steps": 5},
        "finished_at": "now", "seconds": 1.0})
    assert judge.unusable("base", cfg, train, 0.0) is None
    more = FeedbackData(votes=train.votes + [vote(8), vote(9)])  # 2 of 10 unseen
    assert judge.missing(more) == (2, 10)
    assert judge.unusable("base", cfg, more, 0.25) is None
    assert "never saw 2 of the 10" in judge.unusable("base", cfg, more, 0.0)
    assert "never saw 3 of the 11" in judge.unusable(
        "base", cfg, FeedbackData(votes=more.votes + [vote(10)]), 0.25)
    flipped = FeedbackData(votes=[vote(0, label=False)] + train.votes[1:])  # a changed vote
    assert judge.missing(flipped) == (1, 8)
    assert "other settings" in judge.unusable("base", replace(cfg, learning_rate=1e-4),
                                              train, 0.25)
    assert "other settings" in judge.unusable("other", cfg, train, 0.25)
    # what only the check reads leaves it usable
    assert judge.unusable("base", replace(cfg, check_conversations=8), train, 0.25) is None
    assert judge.summary(more)["prepared"] == {"finished_at": "now", "seconds": 1.0,
                                                "rows_missing": 2, "rows": 10}
    (tmp_path / "judge" / "judge.json").write_text("{not json")
    assert "has not trained one" in PreparedJudge(tmp_path / "judge").unusable(
        "base", cfg, train, 1.0)
    assert "has not trained one" in PreparedJudge(tmp_path / "none").unusable(
        "base", cfg, train, 1.0)


def test_dpo_with_full_fine_tuning_when_asked(tiny_model, tmp_path):
    from training.schedule import unprepared

    fill(16)
    with db.transaction(write=True) as s:  # regenerate picks: pairs to learn from
        for conv in store.list_conversations(session=s, user_id=1):
            good = [t for t in store.get_thread(session=s, user_id=1, conversation_id=conv.id)]
            store.prefer_reply(session=s, user_id=1, message_id=good[1].sibling_ids[0])
    config = {**LENIENT, "tune": {**LENIENT["tune"], "sft_weight": 0.5, "method": "dpo",
                                  "full_finetune": True, "change_scale": 0.5,
                                  "replay_weight": 0.5}}
    # the reference its steps would compute, kept before the round (off its clock)
    ready = training_cli("prepare", config=config, tmp_path=tmp_path)
    assert ready.returncode == 0, ready.stdout[-3000:] + ready.stderr[-3000:]
    assert re.search(r"reference log-probabilities of (\d+) of \1 training pairs", ready.stdout)
    assert "replay: 96 of 96 replies of" in ready.stdout  # the start's replies, off the clock
    assert not unprepared(RoundConfig.from_dict(config))
    fill(3, first=100)  # votes after prepare: `schedule` would prepare again
    assert unprepared(RoundConfig.from_dict(config))
    done = training_cli("run", config=config, tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [version] = Registry().versions()
    assert version.meta["method"] == "dpo" and version.meta["kind"] == "full"
    [report] = (Path(os.environ["CHAT_DATA_DIR"]) / "reports").glob("r*.json")
    tuning = json.loads(report.read_text())["tuning"]
    assert tuning["loss_type"] == ["sigmoid", "sft"] and tuning["loss_weights"] == [1.0, 0.5]
    assert tuning["change_scale"] == 0.5  # the round's change halved, every weight's
    assert "the change scaled by 0.5 (tune.change_scale)" in report.with_suffix(".md").read_text()
    replay = tuning["replay"]  # every step learnt a batch of the start's replies, all kept
    assert json.loads(report.read_text())["replay"]["written"] == 0
    assert replay["rows"] == 96 and replay["rows_taken"] == tuning["steps"] * replay["batch_size"]
    assert f"replay (tune.replay_weight 0.5): {replay['rows_taken']} rows of 96 " \
           f"{tiny_model.name} replies (kept by `training prepare`)" in \
        report.with_suffix(".md").read_text()
    ref = tuning["reference"]  # the new pairs computed before training, the rest kept
    assert ref["source"] == f"kept for {tiny_model.name}" and ref["computed_here"] > 0
    assert ref["kept"] + ref["computed_here"] == ref["pairs"] == tuning["rows"]
    assert "reference log-probabilities: kept for" in report.with_suffix(".md").read_text()
    # DPO's own loss starts at ln 2; the chosen replies' NLL (the tiny model knows them not
    # at all) is added on top
    assert tuning["first_loss"] > 0.6932 + 0.5
    assert (version.path / "model" / "model.safetensors").is_file()
    assert Registry().load().version == version.name


# ---- the gate's statistics and clock ----------------------------------------------------------

def test_no_gate_check_decides_on_a_difference_inside_its_noise():
    from training.stats import auc_difference, paired_mean, pooled, sign_test
    rng = __import__("random").Random(1)
    # Round 2 of the concise user: AUC 0.843 vs 0.846 on 116 held-out votes is noise.
    labels = [i % 2 == 0 for i in range(116)]
    current = [rng.gauss(1.4 if y else 0, 1) for y in labels]
    candidate = [c + rng.gauss(0, 0.15) for c in current]
    d = auc_difference(candidate, current, labels, confidence=0.95, samples=1000)
    assert abs(d.estimate) < 0.03 and d.low < 0 < d.high
    # A real gain on the same votes is called one.
    better = [c + (1.0 if y else -1.0) for c, y in zip(current, labels)]
    assert auc_difference(better, current, labels, confidence=0.95, samples=1000).low > 0
    # "3 looping replies vs 1" of 40 is no evidence; 6 vs 0 is.
    assert sign_test(3, 1) == pytest.approx(5 / 16) and sign_test(6, 0) < 0.05
    # 62% wins on 32 prompts does not show a preference; the interval says so.
    wins = paired_mean([1] * 20 + [0] * 12, confidence=0.95, samples=1000, null=0.5)
    assert wins.low < 0.5 < wins.high and wins.estimate == pytest.approx(0.625)
    # ...but it leans one way, and so does a held-out ranking that is not conclusive alone:
    # pooled, the two say "better" (the example user's round 1: 31% -> 69% on the test prompts,
    # rejected when each check had to be conclusive alone).
    assert 0.85 < wins.p_better < 0.975
    noise = __import__("random").Random(3)
    leaning = [c + (0.15 if y else -0.15) + noise.gauss(0, 0.6) for c, y in zip(current, labels)]
    lean = auc_difference(leaning, current, labels, confidence=0.95, samples=1000)
    assert lean.low < 0 < lean.high and 0.7 < lean.p_better < 0.975
    assert pooled([lean.p_better, wins.p_better]) > 0.9
    assert pooled([0.5, wins.p_better]) < 0.9  # a check that leans nowhere dilutes, not adds
    # Pooling adds evidence only where both lean the same way, and needs no ties broken.
    assert pooled([0.9, 0.1]) == pytest.approx(0.5) and pooled([0.5]) == pytest.approx(0.5)
    assert pooled([0.8]) == pytest.approx(0.8) and pooled([1.0, 1.0]) < 1
    assert paired_mean([0.5] * 8, confidence=0.95, samples=200, null=0.5).p_better == 0.5


def test_b_goes_by_the_judges_direction_and_vetoes_only_a_loss_of_approval_it_expects():
    """(b) (`judge_verdict`): better when the judge scores the candidate's reply higher on more
    than half the prompts beyond the noise and expects no loss of approval; worse only when it
    prefers the current's replies beyond the noise *and* its calibrated approval (Platt scaling
    on held-out votes) shows a loss beyond the allowed one. Each measured failure, rebuilt: a
    judge that scores every liked reply a little lower (a 98% candidate vetoed at a win rate of
    25%, session 16); one sure of the order but not of the size (a candidate rated 81% against
    35% held back at +4 points [-1, +11], 13 of 16 prompts its way, session 17); a calibration
    expecting a loss the direction does not show (a 99% candidate against 98% vetoed at -7
    points while the judge preferred it on 41% of 32). A judge at chance decides nothing."""
    import numpy as np

    from training.evaluate import judge_verdict
    from training.stats import Calibration, approval_difference, platt
    rng = np.random.default_rng(0)
    labels = [i % 3 != 0 for i in range(72)]  # two thirds liked, as in a later round
    stats = dict(confidence=0.95, samples=1000)
    judge = Calibration.of([rng.normal(2.0 if y else -2.0, 1.0) for y in labels], labels,
                           **stats)
    halves = [i % 2 == 0 for i in range(72)]  # a judge that tells its votes apart, weakly
    weak = Calibration.of([rng.normal(0.4 if y else -0.4, 1.0) for y in halves], halves, **stats)
    assert judge.trusted and weak.trusted and weak.auc.estimate < judge.auc.estimate

    def verdict(candidate, current, calibration=judge):
        return judge_verdict(list(candidate), list(current), calibration, 0.03, **stats)

    current = rng.normal(5.0, 0.5, 24)  # liked, surely
    quibble = verdict(current - 0.3, current)
    assert quibble["win_rate"] == 0 and quibble["direction"]["high"] < 0.5  # against it...
    assert quibble["approval_current"] > 0.95 and quibble["approval_candidate"] > 0.95
    assert -0.03 < quibble["difference"]["estimate"] < 0  # ...with no approval lost
    assert quibble["verdict"] == "no difference"
    lost = verdict(current - 7.0, current)  # replies moved into what users disliked
    assert lost["verdict"] == "worse" and lost["difference"]["high"] < 0
    assert lost["approval_candidate"] < 0.5 and lost["p_better"] < 0.05
    assert verdict(current, current - 7.0)["verdict"] == "better"

    unsure = rng.normal(0.0, 1.0, 16)  # replies the judge is unsure of
    order = verdict(unsure + np.where(np.arange(16) < 13, 0.15, -0.5), unsure, weak)
    assert order["win_rate"] == 13 / 16 and order["direction"]["low"] > 0.5
    assert order["difference"]["low"] < 0 < order["difference"]["high"]  # size: inconclusive
    assert order["verdict"] == "better" and order["p_better"] > 0.95
    assert order["direction_counts"] and order["judge_auc"]["low"] > 0.5  # weak, not at chance

    middling = rng.normal(0.0, 1.0, 32)
    size = verdict(middling + np.where(np.arange(32) < 13, 0.2, -1.0), middling)
    assert size["difference"]["high"] < 0 and size["difference"]["estimate"] < -0.03
    assert size["direction"]["low"] < 0.5 < size["direction"]["high"]  # 41% of 32: noise
    assert size["verdict"] == "no difference"
    # pooled with (a) as what it showed: a loss of approval, not the direction's lean
    assert size["p_better"] == size["difference"]["p_better"] < 0.05
    assert "41% of 32 held-out prompts" in size["why"] and "calibrated on 72" in size["why"]

    chance = Calibration.of(judge.scores, rng.random(72) < 0.6, **stats)
    assert not chance.trusted
    blind, _, _ = approval_difference(current - 7.0, current, chance, **stats)
    assert blind.low < 0 < blind.high  # a judge at chance has a flat calibration
    assert verdict(current - 7.0, current, chance)["verdict"] == "no difference"
    # and its direction, however consistent (longer replies, say), counts for nothing
    lean = verdict(current + 7.0, current, chance)
    assert lean["win_rate"] == 1 and not lean["direction_counts"]
    assert lean["judge_auc"]["low"] <= 0.5 and "counts for nothing" in lean["why"]
    assert lean["verdict"] == "no difference" and lean["p_better"] == lean["difference"][
        "p_better"] < 0.95
    # sampled replies: a list of scores per prompt, the means compared (the direction) and
    # the chance of a thumbs-up averaged over a prompt's replies (the size)
    spread = rng.normal(0.0, 1.0, (16, 3))
    twice = verdict([list(r) for r in spread + 0.5], [list(r) for r in spread])
    assert twice["win_rate"] == 1 and "the mean of its 3 sampled ones" in twice["why"]
    once = verdict(spread.mean(axis=1) + 0.5, spread.mean(axis=1))
    assert once["win_rate"] == 1 and "sampled" not in once["why"]
    same = np.repeat(current[:, None], 2, axis=1)
    two, one = (approval_difference(x - 7.0, x, judge, **stats)[0] for x in (same, current))
    assert (two.estimate, two.low, two.high) == pytest.approx((one.estimate, one.low, one.high))
    mixed = np.stack([current, current - 7.0], axis=1)  # a prompt's replies: one liked, one not
    _, ok, half = approval_difference(mixed, same, judge, **stats)
    assert half == pytest.approx((ok + approval_difference(current - 7.0, current, judge,
                                                           **stats)[2]) / 2)
    # Platt's smoothed targets keep the fit finite on labels the scores separate completely
    slope, intercept = platt([0, 1, 2, 3, 10, 11, 12, 13], [False] * 4 + [True] * 4)
    assert 0 < slope < 1 and 1 / (1 + np.exp(-(13 * slope + intercept))) < 0.9
    with pytest.raises(ValueError, match="both labels"):
        Calibration.of((1.0, 2.0), (True, True), **stats)


@pytest.mark.parametrize("answers, reply, counts", [
    (["4", "four"], "2 + 2 = 4.", True),
    (["4", "four"], "Two plus two is four", True),
    (["4", "four"], "1. Add them\n2. Count\n3. Check\n4. Done", False),  # a list's numbering
    (["4", "four"], "**4.** Done", False),
    (["4", "four"], "In 2024, 14 of 40 said", False),  # inside other numbers
    (["0", "zero"], "It read 10.0 in 2020", False),
    (["0", "zero"], "It freezes at 0\u00b0C.", True),
    (["25"], "about 2.25", False),
    (["ice"], "That's a nice price", False),  # inside other words
    (["ice"], "Frozen water is called ice.", True),
    (["red", "blue", "yellow"], "It is considered covered", False),
    (["au"], "because the author said", False),
    (["au"], "Its symbol is Au.", True),
    (["sun"], "sunlight on Sunday", False),
    (["whale"], "Blue whales are the largest", True),  # a plural
    (["delhi"], "The capital is New Delhi.", True),
    (["h2o"], "Its formula is H\u2082O.", True),  # Unicode's subscript two
    (["thames"], "- **The Thames** flows", True),  # a bullet's words still count
])
def test_a_regression_answer_counts_only_as_a_whole_word_or_number(answers, reply, counts):
    from training.evaluate import answered
    assert answered({"question": "?", "answers": answers}, reply) is counts


def test_the_regression_set_is_large_enough_to_see_the_loss_retention_forbids():
    from training.config import GateConfig
    from training.evaluate import load_regression_set
    from training.stats import paired_mean
    items = load_regression_set()
    questions = [it["question"] for it in items]
    assert len(set(questions)) == len(questions)
    # Replies are matched lower-cased: an answer with a capital letter could never match.
    assert all(it["answers"] and all(a and a == a.lower() for a in it["answers"]) for it in items)
    cfg = GateConfig()

    def verdict(n: int, correct: int, lost: int, gained: int = 0) -> bool:  # True: worse
        cur = [1] * correct + [0] * (n - correct)
        cand = [0] * lost + cur[lost:correct] + [1] * gained + cur[correct + gained:]
        diff = paired_mean([c - o for c, o in zip(cand, cur)], confidence=cfg.confidence,
                           samples=cfg.bootstrap_samples, seed=cfg.seed)
        return diff.high < 0 and diff.estimate < -(1 - cfg.min_retention) * correct / n

    # The structured user's round 3 (session 14): 28 of 40 against 33 (about 6 lost, 1
    # gained: interval [-0.25, 0.00]), retention 85%, passed because 40 questions cannot tell
    # that loss from noise. At the set's size the same shares are seen; the base model answers
    # about 70%, and a candidate that forgets 15% of that is worse; an unchanged one passes.
    assert not verdict(40, 33, 6, 1)
    assert len(items) >= 120 and verdict(120, 99, 18, 3)
    n = len(items)
    correct = round(0.7 * n)
    assert verdict(n, correct, round(0.15 * correct))
    assert not verdict(n, correct, 0) and not verdict(n, correct, 1)
    # Losses and gains together (the bold user's round 3, session 15: 82 of 120 against 94,
    # 16 lost and 4 gained, interval [-0.18, -0.02]): a loss shown, its estimate 2.5 times the
    # allowed one, is worse though not provably beyond the allowance; a loss as large as the
    # allowance, or one inside the noise, is not.
    assert verdict(120, 94, 16, 4)
    assert not verdict(120, 94, 4, 0) and not verdict(120, 94, 10, 6)


def test_training_stops_before_a_step_that_would_end_past_its_deadline(monkeypatch):
    from transformers import TrainerControl
    from training.tune import Deadline
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    stop = Deadline(130.0)
    control = TrainerControl()
    stop.on_train_begin(None, None, control)
    for step_s in (8.0, 10.0):  # ends at 108 and 118: the next 10 s step still fits
        clock[0] += step_s
        stop.on_step_end(None, None, control)
        assert not control.should_training_stop
    clock[0] += 4.0  # 122 + the slowest recent step (10 s) would end at 132, past 130
    stop.on_step_end(None, None, control)
    assert control.should_training_stop and stop.hit and clock[0] < 130.0


def test_the_clock_schedule_brings_the_learning_rate_to_zero_by_the_deadline(monkeypatch,
                                                                            tiny_model):
    """tune.schedule "clock": each step's rate is the lower of the trainer's linear schedule
    over the planned steps and the share of the time to the deadline still left, so a tuning
    the clock ends early still ends near a zero rate; "steps" keeps the planned decay alone."""
    import torch
    from transformers import TrainerControl, get_linear_schedule_with_warmup

    from serving.config import ServingConfig
    from training.config import TuneConfig
    from training.tune import Deadline, tune

    def scheduler():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, get_linear_schedule_with_warmup(optimizer, 0, 100)

    clock = [100.0]
    with monkeypatch.context() as m:
        m.setattr(time, "monotonic", lambda: clock[0])
        for schedule, rates in (("clock", [0.75, 0.5, 0.25]), ("steps", [0.99, 0.98, 0.97])):
            clock[0] = 100.0
            optimizer, lr = scheduler()
            stop = Deadline(140.0, schedule)
            stop.on_train_begin(None, None, TrainerControl(), lr_scheduler=lr)
            seen = []
            for _ in range(3):  # 10 s a step: a quarter of the 40 s each
                optimizer.step()
                clock[0] += 10.0
                lr.step()
                seen.append(lr.get_last_lr()[0])
            assert seen == pytest.approx(rates)
        clock[0] = 100.0
        optimizer, lr = scheduler()
        for _ in range(90):  # late in the plan the planned rate is the lower one
            optimizer.step()
            lr.step()
        Deadline(1000.0, "clock").on_train_begin(None, None, TrainerControl(), lr_scheduler=lr)
        optimizer.step()
        lr.step()
        assert lr.get_last_lr()[0] == pytest.approx(0.09)
        with pytest.raises(TypeError, match="LambdaLR"):
            Deadline(140.0, "clock").on_train_begin(
                None, None, TrainerControl(),
                lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 5))

    # in a real tuning: hundreds of planned steps, seconds of clock (20: a step of the tiny
    # model is a small share of it even on a loaded machine; with 6, CI beside a benchmark
    # took steps of 3 s and stopped at 0.54 of the rate)
    fill(12)
    train, _ = split(load_feedback(), DataConfig(heldout_fraction=0.25))
    reg = Registry()
    for schedule in ("clock", "steps"):
        cfg = TuneConfig(method="dpo", epochs=500, batch_size=2, lora_r=2, lora_alpha=4,
                         learning_rate=1e-3, bf16=False, schedule=schedule)
        loaded = reg.load(None, ServingConfig(dtype="float32"))
        summary, _ = tune(loaded.model, loaded.tokenizer, train, cfg, reg.staging(schedule),
                          time.monotonic() + 20, judge=None)
        assert summary["stopped_by_deadline"] and summary["steps"] >= 2
        assert summary["schedule"] == schedule
        if schedule == "clock":
            assert summary["learning_rate_at_stop"] < 0.4e-3
        else:
            assert summary["learning_rate_at_stop"] > 0.95e-3


def test_the_clock_bounds_the_round_and_never_discards_a_judged_candidate(tiny_model, tmp_path):
    fill_split(30)
    config = {**FAST, "max_minutes": 0.05}  # 3 s: training and gate both get less than needed
    done = training_cli("run", config=config, tmp_path=tmp_path)
    assert done.returncode in (0, 5), done.stdout[-3000:] + done.stderr[-3000:]
    [path] = (Path(os.environ["CHAT_DATA_DIR"]) / "reports").glob("r*.json")
    report = json.loads(path.read_text())
    assert report["tuning"]["stopped_by_deadline"] and report["tuning"]["steps"] >= 1
    assert report["overrun_s"] > 0
    gate = report["gate"]
    # Capped by the clock, but never below the minimums: the decision rests on real numbers.
    assert gate["checks"]["b_reward_model"]["prompts"] >= 1
    assert gate["checks"]["a_heldout_ranking"]["votes"] >= 2
    assert gate["checks"]["c_regression"]["fluency"]["replies"] >= 40
    assert report["decision"] == ("promoted" if gate["passed"] else "rejected")
    assert (Registry().current_name() != tiny_model.name) == gate["passed"]


def test_synthetic_pairs_are_made_only_when_the_tuning_can_reach_them():
    """The synthetic stage is skipped when the tuning's time, at its estimated step cost,
    cannot take all the users' own pairs (the made pairs would be shuffled among them and
    mostly unseen); nothing is assumed when no step was measured or there are no pairs. The
    step cost: the reward model's step times the ratio the latest DPO round in this data folder
    measured with its reference got the same way (kept by `training prepare`, or computed in
    each step), else times that way's setting."""
    from training.config import SyntheticConfig
    from training.round import kept_reach, reports_dir, tuning_reach, tuning_step_estimate

    cfg = SyntheticConfig(tuning_step_ratio=3.0, tuning_step_ratio_kept=2.0)
    assert kept_reach(420.0, 4)["pairs"] is None  # no earlier round: every pair
    assert tuning_step_estimate(None, cfg) == {"step_s": None,
                                               "source": "no reward-model step measured"}
    assert tuning_step_estimate(6.0, cfg)["step_s"] == 18.0  # no earlier round: the setting
    estimate = tuning_step_estimate(6.0, cfg, kept=True)
    assert estimate["step_s"] == 12.0 and "tuning_step_ratio_kept" in estimate["source"]
    kept = {"source": "kept for smollm2-135m-instruct", "pairs": 60}
    rounds = {"r20261130T010000": {"tuning": {"method": "dpo", "step_s": 20.0},
                                   "reward_model": {"step_s": 5.0}},            # ratio 4
              "r20261130T015000": {"tuning": {"method": "dpo", "step_s": 15.0,
                                              "reference": kept},
                                   "reward_model": {"step_s": 6.0}},            # kept: 2.5
              "r20261130T020000": {"tuning": {"method": "kto", "step_s": 9.0},
                                   "reward_model": {"step_s": 6.0}},            # not DPO
              "r20261130T025000": {"tuning": {"method": "dpo", "step_s": 9.0,
                                              "reference": {"source": "every step"}},
                                   "reward_model": {"step_s": None}},           # no judge step
              "r20261130T030000": {"decision": "skipped"}}                      # no steps
    for name, report in rounds.items():
        (reports_dir() / f"{name}.json").write_text(json.dumps(report))
    (reports_dir() / "r20261130T040000.json").write_text("{not json")
    estimate = tuning_step_estimate(6.0, cfg)
    assert estimate["step_s"] == 24.0 and "r20261130T010000" in estimate["source"]
    estimate = tuning_step_estimate(6.0, cfg, kept=True)
    assert estimate["step_s"] == 15.0 and "r20261130T015000" in estimate["source"]
    # what `training prepare` keeps the reference for: the pairs 420 s of 15-s steps reach,
    # and a quarter more
    reach = kept_reach(420.0, 4)
    assert reach["pairs"] == 4 * 35 and "r20261130T015000" in reach["source"]
    assert kept_reach(0.0, 4)["pairs"] == 4  # at least one step's batch

    assert tuning_reach(40.0, 200.0, 8, 374) == 40      # 5 steps of 8: skip
    assert tuning_reach(40.0, 30.0, 8, 100) == 0        # not even one step
    assert tuning_reach(2.0, 200.0, 8, 374) is None     # 100 steps of 8: every pair reached
    assert tuning_reach(40.0, 400.0, 8, 80) is None     # exactly all of them
    assert tuning_reach(None, 200.0, 8, 374) is None    # the reward model took no step
    assert tuning_reach(40.0, 200.0, 8, 0) is None      # no pairs (KTO on votes)
