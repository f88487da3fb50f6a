"""What every engine shares: the prompt checks before anything is queued, and waiting for many.

An engine subclasses `EngineBase`, says which tokenizer and context window new replies use
(`_prompt_target`), and implements `submit`, `swap_model`, `describe`, `close`, `version`,
`closed` and `kind` (see docs/architecture.md, "The engine interface").
"""

from __future__ import annotations

import threading

from serving.chat import Prompt, build_prompt
from serving.config import GenerationSettings
from serving.reply import Reply


class EngineBase:
    kind = "engine"
    _closed: threading.Event  # set by `close()`

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _prompt_target(self) -> tuple[object, int]:
        """(tokenizer, context window) of the model new replies will come from."""
        raise NotImplementedError

    def submit(self, messages: list[dict[str, str]], settings: GenerationSettings | None = None,
               *, system_prompt: str | None = None) -> Reply:
        raise NotImplementedError

    def _prompt(self, messages, settings: GenerationSettings, system_prompt) -> Prompt:
        tokenizer, window = self._prompt_target()
        return build_prompt(tokenizer, messages, context_window=window,
                            max_new_tokens=settings.max_new_tokens, system_prompt=system_prompt)

    def check(self, messages: list[dict[str, str]], settings: GenerationSettings, *,
              system_prompt: str | None = None) -> None:
        """Raise `PromptTooLong` (or `InvalidSettings`) now if `messages` could not be answered."""
        self._prompt(messages, settings.validate(), system_prompt)

    def _start(self, messages, settings: GenerationSettings | None,
               system_prompt) -> tuple[GenerationSettings, Prompt]:
        """The checked settings and prompt of a reply about to be queued."""
        if self.closed:
            raise RuntimeError("the engine is closed")
        settings = (settings or GenerationSettings()).validate()
        return settings, self._prompt(messages, settings, system_prompt)

    def generate(self, conversations: list[list[dict[str, str]]],
                 settings: GenerationSettings | None = None, *,
                 system_prompt: str | None = None) -> list[Reply]:
        """Replies to many conversations, batched by the engine; returns when all are done."""
        replies = [self.submit(c, settings, system_prompt=system_prompt) for c in conversations]
        for r in replies:
            r.wait()
        return replies
