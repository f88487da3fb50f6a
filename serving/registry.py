"""Model versions: each a folder under `<data>/versions/NAME/`, and the pointer to the current one.

A version folder holds its weights (a full checkpoint in `model/`, or a LoRA adapter in
`adapter/` over its base), the configs that produced it and `meta.json` (parent, data counts,
metrics). `CURRENT` names the serving version; it moves atomically (write a temp file, fsync,
rename), so a reader sees the old name or the new one, never half. No `CURRENT` means the base
model chosen by `CHAT_MODEL` serves.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from serving.config import ServingConfig, data_dir
from serving.model import LoadedModel, load, load_base, resolve_base


class UnknownVersion(LookupError):
    """A version name that is not in the registry."""


@dataclass(frozen=True)
class Version:
    name: str
    path: Path
    meta: dict


class Registry:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or data_dir() / "versions")
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def base_name(self) -> str:
        return resolve_base()[0]

    def versions(self) -> list[Version]:
        out = []
        for meta_file in sorted(self.root.glob("*/meta.json")):
            out.append(Version(meta_file.parent.name, meta_file.parent,
                               json.loads(meta_file.read_text())))
        return sorted(out, key=lambda v: v.meta.get("created_at", ""))

    def get(self, name: str) -> Version:
        meta = self.root / name / "meta.json"
        if not meta.is_file():
            known = ", ".join([self.base_name] + [v.name for v in self.versions()])
            raise UnknownVersion(f"No model version {name!r}. Known: {known}.")
        return Version(name, meta.parent, json.loads(meta.read_text()))

    def current_name(self) -> str:
        """The serving version's name (the base model's when nothing was promoted)."""
        pointer = self.root / "CURRENT"
        name = pointer.read_text().strip() if pointer.is_file() else ""
        return name or self.base_name

    def set_current(self, name: str) -> None:
        """Point `CURRENT` at `name` atomically and durably."""
        if name != self.base_name:
            self.get(name)
        tmp = self.root / f".CURRENT.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / "CURRENT")
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self, name: str | None = None, config: ServingConfig | None = None) -> LoadedModel:
        """Load a version (default: the current one) for serving."""
        name = name or self.current_name()
        if name == self.base_name:
            return load_base(config)
        version = self.get(name)
        if (version.path / "model").is_dir():
            return load(str(version.path / "model"), version=name, config=config)
        return _load_adapter(version, config)


def _load_adapter(version: Version, config: ServingConfig | None) -> LoadedModel:
    """A LoRA version: its base model with the adapter merged in for fast inference."""
    from peft import PeftModel

    base_version, base_source = resolve_base()
    loaded = load(version.meta.get("base_source", base_source), version=version.name,
                  config=config)
    loaded.model = PeftModel.from_pretrained(loaded.model, version.path / "adapter") \
        .merge_and_unload().eval()
    return loaded
