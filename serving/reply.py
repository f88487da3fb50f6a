"""A reply being generated: its text so far, how it ended, and a way to stop it.

Every engine (llama.cpp, transformers, an OpenAI-compatible server) hands out `Reply` objects.
A `Reply` keeps the whole text so far: a page interrupted by a rerun opens `stream()` again
and gets everything from the start, then the rest as it comes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from serving.config import GenerationSettings

log = logging.getLogger(__name__)


class Reply:
    """One reply being generated: its text so far, how it ended, and a way to stop it."""

    def __init__(self, settings: GenerationSettings, trimmed: int) -> None:
        self.settings = settings
        self.trimmed = trimmed
        self.version: str | None = None
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
        self.error: str | None = None
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.n_tokens = 0
        self._text = ""
        self._cond = threading.Condition()
        self._cancel = threading.Event()
        self._callbacks: list[Callable[[Reply], None]] = []

    @property
    def text(self) -> str:
        return self._text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating; the text so far is kept and `finish_reason` becomes "cancelled"."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def add_done_callback(self, fn: Callable[[Reply], None]) -> None:
        """Call `fn(reply)` once finished (on the worker thread; at once if already done)."""
        with self._cond:
            if not self.done:
                self._callbacks.append(fn)
                return
        fn(self)

    def stream(self, poll_s: float = 0.5) -> Iterator[str]:
        """The text from its start: what exists now, then each new piece until done."""
        sent = 0
        while True:
            with self._cond:
                while len(self._text) <= sent and not self.done:
                    self._cond.wait(poll_s)
                text, done = self._text, self.done
            if text.startswith(self._text[:sent]) and len(text) > sent:
                yield text[sent:]
                sent = len(text)
            if done and sent >= len(self._text):
                return

    def wait(self, timeout: float | None = None) -> str:
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError("the reply is still being generated")
        return self._text

    # -- worker side --
    def _set_text(self, text: str) -> None:
        with self._cond:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self._text = text
            self._cond.notify_all()

    def _finish(self, reason: str, error: str | None = None) -> None:
        with self._cond:
            self.finish_reason, self.error = reason, error
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a callback's fault must not kill the worker
                log.exception("reply callback failed")
