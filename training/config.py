"""One typed config per stage of a round, each field with a default and a help text.

The defaults fit 2 CPU cores and 24 GiB; the same code runs under `accelerate launch` on GPUs.
Each round saves the whole `RoundConfig` as `config.json` beside the version it produced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


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
    method: str = _f("auto", "kto (votes), dpo (pairs) or auto: KTO unless pairs outnumber votes")
    full_finetune: bool = _f(False, "train every weight instead of a LoRA adapter")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA scaling")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    learning_rate: float = _f(5e-5, "learning rate (LoRA; use ~5e-6 for full fine-tuning)")
    beta: float = _f(0.1, "KTO/DPO beta: higher stays closer to the current model")
    batch_size: int = _f(8, "rows per step; KTO needs at least 2")
    epochs: float = _f(1.0, "passes over the data")
    max_steps: int = _f(-1, "stop after this many steps (-1: epochs decide)")
    max_length: int = _f(512, "tokens per row (prompt + reply), longer are truncated")
    bf16: bool = _f(True, "bfloat16 autocast (faster on CPU and GPU)")
    gradient_checkpointing: bool = _f(False, "trade compute for memory (off: 135M fits)")
    seed: int = _f(0, "seed for initialisation and sampling")


@dataclass
class GateConfig:
    min_heldout_votes: int = _f(2, "fewest held-out votes (with both labels) to judge (a)")
    min_auc_gain: float = _f(0.0, "(a) candidate's liked-vs-disliked AUC must beat current's "
                                  "by more than this")
    min_reward_win_rate: float = _f(0.5, "(b) share of held-out prompts where the reward model "
                                         "must prefer the candidate's reply (strictly more)")
    max_heldout_prompts: int = _f(32, "(b) held-out prompts answered by both models")
    min_retention: float = _f(0.95, "(c) candidate's regression accuracy / current's")
    max_fluency_failures_increase: int = _f(0, "(c) extra empty or looping replies allowed")
    reply_max_new_tokens: int = _f(96, "reply length for (b) and (c)")


@dataclass
class RoundConfig:
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardModelConfig = field(default_factory=RewardModelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    max_minutes: float = _f(60.0, "time budget; training stops at 70% of it so the gate fits")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RoundConfig:
        parts = {f.name: f.type for f in fields(cls)}
        kwargs = {}
        for name, value in data.items():
            if name in ("data", "reward", "tune", "gate"):
                klass = {"data": DataConfig, "reward": RewardModelConfig, "tune": TuneConfig,
                         "gate": GateConfig}[name]
                kwargs[name] = klass(**value)
            elif name in parts:
                kwargs[name] = value
        return cls(**kwargs)
