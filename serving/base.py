"""What every engine shares: the prompt checks before anything is queued, and waiting for many.

A worker-thread engine (llama.cpp, transformers) calls `_init_worker` and serves `_model` until
`_next` takes over; the base then knows its version and prompt tokenizer. Each engine implements
`submit`, `swap_model`, `describe`, `close` and `kind`; one without a local model (openai)
overrides `version` and `_prompt_target` (see docs/architecture.md, "The engine interface").
"""

from __future__ import annotations

import queue
import threading

from serving.chat import Prompt, build_prompt
from serving.config import GenerationSettings, ServingConfig
from serving.reply import Reply


class EngineBase:
    kind = "engine"
    _closed: threading.Event  # set by `close()`

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def version(self) -> str:
        """The version new replies come from (a worker engine serves `_model` until the
        `_next` one handed over by `swap_model` takes over)."""
        return (self._next or self._model).version

    def _init_worker(self, model, config: ServingConfig | None) -> None:
        """The state every worker-thread engine starts with."""
        self.config = config or ServingConfig()
        self._model, self._next = model, None
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()

    def _prompt_target(self) -> tuple[object, int]:
        """(tokenizer, context window) of the model new replies will come from."""
        model = self._next or self._model
        return model.tokenizer, model.context_window

    def submit(self, messages: list[dict[str, str]],
               settings: GenerationSettings | None = None) -> Reply:
        """Queue a reply to `messages` (user/assistant turns ending with a user turn), written
        with `settings` (its system prompt included)."""
        raise NotImplementedError

    def _prompt(self, messages, settings: GenerationSettings) -> Prompt:
        tokenizer, window = self._prompt_target()
        return build_prompt(tokenizer, messages, context_window=window,
                            max_new_tokens=settings.max_new_tokens,
                            system_prompt=settings.system_prompt or None)

    def check(self, messages: list[dict[str, str]], settings: GenerationSettings) -> None:
        """Raise `PromptTooLong` (or `InvalidSettings`) now if `messages` could not be answered."""
        self._prompt(messages, settings.validate())

    def _start(self, messages, settings: GenerationSettings | None
               ) -> tuple[GenerationSettings, Prompt]:
        """The checked settings and prompt of a reply about to be queued."""
        if self.closed:
            raise RuntimeError("the engine is closed")
        settings = (settings or GenerationSettings()).validate()
        return settings, self._prompt(messages, settings)

    def _cancel_the_rest(self, active: list) -> None:
        """Closed: every reply still queued or running ends "cancelled" (nobody waits forever
        on a reply that will not come)."""
        while True:
            try:
                active.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for row in active:
            if not row.reply.done:
                row.reply._finish("cancelled")

    def generate(self, conversations: list[list[dict[str, str]]],
                 settings: GenerationSettings | None = None) -> list[Reply]:
        """Replies to many conversations, batched by the engine; returns when all are done."""
        replies = [self.submit(c, settings) for c in conversations]
        for r in replies:
            r.wait()
        return replies
