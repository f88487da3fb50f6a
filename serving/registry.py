"""Model versions: each a folder under `<data>/versions/NAME/`, and the pointer to the current one.

`VersionDir` owns a version folder's layout (no other module names its files). A version is
built in a hidden staging folder (`Registry.staging`) and appears whole, by one rename, when it
is registered; every backend then loads it directly (merged weights in `model/` for
transformers and vLLM, `model.q8_0.gguf` for llama.cpp): no parent chain at load. `CURRENT`
names the serving version; it moves atomically (write a temp file, fsync, rename), so a reader
sees the old name or the new one, never half. No `CURRENT` means the base model chosen by
`CHAT_MODEL` serves.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from feedback.config import make_folder
from serving.config import EMBEDDED, GGUF_QUANTS, ServingConfig, data_dir, model_setting
from serving.model import LoadedModel, base_name, embedded_gguf_path, load, load_base

log = logging.getLogger(__name__)



class UnknownVersion(LookupError):
    """A version name that is not in the registry (or could never be one)."""


VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str) -> str:
    """`name` if it can name a version folder: letters, digits, `.`, `_`, `-`, no `..`, no
    separators (so no name reaches outside `versions/`); else `UnknownVersion`."""
    if not isinstance(name, str) or not VERSION_NAME.fullmatch(name) or ".." in name:
        raise UnknownVersion(f"{name!r} is not a version name: use letters, digits, '.', '_' "
                             "and '-' only (see `python -m training status` for the versions).")
    return name


@dataclass(frozen=True)
class VersionDir:
    """The layout of one version's folder:

        model/              the merged weights, a transformers checkpoint (float32): what the
                            transformers engine, the next round and vLLM load
        adapter/            the round's LoRA adapter over its parent (small; absent after a
                            full fine-tune): for inspection and vLLM's --lora-modules
        reward/             the round's reward model, a LoRA adapter over the base
        model.<quant>.gguf  the merged weights as llama.cpp serves them (Q8_0 by default)
        config.json         the round's configuration
        meta.json           name, parent (the model it was tuned from), replaces (the version
                            serving then), base, data counts, created_at (written at register)
        metrics.json        the gate's verdict, tuning and reward-model summaries
        trainer/            TRL's scratch output while training, removed before registering
    """

    path: Path

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def reward(self) -> Path:
        return self.path / "reward"

    @property
    def trainer(self) -> Path:
        return self.path / "trainer"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    def gguf(self, quant: str) -> Path:
        return self.path / f"model.{quant.lower()}.gguf"

    def drop_scratch(self) -> None:
        shutil.rmtree(self.trainer, ignore_errors=True)


@dataclass(frozen=True)
class Version:
    name: str
    path: Path
    meta: dict

    @property
    def dir(self) -> VersionDir:
        return VersionDir(self.path)


class Registry:
    """The versions of one data directory and base model, both fixed when it is made."""

    def __init__(self, root: Path | None = None) -> None:
        self.data = data_dir()
        self.root = Path(root or self.data / "versions")
        make_folder(self.root)
        self.setting = model_setting()
        self._tokenizer = None

    @property
    def base_name(self) -> str:
        return base_name(self.setting)

    def versions(self) -> list[Version]:
        out = []
        for meta_file in sorted(self.root.glob("*/meta.json")):
            out.append(Version(meta_file.parent.name, meta_file.parent,
                               json.loads(meta_file.read_text())))
        return sorted(out, key=lambda v: v.meta.get("created_at", ""))

    def get(self, name: str) -> Version:
        meta = self.root / check_name(name) / "meta.json"
        if not meta.is_file():
            known = ", ".join([self.base_name] + [v.name for v in self.versions()])
            raise UnknownVersion(f"No model version {name!r}. Known: {known}.")
        return Version(name, meta.parent, json.loads(meta.read_text()))

    def current_name(self) -> str:
        """The serving version's name (the base model's when nothing was promoted, or when
        `CURRENT` is unusable: `current_problem()` then says why and how to fix it)."""
        return self._current()[0]

    def current_problem(self) -> str | None:
        """Why `CURRENT` was not followed (the base model serves instead), or None."""
        return self._current()[1]

    def _current(self) -> tuple[str, str | None]:
        pointer = self.root / "CURRENT"
        if not pointer.is_file():
            return self.base_name, None
        fix = ("Fix it with `python -m training rollback NAME` (a version from "
               "`python -m training status`).")
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            return self.base_name, f"{pointer} cannot be read ({exc}); the base model serves. {fix}"
        if not name or name == self.base_name:
            return self.base_name, None
        try:
            self.get(name)
        except UnknownVersion:
            return self.base_name, (f"{pointer} names {name[:80]!r}, which is not a version "
                                    f"here; the base model serves. {fix}")
        return name, None

    def register(self, name: str, built: VersionDir, meta: dict) -> Version:
        """Move a finished version folder `built` into the registry under `name`, atomically:
        the folder appears whole (a rename) with its `meta.json`, or not at all."""
        if not built.model.is_dir():
            raise ValueError(f"{built.path} has no merged weights in model/: not registered")
        built.drop_scratch()
        meta = {"name": name, "created_at": datetime.now(timezone.utc).isoformat(), **meta}
        _write_durably(built.meta, json.dumps(meta, indent=2) + "\n")
        target = self.root / name
        assert not target.exists(), f"version {name} exists already"
        os.replace(built.path, target)
        _fsync_dir(self.root)
        return Version(name, target, meta)

    def staging(self, name: str) -> VersionDir:
        """A fresh folder (ignored by readers) to build version `name` in before `register`."""
        path = self.root / f".{check_name(name)}.partial"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return VersionDir(path)

    def drop_staging(self) -> list[str]:
        """Remove staging folders left by killed rounds (call holding the round lock); their
        names."""
        stale = sorted(self.root.glob(".*.partial"))
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return [p.name for p in stale]

    def history(self) -> list[dict]:
        """Every move of `CURRENT`, oldest first: {"at", "from", "to", "why"}."""
        path = self.root / "history.jsonl"
        if not path.is_file():
            return []
        moves = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                moves.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: skipped, the rest still counts
        return [m for m in moves if isinstance(m, dict)]

    def previous(self) -> str | None:
        """The version that was current before the present one (the default rollback)."""
        current = self.current_name()
        for move in reversed(self.history()):
            if not isinstance(move.get("from"), str):
                continue  # a damaged line names nothing to go back to
            if move.get("to") == current and move["from"] != current:
                return move["from"]
        return None

    def set_current(self, name: str, why: str = "") -> None:
        """Point `CURRENT` at `name` atomically and durably, and log the move."""
        check_name(name)
        if name != self.base_name:
            self.get(name)
        old = self.current_name()
        tmp = self.root / f".CURRENT.{os.getpid()}.tmp"
        _write_durably(tmp, name + "\n")
        os.replace(tmp, self.root / "CURRENT")
        _fsync_dir(self.root)
        with open(self.root / "history.jsonl", "a") as fh:
            fh.write(json.dumps({"at": datetime.now(timezone.utc).isoformat(), "from": old,
                                 "to": name, "why": why}) + "\n")

    def load(self, name: str | None = None, config: ServingConfig | None = None) -> LoadedModel:
        """Load a version (default: the current one) for serving."""
        name = check_name(name or self.current_name())
        if name == self.base_name:
            return load_base(config, self.setting, self.data)
        version = self.get(name)
        if version.dir.model.is_dir():
            return load(str(version.dir.model), version=name, config=config)
        return self._load_adapter(version, config)  # a version registered before model/ was

    def tokenizer(self):
        """The tokenizer every version shares (the base model's), without loading weights;
        read once per registry (every engine opened or swapped here needs it)."""
        if self._tokenizer is None:
            self._tokenizer = self._read_tokenizer()
        return self._tokenizer

    def _read_tokenizer(self):
        from transformers import AutoTokenizer

        if self.setting == EMBEDDED:
            checkpoint = self.data / "models" / "base" / self.base_name
            if (checkpoint / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(checkpoint)
            gguf = embedded_gguf_path()
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return AutoTokenizer.from_pretrained(self.setting)

    def gguf_path(self, name: str | None = None, quant: str = "Q8_0") -> Path:
        """The GGUF file llama.cpp serves for a version (default: the current one), written
        from its merged weights on first use (raises `NotConvertible` where it cannot be)."""
        name = name or self.current_name()
        if quant not in GGUF_QUANTS:
            raise ValueError(f"gguf_quant must be one of {', '.join(GGUF_QUANTS)}, not {quant!r}")
        if name == self.base_name:
            folder = make_folder(self.data / "models" / "base")
            target = folder / f"{name}.{quant.lower()}.gguf"
        else:
            target = self.get(name).dir.gguf(quant)
        if target.is_file():
            return target
        with FileLock(str(target.with_name(f".{target.name}.lock"))):
            if not target.is_file():
                self.write_gguf(name, target, quant)
        return target

    def write_gguf(self, name: str, target: Path, quant: str) -> Path:
        from serving.gguf_export import export_gguf, requantize

        if name == self.base_name and self.setting == EMBEDDED:
            log.info("re-encoding the shipped model as %s for llama.cpp: %s", quant, target)
            return requantize(embedded_gguf_path(), target, quant)
        loaded = self.load(name, ServingConfig(dtype="float32"))
        log.info("writing %s for llama.cpp", target)
        gguf = embedded_gguf_path()
        return export_gguf(loaded.model, target, name=name, tokenizer_gguf=gguf, quant=quant)

    def _load_adapter(self, version: Version, config: ServingConfig | None) -> LoadedModel:
        """A LoRA version registered before versions held their merged weights: its parent
        (loaded the same way) with the adapter merged in."""
        from peft import PeftModel

        loaded = self.load(version.meta["parent"], config)
        loaded.model = PeftModel.from_pretrained(loaded.model, version.dir.adapter) \
            .merge_and_unload().eval()
        loaded.version = version.name
        return loaded


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
