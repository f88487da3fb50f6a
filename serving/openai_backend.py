"""Scale-out: replies from any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama).

    CHAT_BACKEND=openai CHAT_OPENAI_BASE_URL=http://gpu-box:8000/v1 streamlit run ...

`CHAT_OPENAI_BASE_URL` (a place, so an environment setting) is the server's `/v1` address;
`CHAT_OPENAI_MODEL` the model name to ask for (default: the version's own name, which is how
vLLM serves each promoted version: as a LoRA adapter loaded by that name; see the README);
`CHAT_OPENAI_API_KEY` a bearer token if the server wants one. Prompts are trimmed to the context
window with the project's tokenizer (so the page can say what was left out) and sent as chat
messages; the server applies its chat template. Each reply streams over server-sent events on
its own thread, at most `ServingConfig.max_batch` at once; the server batches them.
Sampling settings map to the request: temperature, top_p, max_tokens, seed, and the repetition
penalty under both names servers use (`repetition_penalty`: vLLM; `repeat_penalty`: llama.cpp).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request

from serving.base import EngineBase
from serving.config import GenerationSettings, ServingConfig
from serving.model import ModelUnavailable
from serving.reply import Reply

log = logging.getLogger(__name__)

BASE_URL_ENV = "CHAT_OPENAI_BASE_URL"
MODEL_ENV = "CHAT_OPENAI_MODEL"
API_KEY_ENV = "CHAT_OPENAI_API_KEY"
CONTEXT_WINDOW = 8192  # what the project trims to; the server's own window may be smaller


class OpenAIEngine(EngineBase):
    """Replies from an OpenAI-compatible server; the same interface as the local engines."""

    kind = "openai"

    def __init__(self, base_url: str, model: str, *, tokenizer, version: str,
                 config: ServingConfig | None = None, api_key: str | None = None,
                 context_window: int = CONTEXT_WINDOW) -> None:
        self.config = config or ServingConfig()
        self.base_url = base_url.rstrip("/")
        self.model, self._version = model, version
        self.tokenizer, self.api_key = tokenizer, api_key
        self.context_window = min(context_window, self.config.max_context_tokens)
        self._slots = threading.Semaphore(self.config.max_batch)
        self._closed = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, registry, name: str, config: ServingConfig) -> OpenAIEngine:
        base_url = os.environ.get(BASE_URL_ENV)
        if not base_url:
            raise ModelUnavailable(f"CHAT_BACKEND=openai needs {BASE_URL_ENV}, the server's "
                                   "/v1 address (e.g. http://localhost:8000/v1).")
        model = os.environ.get(MODEL_ENV) or name
        return cls(base_url, model, tokenizer=registry.tokenizer(), version=name,
                   config=config, api_key=os.environ.get(API_KEY_ENV))

    @property
    def version(self) -> str:
        return self._version

    def describe(self) -> str:
        return f"OpenAI-compatible server {self.base_url}, model {self.model}"

    def swap_model(self, name: str) -> None:
        """Ask for version `name` from now on (the server must have it loaded by that name,
        as vLLM does with a LoRA adapter per version), unless a fixed model name is set."""
        self._version = name
        if not os.environ.get(MODEL_ENV):
            self.model = name

    def _prompt_target(self):
        return self.tokenizer, self.context_window

    def submit(self, messages, settings: GenerationSettings | None = None) -> Reply:
        settings, prompt = self._start(messages, settings)
        kept = messages[prompt.trimmed:]
        body = {"model": self.model, "stream": True, "max_tokens": settings.max_new_tokens,
                "temperature": settings.temperature, "top_p": settings.top_p,
                "messages": ([{"role": "system", "content": settings.system_prompt}]
                             if settings.system_prompt else []) + list(kept)}
        if settings.seed is not None:
            body["seed"] = settings.seed
        if settings.repetition_penalty != 1.0:
            body["repetition_penalty"] = body["repeat_penalty"] = settings.repetition_penalty
        reply = Reply(settings, prompt.trimmed)
        reply.version = self._version
        thread = threading.Thread(target=self._run, args=(reply, body), daemon=True,
                                  name="openai-reply")
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return reply

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=10)

    def _run(self, reply: Reply, body: dict) -> None:
        text, reason = "", None
        try:
            with self._slots:
                if reply.cancelled or self._closed.is_set():
                    reply._finish("cancelled")
                    return
                request = urllib.request.Request(
                    self.base_url + "/chat/completions", data=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json",
                             **({"Authorization": f"Bearer {self.api_key}"}
                                if self.api_key else {})})
                with urllib.request.urlopen(request, timeout=300) as response:
                    for raw in response:
                        if reply.cancelled or self._closed.is_set():
                            reason = "cancelled"
                            break
                        line = raw.decode("utf-8", "replace").strip()
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        choice = (json.loads(data).get("choices") or [{}])[0]
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            text += piece
                            reply.n_tokens += 1  # one streamed piece is about one token
                            reply._set_text(text)
                        reason = choice.get("finish_reason") or reason
            reply._finish("length" if reason == "length" else
                          "cancelled" if reason == "cancelled" else "stop")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            detail = exc.read().decode("utf-8", "replace")[:300] \
                if isinstance(exc, urllib.error.HTTPError) else str(exc)
            log.warning("the OpenAI-compatible server failed: %s", detail)
            reply._finish("error", f"the model server at {self.base_url} failed: {detail}")
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
