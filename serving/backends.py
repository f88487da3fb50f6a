"""Which engine serves: llama.cpp by default, transformers where llama.cpp cannot load the model.

`CHAT_BACKEND` (a choice of machine, so an environment setting) is `auto` (llama.cpp when the
version can be written as GGUF, else transformers), `llama.cpp`, `transformers` or `openai` (any
OpenAI-compatible server: `serving/openai_backend.py`). The page,
`python -m serving generate`, the gate's generated replies and the learning-loop bench all open
their engine here, so what the gate judges is what users are served.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from serving.config import ServingConfig
from serving.hardware import BadSetting, threads
from serving.registry import Registry

log = logging.getLogger(__name__)

BACKEND_ENV = "CHAT_BACKEND"
BACKENDS = ("auto", "llama.cpp", "transformers", "openai")


def backend_setting(requested: str | None = None) -> str:
    value = (requested or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    if value not in BACKENDS:
        raise BadSetting(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, not {value!r}.")
    return value


def open_engine(registry: Registry | None = None, name: str | None = None,
                config: ServingConfig | None = None, backend: str | None = None):
    """An engine serving version `name` (default: the current one)."""
    registry = registry or Registry()
    config = config or ServingConfig()
    name = name or registry.current_name()
    kind = backend_setting(backend)
    if kind == "openai":
        from serving.openai_backend import OpenAIEngine
        return OpenAIEngine.from_settings(registry, name, config)
    if kind in ("auto", "llama.cpp"):
        from serving.gguf_export import NotConvertible
        from serving.llamacpp import LlamaEngine
        try:
            return LlamaEngine(load_model("llama.cpp", registry, name, config), config)
        except NotConvertible as exc:
            if kind == "llama.cpp":
                from serving.model import ModelUnavailable
                raise ModelUnavailable(f"llama.cpp cannot serve {name}: {exc}") from exc
            log.warning("serving %s with transformers: %s", name, exc)
    from serving.engine import Engine
    return Engine(registry.load(name, config), config)


def load_model(kind: str, registry: Registry, name: str, config: ServingConfig):
    """What an engine of `kind` needs to serve `name` (handed to `engine.swap_model`)."""
    if kind == "llama.cpp":
        from serving.llamacpp import GGUFModel
        return GGUFModel(registry.gguf_path(name, config.gguf_quant), version=name,
                         tokenizer=registry.tokenizer(), config=config, threads=threads())
    if kind == "openai":
        return name  # the server loads versions by name
    return registry.load(name, config)


def follow_current(engine, registry: Registry | None = None, interval_s: float = 5.0,
                   config: ServingConfig | None = None) -> threading.Thread:
    """Watch `CURRENT` and hand a newly promoted (or rolled back) version to `engine`.

    The model is loaded on this watcher thread; the engine switches once the replies in
    flight have finished, so no reply is cut off and each keeps the version that wrote it.
    """
    registry = registry or Registry()
    config = config or engine.config

    def watch() -> None:
        serving = engine.version
        while not engine.closed:
            time.sleep(interval_s)
            try:
                name = registry.current_name()
                if name != serving:
                    engine.swap_model(load_model(engine.kind, registry, name, config))
                    serving = name
            except Exception:  # a bad version must not stop the watcher; retry next time
                log.exception("could not switch to the current version")

    thread = threading.Thread(target=watch, name="version-watcher", daemon=True)
    thread.start()
    return thread
