"""One typed config per stage of a round, each field with a default and a help text.

The defaults fit 2 CPU cores and 24 GiB; the same code runs under `accelerate launch` on GPUs.
Each round saves the whole `RoundConfig` as `config.json` beside the version it produced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


def machine_bf16() -> bool:
    from serving.hardware import resolve_dtype
    return resolve_dtype() == "bfloat16"


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    heldout_fraction: float = _f(0.2, "share of conversations held out for the gate")
    split_salt: str = _f("heldout-v1", "salt of the split hash; changing it reshuffles the split")
    min_votes: int = _f(8, "fewest usable votes for a round")
    min_per_label: int = _f(2, "fewest liked and fewest disliked replies for a round")
    max_pairs_per_prompt: int = _f(4, "cap on liked x disliked pairs made from one prompt")


@dataclass
class RewardModelConfig:
    learning_rate: float = _f(1e-4, "LoRA learning rate of the reward model")
    epochs: float = _f(1.0, "passes over the pairs")
    batch_size: int = _f(4, "pairs per step")
    max_length: int = _f(512, "tokens per sequence (longer are truncated)")
    lora_r: int = _f(16, "LoRA rank")
    max_steps: int = _f(-1, "stop after this many steps (-1: epochs decide)")


@dataclass
class TuneConfig:
    method: str = _f("auto", "kto (votes), dpo (pairs) or auto: DPO when the feedback gives at "
                             "least min_dpo_pairs pairs, KTO otherwise")
    min_dpo_pairs: int = _f(32, "fewest training pairs for auto to choose DPO")
    full_finetune: bool = _f(False, "train every weight instead of a LoRA adapter")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA scaling")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    learning_rate: float = _f(5e-4, "learning rate (LoRA; use ~5e-6 for full fine-tuning)")
    beta: float = _f(0.1, "KTO/DPO beta: higher stays closer to the current model")
    sft_weight: float = _f(1.0, "DPO: weight of an added language-modelling loss on the "
                                "chosen replies (RPO), which keeps the model fluent; 0: off")
    batch_size: int = _f(4, "rows (KTO) or pairs (DPO) per step; KTO takes at least 2")
    epochs: float = _f(1.0, "passes over the data")
    max_steps: int = _f(-1, "stop after this many steps (-1: epochs decide)")
    max_length: int = _f(512, "tokens per row (prompt + reply), longer are truncated")
    bf16: bool = field(default_factory=machine_bf16, metadata={
        "help": "bfloat16 autocast; default: on where the hardware has native bfloat16 "
                "(CHAT_DTYPE overrides), off where it would be emulated (several times slower)"})
    gradient_checkpointing: bool = _f(False, "trade compute for memory (off: 135M fits)")
    seed: int = _f(0, "seed for initialisation and sampling")


@dataclass
class GateConfig:
    min_heldout_votes: int = _f(2, "(a) fewest held-out votes (with both labels) to judge on; "
                                   "scored even when the gate's time is up")
    max_heldout_prompts: int = _f(32, "(b) most held-out prompts answered by both models")
    min_heldout_prompts: int = _f(8, "(b) prompts answered even when the gate's time is short")
    confidence: float = _f(0.95, "confidence of every interval: a check calls the candidate "
                                 "better or worse only outside it")
    bootstrap_samples: int = _f(2000, "resamples behind each interval")
    min_reward_win_rate: float = _f(0.5, "(b) the win rate of no preference: better when the "
                                         "interval lies above it, worse when below")
    min_retention: float = _f(0.95, "(c) worse when the interval of the accuracy difference "
                                    "lies wholly below -(1 - this) x current accuracy")
    fluency_significance: float = _f(0.05, "(c) extra empty or looping replies fail the gate "
                                           "when a sign test gives p below this (0: never)")
    require_improvement: bool = _f(True, "(a) or (b) must call the candidate better; false: "
                                         "not worse is enough")
    enforce: bool = _f(True, "false: run and report every check, promote whatever they say "
                             "(experiments only)")
    reply_max_new_tokens: int = _f(96, "reply length for (b) and (c)")
    seed: int = _f(0, "seed of the resampling and of the order votes are scored in")


@dataclass
class RoundConfig:
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardModelConfig = field(default_factory=RewardModelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    max_minutes: float = _f(60.0, "time budget of the whole round, gate included: training "
                                  "stops when only gate_share of it is left")
    gate_share: float = _f(0.3, "share of the budget kept for the gate (its sample is capped "
                                "to fit); a candidate that passes is promoted even if the "
                                "gate overruns")
    reward_share: float = _f(0.3, "share of the training time the reward model may take; "
                                  "preference tuning gets the rest")

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


SECTIONS = {"data": DataConfig, "reward": RewardModelConfig, "tune": TuneConfig,
            "gate": GateConfig}

# Allowed values, by dotted field name: (test, what the message says is allowed).
LIMITS = {
    "data.heldout_fraction": (lambda v: 0 < v < 1, "between 0 and 1"),
    "data.min_votes": (lambda v: v >= 2, "at least 2"),
    "data.min_per_label": (lambda v: v >= 1, "at least 1"),
    "data.max_pairs_per_prompt": (lambda v: v >= 1, "at least 1"),
    "reward.learning_rate": (lambda v: 0 < v < 1, "between 0 and 1"),
    "reward.epochs": (lambda v: v > 0, "above 0"),
    "reward.batch_size": (lambda v: v >= 1, "at least 1"),
    "reward.max_length": (lambda v: v >= 16, "at least 16"),
    "reward.lora_r": (lambda v: v >= 1, "at least 1"),
    "reward.max_steps": (lambda v: v == -1 or v >= 1, "-1 or at least 1"),
    "tune.method": (lambda v: v in ("auto", "kto", "dpo"), "auto, kto or dpo"),
    "tune.min_dpo_pairs": (lambda v: v >= 1, "at least 1"),
    "tune.lora_r": (lambda v: v >= 1, "at least 1"),
    "tune.lora_alpha": (lambda v: v >= 1, "at least 1"),
    "tune.lora_dropout": (lambda v: 0 <= v < 1, "from 0 up to (not including) 1"),
    "tune.learning_rate": (lambda v: 0 < v < 1, "between 0 and 1"),
    "tune.beta": (lambda v: v > 0, "above 0"),
    "tune.sft_weight": (lambda v: v >= 0, "0 or more"),
    "tune.batch_size": (lambda v: v >= 1, "at least 1 (KTO always takes at least 2)"),
    "tune.epochs": (lambda v: v > 0, "above 0"),
    "tune.max_steps": (lambda v: v == -1 or v >= 1, "-1 or at least 1"),
    "tune.max_length": (lambda v: v >= 16, "at least 16"),
    "gate.min_heldout_votes": (lambda v: v >= 2, "at least 2"),
    "gate.max_heldout_prompts": (lambda v: v >= 1, "at least 1"),
    "gate.min_heldout_prompts": (lambda v: v >= 1, "at least 1"),
    "gate.confidence": (lambda v: 0.5 <= v < 1, "from 0.5 up to (not including) 1"),
    "gate.bootstrap_samples": (lambda v: v >= 100, "at least 100"),
    "gate.min_reward_win_rate": (lambda v: 0 < v < 1, "between 0 and 1"),
    "gate.min_retention": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "gate.fluency_significance": (lambda v: 0 <= v < 1, "from 0 up to (not including) 1"),
    "gate.reply_max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "max_minutes": (lambda v: v > 0, "above 0"),
    "reward_share": (lambda v: 0 < v < 1, "between 0 and 1"),
    "gate_share": (lambda v: 0 < v < 1, "between 0 and 1"),
}


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
            raise ConfigError(f"{dotted} must be a {kind}, got {value!r}")
        test, allowed = LIMITS.get(dotted, (lambda v: True, ""))
        if not test(value):
            raise ConfigError(f"{dotted} must be {allowed}, got {value!r}")
        out[name] = float(value) if kind == "float" else value
    return out
