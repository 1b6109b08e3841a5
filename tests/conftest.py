"""Shared fixtures: the real default model, and a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from engine.loader import LoadedModel, load_model, materialize
from engine.registry import DEFAULT_MODEL, ModelSpec, resolve_model


@pytest.fixture(scope="session")
def default_folder() -> Path:
    """The default model as a plain HF folder (converted from the bundled GGUF once)."""
    return Path(materialize(resolve_model(DEFAULT_MODEL)))


@pytest.fixture(scope="session")
def smollm_fp32(default_folder) -> LoadedModel:
    return load_model(resolve_model(DEFAULT_MODEL), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm_bf16(default_folder) -> LoadedModel:
    return load_model(resolve_model(DEFAULT_MODEL), dtype="bfloat16", device="cpu")


def build_tiny_llama(folder: Path, tokenizer_src: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama sharing SmolLM2's tokenizer and chat template."""
    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, default_folder) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_folder)


@pytest.fixture(scope="session")
def tiny_fp32(tiny_folder) -> LoadedModel:
    spec = ModelSpec(name="tiny-llama", kind="path", location=str(tiny_folder))
    return load_model(spec, dtype="float32", device="cpu")
