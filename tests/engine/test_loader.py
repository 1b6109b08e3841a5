from pathlib import Path

import torch

from engine.device import resolve_dtype
from engine.loader import fingerprint, load_model
from engine.registry import DEFAULT_MODEL, ModelSpec, load_registry, resolve_model


def test_registry_has_default_model():
    spec = load_registry()[DEFAULT_MODEL]
    assert spec.kind == "gguf-package" and spec.gguf_file.endswith(".gguf")


def test_resolve_falls_back_to_path_then_hub(tmp_path):
    assert resolve_model(str(tmp_path)).kind == "path"
    (tmp_path / "m.gguf").write_bytes(b"")
    gguf = resolve_model(str(tmp_path / "m.gguf"))
    assert (gguf.kind, gguf.gguf_file) == ("path", "m.gguf")
    assert resolve_model("someone/unlisted-model").kind == "hub"


def test_default_model_converted_lossless(default_folder: Path, smollm_fp32):
    assert (default_folder / "model.safetensors").exists()
    cfg = smollm_fp32.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (30, 3, 64)
    assert smollm_fp32.tokenizer.eos_token == "<|im_end|>"
    assert smollm_fp32.model.dtype == torch.float32
    # The cache stores fp32 exactly: Q4_1 dequantized values survive untouched.
    w = smollm_fp32.model.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.float32 and torch.isfinite(w).all()


def test_dtype_cast_at_load(smollm_bf16, smollm_fp32):
    assert smollm_bf16.model.dtype == torch.bfloat16
    assert smollm_bf16.fingerprint != smollm_fp32.fingerprint


def test_fingerprint_tracks_weights(tiny_folder, tiny_fp32):
    again = load_model(ModelSpec("tiny-llama", "path", str(tiny_folder)), dtype="float32")
    assert again.fingerprint == tiny_fp32.fingerprint
    with torch.no_grad():
        again.model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    assert fingerprint(again.model, torch.float32) != tiny_fp32.fingerprint


def test_auto_dtype_on_cpu_is_a_real_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)


def test_derived_model_rounds_projections_only(default_folder: Path, smollm_fp32, tmp_path):
    """The registry's second model: the default one with int8-rounded projections, built
    offline. A different fingerprint (its own KV), the same tokenizer and embeddings."""
    from safetensors.torch import load_file

    from engine.derived import derive

    spec = load_registry()["SmolLM2-135M-Instruct-int8r"]
    assert (spec.kind, spec.location, spec.transform) == ("derived", DEFAULT_MODEL,
                                                          "int8-rounded")
    folder = derive(spec.name, spec.transform, default_folder, tmp_path)
    assert derive(spec.name, spec.transform, default_folder, tmp_path) == folder  # built once
    base = {k: v for f in default_folder.glob("*.safetensors") for k, v in load_file(f).items()}
    new = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    assert base.keys() == new.keys()
    for name, w in base.items():
        if "_proj." in name:
            step = w.abs().amax(dim=1, keepdim=True) / 127  # [out, 1]: one int8 step per row
            assert not torch.equal(new[name], w), name
            assert ((new[name] - w).abs() <= step / 2 + 1e-6).all(), name
        else:
            assert torch.equal(new[name], w), name
    derived = load_model(ModelSpec(spec.name, "path", str(folder)), dtype="float32", device="cpu")
    assert derived.fingerprint != smollm_fp32.fingerprint
