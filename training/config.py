"""One typed config per stage of a round, each field declared once: default, help, allowed values.

`RoundConfig.from_dict` checks a JSON override against those declarations, and the CLI's flags
are made from them (`serving/setting.py`).

The defaults fit 2 CPU cores and 24 GiB; the same code runs under `accelerate launch` on GPUs.
Each round saves the whole `RoundConfig` as `config.json` beside the version it produced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from serving.config import GenerationSettings
from serving.setting import check_value, setting


def machine_bf16() -> bool:
    from serving.hardware import resolve_dtype
    return resolve_dtype() == "bfloat16"


@dataclass
class DataConfig:
    heldout_fraction: float = setting(0.2, "share of conversations held out for the gate",
                                      low=0.0, high=1.0, low_open=True, high_open=True)
    heldout_min_votes: int = setting(
        100, "while the store is small, hold out a larger share of conversations (at most half) "
             "so that about this many votes are held out: the gate's and the judge check's "
             "evidence in early rounds, whose reward model and tuning reach only part of their "
             "data in their time; the share falls to heldout_fraction as votes arrive, never "
             "rises, so no conversation a version trained on is held out later; 0: always "
             "heldout_fraction", low=0)
    split_salt: str = setting("heldout-v1",
                              "salt of the split hash; changing it reshuffles the split")
    min_votes: int = setting(8, "fewest usable votes for a round", low=2)
    min_per_label: int = setting(2, "fewest liked and fewest disliked replies for a round", low=1)
    max_pairs_per_prompt: int = setting(4, "cap on liked x disliked pairs made from one prompt",
                                        low=1)
    drop_disfluent: bool = setting(
        True, "leave out of training the liked replies that are empty or loop "
              "(training.dataset.fluency_failure, the test of the gate's fluency check) and the "
              "pairs that prefer such a reply to a fluent one; the synthetic pairs' chosen "
              "reply is then the best-scored fluent one. Structured (session 36): 3 of its 61 "
              "training pairs preferred a looping list, and its +32 candidate was rejected for "
              "7 looping replies against 1")
    min_disliked_share: float = setting(
        0.1, "a round trains only while users may still dislike at least this share of the "
             "serving version's replies: the top of the interval (gate.confidence) of the "
             "disliked share of the votes on its own replies; 0: always train",
        low=0.0, high=1.0)


@dataclass
class RewardModelConfig:
    learning_rate: float = setting(3e-4, "LoRA learning rate of the reward model. 3e-4: "
                                         "retrained in a round's own time (11-14 steps), "
                                         "four judges ranked held-out votes at AUC 0.65-0.99 "
                                         "(all above chance), at 1e-4 0.59-0.89 (two at "
                                         "chance) (bench/judge_lr.py)",
                                   low=0.0, high=1.0, low_open=True, high_open=True)
    epochs: float = setting(1.0, "passes over the pairs", low=0.0, low_open=True)
    batch_size: int = setting(4, "pairs per step", low=1)
    max_length: int = setting(512, "tokens per sequence (longer are truncated)", low=16)
    lora_r: int = setting(16, "LoRA rank", low=1)
    lora_layers: float = setting(1.0, "share of the transformer blocks, counted from the top, "
                                      "that get LoRA adapters (as tune.lora_layers). 1: on the "
                                      "top half its steps were 5.1 s instead of 7.4, but it "
                                      "ranked held-out votes at AUC 0.66 against 0.69 and the "
                                      "gate held its round back (bench/variants.py, session "
                                      "34); its time is `prepare`'s, off the round's clock",
                                 low=0.0, high=1.0, low_open=True)
    max_steps: int = setting(-1, "stop after this many steps (-1: epochs decide)",
                             low=1, special=(-1,))
    reason_margin: float = setting(0.0, "margin a pair's chosen reply must win by, times the "
                                        "pair's strength (1: a pick or an edit; for two votes, "
                                        "the share that gave a reason or a comment); 0 (the "
                                        "default: 1.0 did not rank held-out votes better in "
                                        "bench/reasons.py): every pair alike", low=0.0)
    check_conversations: int = setting(96, "most held-out conversations the judge's check "
                                            "scores (votes of both labels spread evenly, then "
                                            "pairs); its time comes out of the reward model's "
                                            "share, so it must not grow with the store", low=8)
    prepare: bool = setting(True, "`python -m training prepare` also trains the reward model "
                                  "(off the round's clock, for as long as its epochs ask and "
                                  "its time allows), and a round uses it instead of training "
                                  "its own in a share of its time, which then goes to the "
                                  "tuning")
    prepared_max_missing: float = setting(0.25, "a round uses the prepared reward model while "
                                                "it lacks at most this share of the round's "
                                                "training votes and pairs (votes that came "
                                                "after it was trained); more, and the round "
                                                "trains its own", low=0.0, high=1.0)


@dataclass
class TuneConfig:
    method: str = setting("auto", "kto (votes), dpo (pairs) or auto: DPO when the feedback "
                                  "gives at least min_dpo_pairs pairs, KTO otherwise; online: "
                                  "TRL's online DPO, the model samples two replies per training "
                                  "prompt at every step and the round's reward model picks "
                                  "(instead of synthetic pairs made before tuning; needs a "
                                  "trusted reward model, else auto)",
                          choices=("auto", "kto", "dpo", "online"))
    start: str = setting("current", "the model a round tunes: current (the serving version, "
                                    "on all feedback so far) or base (the base model again, on "
                                    "all feedback so far, so rounds do not stack adapters)",
                         choices=("current", "base"))
    min_dpo_pairs: int = setting(32, "fewest training pairs for auto to choose DPO", low=1)
    full_finetune: bool = setting(False, "train every weight instead of a LoRA adapter")
    lora_r: int = setting(16, "LoRA rank", low=1)
    lora_alpha: int = setting(32, "LoRA scaling", low=1)
    lora_dropout: float = setting(0.0, "LoRA dropout", low=0.0, high=1.0, high_open=True)
    lora_layers: float = setting(0.5, "share of the transformer blocks, counted from the top, "
                                      "that get LoRA adapters; the blocks below are frozen and "
                                      "a step's backward pass stops above them. 0.5: a DPO "
                                      "step 14.0 s instead of 17.9 on 2 cores, and with 2 "
                                      "epochs tips' round-1 votes moved +30 points, against "
                                      "+15 at 1 epoch and +25 with every block "
                                      "(bench/variants.py, session 34); 1: every block",
                                 low=0.0, high=1.0, low_open=True)
    learning_rate: float = setting(1.5e-3, "learning rate (LoRA; use ~5e-6 for full fine-tuning). "
                                           "1.5e-3: on the same votes 5e-4 moved the tips and "
                                           "example users +10 and +2 points in a 10-minute "
                                           "round, 1.5e-3 +23 and +27 (bench/variants.py)",
                                   low=0.0, high=1.0, low_open=True, high_open=True)
    continue_lr_scale: float = setting(0.333, "learning rate times this when the round tunes "
                                              "a trained version (start current, after round "
                                              "1), not the base. 0.333: on the bold user's "
                                              "rounds 2-3 the full rate (from the serving "
                                              "version or the base) lost 9-22% of the "
                                              "regression answers; a third of it kept them all "
                                              "and still gained +32 (bench/loop.py)",
                                       low=0.0, high=1.0, low_open=True)
    beta: float = setting(0.1, "KTO/DPO beta: higher stays closer to the current model",
                          low=0.0, low_open=True)
    sft_weight: float = setting(1.0, "DPO: weight of an added language-modelling loss on the "
                                     "chosen replies (RPO), which keeps the model fluent; 0: off",
                                low=0.0)
    replay_weight: float = setting(0.0, "DPO: weight of an added language-modelling loss on "
                                        "the starting version's own greedy answers to 96 "
                                        "short questions (training/replay_set.jsonl, none in "
                                        "(c)'s regression set), a batch of them beside each "
                                        "step's pairs, so the round keeps what the model knew; "
                                        "`training prepare` writes the answers off the "
                                        "clock; 0: off",
                                 low=0.0)
    batch_size: int = setting(4, "rows (KTO) or pairs (DPO) per step; KTO takes at least 2", low=1)
    epochs: float = setting(2.0, "passes over the data, as far as the clock allows; the "
                                 "learning rate decays linearly over them. 2: a small store's "
                                 "pairs ran out before a 10-minute round did; on the same "
                                 "votes 2 gained +50 and +30 points where 1 gained +39 and +15 "
                                 "(example with every block adapted, tips with the top half: "
                                 "bench/variants.py, sessions 32 and 34)",
                            low=0.0, low_open=True)
    max_steps: int = setting(-1, "stop after this many steps (-1: epochs decide)",
                             low=1, special=(-1,))
    schedule: str = setting("steps", "steps: the learning rate decays linearly over the "
                                     "planned steps (epochs or max_steps), wherever the clock "
                                     "stops them; clock: it also reaches zero by the tuning's "
                                     "deadline (each step takes the lower of the two)",
                            choices=("steps", "clock"))
    max_length: int = setting(512, "tokens per row (prompt + reply), longer are truncated", low=16)
    change_scale: float = setting(1.0, "the round's change to the weights times this before the "
                                       "candidate is saved: 1 keeps it as trained, above 1 "
                                       "extrapolates past it (ExPO), below 1 interpolates toward "
                                       "the model the round started from (WiSE-FT); the gate "
                                       "judges the scaled candidate",
                                  low=0.0, high=4.0, low_open=True)
    bf16: bool = field(default_factory=machine_bf16, metadata={
        "help": "bfloat16 autocast; default: on where the hardware has native bfloat16 "
                "(CHAT_DTYPE overrides), off where it would be emulated (several times slower)"})
    gradient_checkpointing: bool = setting(False, "trade compute for memory (off: 135M fits)")
    seed: int = setting(0, "seed for initialisation and sampling")


@dataclass
class SyntheticConfig:
    samples_per_prompt: int = setting(4, "replies sampled per training prompt from the serving "
                                         "version, judged by the reward model (0: no synthetic "
                                         "pairs)", low=2, high=16, special=(0,))
    max_prompts: int = setting(96, "most training prompts sampled", low=1)
    margin: float = setting(1.0, "best and worst reply must differ by this many standard "
                                 "deviations of the reward model's scores to make a pair",
                            low=0.0)
    temperature: float = setting(0.9, "sampling temperature of the replies", low=0.0,
                                 high=2.0, low_open=True)
    max_new_tokens: int = setting(192, "reply length cap of the samples", low=16, high=2048)
    hinted_samples: int = setting(
        0, "replies per training prompt sampled besides samples_per_prompt, each with one "
           "answer-form request from synthetic.hints added to the prompt's last user message "
           "(the hints rotate over the prompts); judged and paired as replies to the prompt "
           "without it, so the tuning learns, unasked, the forms the judge finds users like "
           "(the 135M model follows a request there far more often than in the system "
           "prompt: bench/hints.py). 0 (none) by default: tips' round with 4 gained +11 points, "
           "+12 without on the same votes, +15 with its simulated user picking the pairs "
           "(session 51, 6 replies a test prompt)", low=0, high=16)
    hints: str = setting(
        'At the end, add one line that starts with "Tip:".'
        '|Include one sentence that starts with "For example,".'
        '|Answer as a list: each point on its own line, starting with "- ".'
        "|Write the key terms in **bold**."
        "|Answer in at most three sentences."
        "|Start directly with the answer, without any greeting or preamble.",
        "the answer-form requests of synthetic.hinted_samples, separated by '|': forms "
        "people often ask a chat assistant for (a tip, an example, a list, bold key terms, "
        "brevity, no preamble); the judge, not this list, decides which the users like")
    time_share: float = setting(0.25, "share of the training time left after the reward model "
                                      "that sampling and judging may take",
                                low=0.0, high=1.0, low_open=True, high_open=True)
    only_if_reached: bool = setting(True, "skip the stage when the tuning's time cannot reach "
                                          "all the users' own pairs in the time sampling "
                                          "leaves it (its steps' cost estimated from the "
                                          "reward model's): synthetic pairs, "
                                          "shuffled among them, would mostly go unseen")
    tuning_step_ratio: float = setting(3.0, "a DPO step's cost in reward-model steps when the "
                                            "step computes its own reference, for "
                                            "only_if_reached until a round in this data folder "
                                            "has measured both that way (then that round's "
                                            "ratio). 3: 2.6-3.6 over 18 rounds of bench/loop.py "
                                            "(a reference pass and the vocabulary's "
                                            "log-probabilities besides)", low=0.0, low_open=True)
    tuning_step_ratio_kept: float = setting(1.8, "the same when the steps read the reference "
                                                 "`training prepare` kept. 1.8: 1.58-2.03 over "
                                                 "5 first rounds of bench/loop.py with LoRA on "
                                                 "the top half of the blocks (tune.lora_layers "
                                                 "0.5, sessions 34-35); on every block (1) it was "
                                                 "2.05-2.34 (session 31)",
                                            low=0.0, low_open=True)

    def __post_init__(self) -> None:
        if self.hinted_samples and not self.hint_list:
            raise ConfigError("synthetic.hinted_samples needs at least one request in "
                              "synthetic.hints (separated by '|')")

    @property
    def hint_list(self) -> list[str]:
        return [h.strip() for h in str(self.hints).split("|") if h.strip()]


@dataclass
class GateConfig:
    min_heldout_votes: int = setting(2, "(a) fewest held-out votes (with both labels) to "
                                        "judge on; scored even when the gate's time is up",
                                     low=2)
    max_heldout_prompts: int = setting(32, "(b) most held-out prompts answered by both models",
                                       low=1)
    min_heldout_prompts: int = setting(8, "(b) prompts answered even when the gate's time "
                                          "is short", low=1)
    confidence: float = setting(0.95, "confidence of every interval: a check calls the candidate "
                                      "better or worse only outside it",
                                low=0.5, high=1.0, high_open=True)
    bootstrap_samples: int = setting(2000, "resamples behind each interval", low=100)
    max_approval_loss: float = setting(0.03, "(b) worse when the judge prefers the current's "
                                             "replies beyond the noise and the interval of "
                                             "the approval it expects (calibrated), candidate "
                                             "minus current, lies below zero and the "
                                             "difference below minus this (0.03: 3 points)",
                                       low=0.0, high=1.0, high_open=True)
    min_retention: float = setting(0.95, "(c) worse when the accuracy difference's interval lies "
                                         "below zero and the difference below -(1 - this) x "
                                         "current accuracy",
                                   low=0.0, high=1.0)
    fluency_significance: float = setting(0.05, "(c) extra empty or looping replies fail the gate "
                                                "when a sign test gives p below this (0: never)",
                                          low=0.0, high=1.0, high_open=True)
    require_improvement: bool = setting(True, "(a) or (b) must call the candidate better (alone, "
                                              "or pooled); false: not worse is enough")
    pooled_confidence: float = setting(0.9, "(a) and (b) pooled: the candidate counts as better "
                                            "when their combined one-sided confidence (Stouffer) "
                                            "reaches this, though neither alone is conclusive; "
                                            "1: off", low=0.5, high=1.0)
    enforce: bool = setting(True, "false: run and report every check, promote whatever they say "
                                  "(experiments only)")
    min_regression_questions: int = setting(40, "(c) regression questions asked even when the "
                                                "gate's time is short", low=1)
    regression_share: float = setting(0.4, "(c) share of the gate's time for the regression "
                                           "questions beyond the fewest", low=0.0, high=1.0)
    reply_max_new_tokens: int = setting(96, "(c) reply length: short answers to known questions",
                                        low=1)
    judged_max_new_tokens: int = setting(256, "(b) reply length: the serving's cap, so the reward "
                                              "model judges whole replies as users get them "
                                              "(what a user wants, a tip or an example, often "
                                              "comes late)", low=1)
    judged_samples: int = setting(1, "(b) replies per prompt from each version: 1, one greedy "
                                     "reply; more, that many sampled at the page's settings "
                                     "(seeded), the judge's mean score per prompt compared: "
                                     "what users get, not the one reply greedy decoding "
                                     "always gives, at that many times the cost a prompt; "
                                     "a judge at chance on its check gets greedy replies",
                                  low=1, high=16)
    repetition_penalty: float = setting(GenerationSettings().repetition_penalty,
                                        "(b) and (c) replies are greedy with this penalty: the "
                                        "page's (1.1), so the fluency check counts the loops "
                                        "users would meet (1: none, a stress test)",
                                        low=1.0, high=2.0)
    seed: int = setting(0, "seed of the resampling and of the order votes are scored in")


@dataclass
class RoundConfig:
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardModelConfig = field(default_factory=RewardModelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    max_minutes: float = setting(60.0, "time budget of the whole round, gate included, from the "
                                       "command's start (its imports too): training stops when "
                                       "only gate_share of it is left",
                                 low=0.0, low_open=True)
    gate_share: float = setting(0.3, "share of the budget kept for the gate (its sample is capped "
                                     "to fit); a candidate that passes is promoted even if the "
                                     "gate overruns",
                                low=0.0, high=1.0, low_open=True, high_open=True)
    reward_share: float = setting(0.3, "share of the training time the reward model may take; "
                                       "preference tuning gets the rest",
                                  low=0.0, high=1.0, low_open=True, high_open=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RoundConfig:
        """Build from (possibly partial) JSON data; raises `ConfigError` naming what is wrong."""
        if not isinstance(data, dict):
            raise ConfigError("the round config must be a JSON object, e.g. "
                              '{"tune": {"learning_rate": 1e-4}}')
        kwargs = {}
        for name, value in data.items():
            if name in SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{name!r} must be an object of fields, e.g. "
                                      f'{{"{name}": {{...}}}}')
                kwargs[name] = SECTIONS[name](**_checked(SECTIONS[name], value, name + "."))
            else:
                kwargs.update(_checked(cls, {name: value}, ""))
        return cls(**kwargs)


# Settings added since rounds were first recorded, with what a round did before each existed.
AS_RAN_BEFORE = {"data": {"heldout_min_votes": 0,  # it held out heldout_fraction
                          "drop_disfluent": False}}  # it trained on every vote and pair


def as_ran(config: dict) -> dict:
    """A round report's recorded config with each setting added since it ran (`AS_RAN_BEFORE`)
    set to what that round did, so a replay splits and keeps its votes as the round did."""
    out = dict(config)
    for section, before in AS_RAN_BEFORE.items():
        out[section] = {**before, **(config.get(section) or {})}
    return out


SECTIONS = {"data": DataConfig, "reward": RewardModelConfig, "tune": TuneConfig,
            "gate": GateConfig, "synthetic": SyntheticConfig}

class ConfigError(ValueError):
    """A round config that names an unknown field or holds a value of the wrong type or range."""


def _checked(klass, values: dict, prefix: str) -> dict:
    known = {f.name: f.type for f in fields(klass)}
    out = {}
    for name, value in values.items():
        dotted = prefix + name
        if name not in known:
            raise ConfigError(f"unknown setting {dotted!r}; known: "
                              + ", ".join(prefix + k for k in known))
        kind = known[name]
        ok = {"bool": isinstance(value, bool), "str": isinstance(value, str),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool)}.get(kind)
        if not ok:
            words = {"bool": "true or false", "str": "text", "int": "a whole number",
                     "float": "a number"}
            raise ConfigError(f"{dotted} must be {words[kind]}, got {value!r}")
        check_value(klass, name, value, prefix=prefix, error=ConfigError)
        out[name] = float(value) if kind == "float" else value
    return out
