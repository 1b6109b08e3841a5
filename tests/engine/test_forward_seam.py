"""The seam to transformers: the cache kwarg's name, the once-per-layer update check, warnings."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from engine.engine import Engine, EngineConfig
from engine.forward import Forward, cache_kwarg
from engine.kv_layout import KVLayout
from engine.page_pool import PagePool
from engine.step_plan import Chunk
from tests.engine.helpers import greedy, run_one


def _forward(model, loaded) -> Forward:
    layout = KVLayout.from_config(loaded.config, 16, loaded.dtype)
    return Forward(model, PagePool(layout, 8, 16, loaded.device), max_len=64)


class _DropsCache(torch.nn.Module):
    """Names both cache kwargs, then calls the real model without: it builds its own cache."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, cache=None, past_key_values=None, **kwargs):
        return self.inner(**kwargs)


class _OldName(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, **kwargs): ...


class _NewName(torch.nn.Module):
    def forward(self, input_ids, cache=None, past_key_values=None, **kwargs): ...


class _Neither(torch.nn.Module):
    def forward(self, input_ids, **kwargs): ...


def test_bypassed_cache_raises(smollm_fp32):
    fwd = _forward(_DropsCache(smollm_fp32.model), smollm_fp32)
    layers = smollm_fp32.config.num_hidden_layers
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=rf"_DropsCache.*0 times, expected {layers}"):
            fwd.step([], [], [], [Chunk([1], 0, [1, 2, 3], keep=1)])
        with pytest.raises(RuntimeError, match="bypassed"):
            fwd.step([4], [3], [[1]], [])


def test_cache_kwarg_follows_signature(smollm_fp32):
    assert cache_kwarg(_OldName()) == "past_key_values"
    assert cache_kwarg(_NewName()) == "cache"  # the new name wins when both are named
    with pytest.raises(TypeError, match="_Neither"):
        _forward(_Neither(), smollm_fp32)
    real = _forward(smollm_fp32.model, smollm_fp32).cache_kwarg
    assert real in inspect.signature(smollm_fp32.model.forward).parameters


def test_engine_forward_emits_no_future_warning(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(run_one(engine, prompt_ids[1], greedy(3)).tokens) == 3  # prefill + decodes
    bad = [w for w in caught if w.category is FutureWarning or "transformers" in w.filename]
    assert not bad, [str(w.message) for w in bad]
