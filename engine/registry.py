"""The model registry: maps a served model name to where its weights live."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / "configs" / "models.toml"

SourceKind = Literal["gguf-package", "path", "hub", "derived"]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Where one served model comes from.

    `location` is a package name (gguf-package), a filesystem path (path), a hub id (hub), or
    the registry name of the base model (derived, with `transform`: engine/derived.py).
    """

    name: str
    kind: SourceKind
    location: str
    gguf_file: str | None = None
    revision: str | None = None
    transform: str | None = None


def load_registry(path: Path | None = None) -> dict[str, ModelSpec]:
    path = path or DEFAULT_REGISTRY
    if not path.exists():
        return {}
    with path.open("rb") as f:
        data = tomllib.load(f)
    specs = [ModelSpec(**entry) for entry in data.get("model", [])]
    return {s.name: s for s in specs}


def resolve_model(name_or_path: str, registry: Path | None = None) -> ModelSpec:
    """A registry entry by name, else a local path, else a hub id."""
    known = load_registry(registry)
    if name_or_path in known:
        return known[name_or_path]
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSpec(name=name_or_path, kind="path", location=str(p.parent), gguf_file=p.name)
    if p.is_dir():
        return ModelSpec(name=name_or_path, kind="path", location=str(p.resolve()))
    return ModelSpec(name=name_or_path, kind="hub", location=name_or_path)
