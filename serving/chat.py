"""Turning a conversation into prompt tokens with the model's chat template, trimmed to fit.

The history is trimmed oldest-first, a user/assistant exchange at a time, until the prompt plus
the reply budget fits the context window; the system prompt and the newest user message always
stay. The number of dropped messages is returned so the page can say so.
"""

from __future__ import annotations

from dataclasses import dataclass


class PromptTooLong(ValueError):
    """Even the newest message alone does not fit the context window."""


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]
    trimmed: int  # messages dropped from the start of the history


def split_system(messages: list[dict[str, str]]) -> tuple[str, list[dict[str, str]]]:
    """(system prompt, the turns after it) of a stored prompt (`feedback.store.prompt_for`),
    to hand an engine the turns and put the system prompt in the settings."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return "", list(messages)


def render(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt(tokenizer, messages: list[dict[str, str]], *, context_window: int,
                 max_new_tokens: int, system_prompt: str | None = None) -> Prompt:
    """Prompt tokens for `messages` (roles user/assistant, oldest first), trimmed to fit."""
    assert messages and messages[-1]["role"] == "user", "a prompt ends with a user message"
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    budget = context_window - max_new_tokens
    history = list(messages)
    trimmed = 0
    while True:
        ids = render(tokenizer, system + history)
        if len(ids) <= budget:
            return Prompt(input_ids=ids, trimmed=trimmed)
        if len(history) == 1:
            raise PromptTooLong(
                f"The message is about {len(ids):,} tokens, more than the model's context window "
                f"of {context_window:,} leaves after a {max_new_tokens}-token reply. Shorten it, "
                "or lower max new tokens.")
        # Drop the oldest exchange (a user message and the reply that follows it).
        drop = 2 if len(history) > 2 and history[1]["role"] == "assistant" else 1
        history = history[drop:]
        trimmed += drop
