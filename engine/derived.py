"""Models derived offline from another one: a registry entry of kind "derived" names its base
(`location`) and a `transform`, and gets a folder of its own under the model cache.

This exists because a host with no model hub still needs a second, different model: to serve
two models at once, to run a cascade, and to show that KV is never shared across weights that
differ. The one transform is "int8-rounded": every projection weight (q/k/v/o, gate/up/down)
rounded to symmetric int8 with one scale per output row, then stored back in the base's dtype.
Embeddings and norms are kept. The result is a real, different model (its own fingerprint, so
its own KV namespace) whose text stays close to the base's.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _round_int8(name: str, w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2 or not name.endswith(".weight") or not any(p in name for p in PROJECTIONS):
        return w
    x = w.float()  # [out, in]
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # [out, 1]
    return ((x / scale).round().clamp(-127, 127) * scale).to(w.dtype)


TRANSFORMS: dict[str, Callable[[str, torch.Tensor], torch.Tensor]] = {
    "int8-rounded": _round_int8,
}


def derive(name: str, transform: str, base: Path, cache_dir: Path) -> Path:
    """The derived model's folder (built once, atomically; concurrent workers wait)."""
    if transform not in TRANSFORMS:
        raise ValueError(f"model {name!r}: unknown transform {transform!r} "
                         f"(known: {', '.join(TRANSFORMS)})")
    fn = TRANSFORMS[transform]
    return build_once(cache_dir / f"{base.name}--{transform}", lambda d: _build(fn, base, d))


def build_once(dest: Path, build: Callable[[Path], None]) -> Path:
    """`dest`, a model folder, built by `build(dest)` unless it holds a config.json already.
    Several workers may start at once: one builds, the others wait on the lock."""
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (dest.parent / f".{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "config.json").exists():
            build(dest)
    return dest


def _build(fn: Callable[[str, torch.Tensor], torch.Tensor], base: Path, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".derive-", dir=dest.parent))
    try:
        for src in base.iterdir():
            if src.suffix == ".safetensors":
                tensors = {k: fn(k, t) for k, t in load_file(src).items()}
                save_file(tensors, tmp / src.name, metadata={"format": "pt"})
            elif src.is_file():
                shutil.copy2(src, tmp / src.name)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
