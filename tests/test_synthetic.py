"""Synthetic on-policy pairs: real replies from the tiny model through the serving engine, judged.

The judge here scores a reply by its length in characters, a real ranking whose best and worst
reply are known, so the pairing rules (best vs worst, the margin, the deadline, the trust check)
can be asserted exactly.
"""

from __future__ import annotations

import time

import pytest

from serving.backends import open_engine
from serving.config import ServingConfig
from serving.registry import Registry
from training.config import SyntheticConfig
from training.dataset import FeedbackData
from training.synthetic import (PreparedPairs, check_sample, judge_quality,
                                judged_conversations, judged_pairs, synthetic_pairs)


class LengthJudge:
    def score(self, conversations: list[list[dict]]) -> list[float]:
        return [float(len(c[-1]["content"])) for c in conversations]


def vote(prompt: str, reply: str, label: bool) -> dict:
    return {"prompt": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": reply}], "label": label}


TRAIN = FeedbackData(votes=[vote(f"Question {i}?", "a reply", i % 2 == 0) for i in range(6)])


@pytest.fixture
def engine(tiny_model):
    eng = open_engine(Registry(), config=ServingConfig(dtype="float32", slots=8))
    yield eng
    eng.close()


def test_best_and_worst_of_each_prompt_become_a_pair_past_the_margin(engine):
    cfg = SyntheticConfig(samples_per_prompt=4, max_prompts=5, margin=0.0, max_new_tokens=24,
                          temperature=1.5)
    pairs, report = synthetic_pairs(engine, LengthJudge(), TRAIN, cfg, time.monotonic() + 120)
    assert report["prompts"] == 5 and report["prompts_finished"] == 5
    assert report["replies"] <= 20 and report["pairs"] == len(pairs) > 0
    for p in pairs:
        assert p["source"] == "synthetic" and p["prompt"][0]["content"] == "Be brief."
        assert len(p["chosen"][0]["content"]) > len(p["rejected"][0]["content"])
    strict = SyntheticConfig(samples_per_prompt=4, max_prompts=5, margin=1e6, max_new_tokens=24,
                             temperature=1.5)
    none, report = synthetic_pairs(engine, LengthJudge(), TRAIN, strict, time.monotonic() + 120)
    assert none == [] and report["pairs_below_margin"] > 0


class AskedEngine:
    """The real engine, keeping what each reply was asked (the messages submitted)."""

    def __init__(self, engine) -> None:
        self.engine, self.asked = engine, []

    def submit(self, messages, settings=None):
        self.asked.append(messages[-1]["content"])
        return self.engine.submit(messages, settings)


class SeeingJudge(LengthJudge):
    def __init__(self) -> None:
        self.seen = []

    def score(self, conversations):
        self.seen += conversations
        return super().score(conversations)


def test_hinted_samples_are_asked_for_a_form_and_judged_as_replies_to_the_prompt(engine):
    cfg = SyntheticConfig(samples_per_prompt=2, hinted_samples=3, hints=" Ask A. | |Ask B.",
                          max_prompts=3, margin=0.0, max_new_tokens=24, temperature=1.5)
    asking, judge, rows = AskedEngine(engine), SeeingJudge(), []
    pairs, report = synthetic_pairs(asking, judge, TRAIN, cfg, time.monotonic() + 120,
                                    scored_out=rows)
    # prompts 0, 2 and 4 of six: two plain replies each, then three requests, rotating
    q = [f"Question {i}?" for i in (0, 2, 4)]
    assert asking.asked == [q[0], q[0], f"{q[0]}\n\nAsk A.", f"{q[0]}\n\nAsk B.",
                            f"{q[0]}\n\nAsk A.", q[1], q[1], f"{q[1]}\n\nAsk B.",
                            f"{q[1]}\n\nAsk A.", f"{q[1]}\n\nAsk B.", q[2], q[2],
                            f"{q[2]}\n\nAsk A.", f"{q[2]}\n\nAsk B.", f"{q[2]}\n\nAsk A."]
    # judged, kept and paired as replies to the stored prompt: the request is nowhere
    assert judge.seen and all(c[:-1] in [v["prompt"] for v in TRAIN.votes] for c in judge.seen)
    assert len(rows) == report["replies"] == len(judge.seen)
    assert {hint for *_, hint in rows} <= {None, "Ask A.", "Ask B."}
    hinted = report["hinted"]
    assert hinted["replies"] == sum(hint is not None for *_, hint in rows) > 0
    assert report["pairs"] == len(pairs) > 0
    for pair in pairs:
        assert pair["prompt"] in [v["prompt"] for v in TRAIN.votes]
        for side in ("chosen", "rejected"):
            reply = pair[side][0]["content"]
            assert pair[f"{side}_hint"] in [h for p, t, _, h in rows
                                            if p == pair["prompt"] and t == reply]
    assert hinted["chosen"] == sum(p["chosen_hint"] is not None for p in pairs)
    assert hinted["rejected"] == sum(p["rejected_hint"] is not None for p in pairs)
    assert sum(c["chosen"] + c["rejected"] for c in hinted["by_hint"].values()) == 2 * len(pairs)
    # without hinted samples the report and the pairs are as before
    plain = SyntheticConfig(samples_per_prompt=2, max_prompts=3, margin=0.0, max_new_tokens=24)
    pairs, report = synthetic_pairs(engine, LengthJudge(), TRAIN, plain, time.monotonic() + 120)
    assert "hinted" not in report and all("chosen_hint" not in p for p in pairs)


def test_a_request_too_long_for_the_context_leaves_its_prompt_out_and_frees_the_engine(engine):
    cfg = SyntheticConfig(samples_per_prompt=2, hinted_samples=1, hints="word " * 10_000,
                          max_prompts=3, margin=0.0, max_new_tokens=24)
    pairs, report = synthetic_pairs(engine, LengthJudge(), TRAIN, cfg, time.monotonic() + 120)
    assert pairs == [] and report["prompts"] == 0 and report["prompts_too_long"] == 3
    reply = engine.submit([{"role": "user", "content": "hi"}])  # its plain replies cancelled
    reply.wait(60)
    assert reply.done


def test_hinted_samples_need_a_request_and_change_the_prepared_pairs_key():
    from training.config import ConfigError, RoundConfig

    with pytest.raises(ConfigError, match="synthetic.hints"):
        RoundConfig.from_dict({"synthetic": {"hinted_samples": 2, "hints": " | "}})
    with pytest.raises(ConfigError, match="hinted_samples"):
        RoundConfig.from_dict({"synthetic": {"hinted_samples": 17}})
    with pytest.raises(ConfigError, match="hints must be"):
        RoundConfig.from_dict({"synthetic": {"hints": 3}})
    assert SyntheticConfig(hints="A.| B. |").hint_list == ["A.", "B."]
    key = PreparedPairs.settings_key
    # off, the requests do not shape the pairs: pairs prepared before hints existed still fit
    assert key(SyntheticConfig(), False) == key(SyntheticConfig(hints="Other."), False)
    on = key(SyntheticConfig(hinted_samples=2), False)
    assert on != key(SyntheticConfig(), False)
    assert on != key(SyntheticConfig(hinted_samples=2, hints="Other."), False)
    assert on != key(SyntheticConfig(hinted_samples=3), False)


def test_the_chosen_reply_is_the_best_fluent_one_when_asked():
    """A judge that likes lists may score a list looping to the token cap highest: with
    `fluent_chosen` the pair takes the best reply that passes the gate's fluency check."""
    loop = "- a tip\n" * 12
    one, two, three = ([{"role": "user", "content": q}] for q in ("One?", "Two?", "Three?"))
    scored = [(one, "a plain answer", 1.0), (one, "- a list\n- of two", 5.0), (one, loop, 9.0),
              (two, "short", 0.0), (two, loop, 8.0), (two, loop + "- more\n", 9.0),
              (three, "only one reply", 3.0)]
    pairs, gaps, passed_over = judged_pairs(scored, 0.0, fluent_chosen=True)
    assert passed_over == 2 and len(gaps) == 1  # "Two?" has no fluent reply but its worst
    [pair] = pairs
    assert pair["prompt"] == one and pair["chosen"][0]["content"] == "- a list\n- of two"
    assert pair["rejected"][0]["content"] == "a plain answer"
    pairs, gaps, passed_over = judged_pairs(scored, 0.0, fluent_chosen=False)
    assert passed_over == 0
    assert [p["chosen"][0]["content"] for p in pairs] == [loop, loop + "- more\n"]
    assert judged_pairs(scored, 1e6, fluent_chosen=False)[0] == []  # nothing past the margin


def test_past_its_deadline_sampling_stops_and_keeps_nothing_half_done(engine):
    cfg = SyntheticConfig(samples_per_prompt=4, max_prompts=6, margin=0.0, max_new_tokens=300)
    pairs, report = synthetic_pairs(engine, LengthJudge(), TRAIN, cfg, time.monotonic())
    assert pairs == [] and report["prompts_finished"] == 0
    # the engine is free again: the cancelled samples do not hold its slots
    reply = engine.submit([{"role": "user", "content": "hi"}])
    reply.wait(60)
    assert reply.done


def test_only_a_judge_that_ranks_held_out_votes_above_chance_is_trusted():
    heldout = FeedbackData(votes=[vote(f"q{i}", "x" * (50 if i % 2 else 5), bool(i % 2))
                                  for i in range(20)])
    good, calibration = judge_quality(LengthJudge(), heldout, confidence=0.95, samples=500)
    assert good["trusted"] and good["auc"]["estimate"] == 1.0
    # the votes it was checked on calibrate it for the gate: longer (its liked) scores higher
    assert calibration.labels == tuple(v["label"] for v in heldout.votes)
    assert good["calibration"]["votes"] == 20 and good["calibration"]["slope"] > 0
    inverted = FeedbackData(votes=[dict(v, label=not v["label"]) for v in heldout.votes])
    bad, calibration = judge_quality(LengthJudge(), inverted, confidence=0.95, samples=500)
    assert not bad["trusted"] and bad["auc"]["high"] < 0.5
    assert bad["calibration"]["slope"] < 0  # a higher score means less liked: said, not hidden
    one_label = FeedbackData(votes=[v for v in heldout.votes if v["label"]])
    quality, calibration = judge_quality(LengthJudge(), one_label, confidence=0.95, samples=500)
    assert not quality["trusted"] and calibration is None and "calibration" not in quality


def test_the_judges_check_scores_a_bounded_sample_of_both_labels_and_pairs():
    votes = [vote(f"q{i}", "x" * i, i % 5 == 0) for i in range(400)]  # 20% liked
    pairs = [{"prompt": [{"role": "user", "content": f"p{i}"}],
              "chosen": [{"role": "assistant", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]} for i in range(60)]
    checked = check_sample(FeedbackData(votes=votes, pairs=pairs), 96, seed=0)
    assert len(judged_conversations(checked)) == 96  # 72 votes + 12 pairs, not 520
    liked = sum(v["label"] for v in checked.votes)
    assert len(checked.votes) == 72 and 12 <= liked <= 16  # both labels, in proportion
    assert len({v["prompt"][-1]["content"] for v in checked.votes}) == 72  # no repeats
    # a small held-out set is checked whole
    small = FeedbackData(votes=votes[:10], pairs=pairs[:3])
    assert len(judged_conversations(check_sample(small, 96, seed=0))) == 16


def test_the_reward_model_stops_training_in_time_to_score_the_heldout(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from serving.registry import VersionDir
    from training.config import RewardModelConfig
    from training.reward import RewardModel, train_reward_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pairs = [{"chosen": v["prompt"] + [{"role": "assistant", "content": "Yes."}],
              "rejected": v["prompt"] + [{"role": "assistant", "content": "Well, um, maybe."}]}
             for v in TRAIN.votes] * 4  # 24 pairs: 12 steps of 2
    cfg = RewardModelConfig(batch_size=2, max_length=64)
    out = VersionDir(tmp_path / "v")
    # Scoring 8 conversations is timed first; 240,000 more cannot fit in 60 s, so training
    # stops at its first step, and the judge it returns is the trained one.
    many = [p["chosen"] for p in pairs] * 10_000
    judge, summary = train_reward_model(str(tiny_model), tokenizer, pairs, cfg, out,
                                        time.monotonic() + 60, to_score=many)
    assert summary["scoring_reserve_s"] > 60 and summary["stopped_by_deadline"]
    assert summary["steps"] == 1 and (out.reward / "adapter_config.json").exists()
    scores = judge.score([p["chosen"] for p in pairs[:2]] + [p["rejected"] for p in pairs[:2]])
    assert len(scores) == 4 and all(isinstance(s, float) for s in scores)
    # Batched by length, returned in the caller's order: each conversation keeps its score.
    mixed = [pairs[0]["chosen"], pairs[0]["rejected"], pairs[1]["chosen"]] * 3
    alone = [judge.score([c])[0] for c in mixed[:3]]
    assert judge.score(mixed, batch_size=2) == pytest.approx(alone * 3, abs=1e-2)
    # The reserve scales the probe's time by padded size, not by count: the check runs
    # length-sorted batches, the probe of 8 unsorted ones pads to its longest.
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 400}]
    assert RewardModel.padded_size([short, long] * 4) == 8 * (402 + 32)
    assert RewardModel.padded_size([short, long] * 8) == 8 * (3 + 32) + 8 * (402 + 32)
    # Nothing to score afterwards: the same deadline lets every step run.
    again, summary = train_reward_model(str(tiny_model), tokenizer, pairs, cfg, out,
                                        time.monotonic() + 60)
    assert summary["scoring_reserve_s"] == 0 and summary["steps"] == 12
    assert not summary["stopped_by_deadline"]
    # The same votes and steps train the same judge: its new score head starts from a seed.
    twice, _ = train_reward_model(str(tiny_model), tokenizer, pairs, cfg, out,
                                  time.monotonic() + 60)
    assert twice.score(mixed[:3]) == pytest.approx(again.score(mixed[:3]), abs=1e-4)


def test_prepared_pairs_serve_only_the_round_with_their_judge_version_and_settings(tmp_path):
    """`PreparedPairs` (what `training prepare` made off the round's clock): a round uses them
    with the very judge that scored them (the prepared one), while the version that sampled
    them serves, with the settings that shaped them; the stage's time share is not one of
    those. An unreadable file holds none."""
    cfg = SyntheticConfig()
    pair = {"prompt": [{"role": "user", "content": "q"}], "source": "synthetic",
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}], "reward_gap_sd": 1.5}
    summary = {"prompts": 3, "prompts_finished": 3, "replies": 12, "pairs": 1,
               "pairs_below_margin": 2, "margin_sd": 1.0, "generate_and_score_s": 4.0}
    path = tmp_path / "training" / "synthetic.json"
    kept = PreparedPairs.write(path, version="v1", judge_made="t1", cfg=cfg, fluent_chosen=True,
                               pairs=[pair], summary=summary, seconds=5.04)
    assert kept.unusable("v1", "t1", cfg, True) is None and kept.pairs == [pair]
    assert kept.unusable("v1", "t1", SyntheticConfig(time_share=0.5), True) is None
    assert kept.summary()["prepared"]["version"] == "v1"
    assert kept.summary()["prepared"]["seconds"] == 5.0 and kept.summary()["pairs"] == 1
    assert "another reward model" in kept.unusable("v1", "t2", cfg, True)
    assert "trains its own" in kept.unusable("v1", None, cfg, True)
    assert "sampled from v1, not v2" in kept.unusable("v2", "t1", cfg, True)
    for other, fluent in ((SyntheticConfig(margin=0.5), True),
                          (SyntheticConfig(samples_per_prompt=8), True), (cfg, False)):
        assert "other synthetic settings" in kept.unusable("v1", "t1", other, fluent)
    assert PreparedPairs(path).pairs == [pair]  # read back from the file
    path.write_text("{not json")
    assert "has made none" in PreparedPairs(path).unusable("v1", "t1", cfg, True)
    assert PreparedPairs(tmp_path / "none.json").pairs == []
