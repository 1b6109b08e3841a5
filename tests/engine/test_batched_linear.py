"""fp32 Linear layers with a transposed copy for batched decode steps (engine/batched_linear.py)."""

from __future__ import annotations

import threading

import torch
from torch import nn

from engine.batched_linear import BATCHED_ROWS, batch_scope, transpose_linears
from engine.engine import Engine, EngineConfig
from engine.forward import Forward
from tests.engine.helpers import greedy, make_request, run


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32, bias=False))


def test_outside_a_batched_step_the_layers_compute_f_linear_bit_for_bit():
    model, ref = _model(), _model()
    assert transpose_linears(model) == 2
    x = torch.randn(3, 7, 64)
    assert torch.equal(model(x), ref(x))
    with batch_scope(model).batched():
        got = model(x)
    assert got.shape == (3, 7, 32) and torch.allclose(got, ref(x), atol=1e-5)
    layer = model[0]
    assert torch.equal(layer(x[0]), x[0] @ layer.weight.t() + layer.bias)  # plain again
    assert set(model.state_dict()) == set(ref.state_dict())  # the copy is not saved


def test_the_scope_is_per_thread():
    model = _model()
    transpose_linears(model)
    layer, scope = model[0], batch_scope(model)
    layer.weight_t.zero_()  # inside the scope the layer would now return only its bias
    x, seen = torch.randn(5, 64), []
    with scope.batched():
        thread = threading.Thread(target=lambda: seen.append(layer(x)))
        thread.start()
        thread.join()
        assert torch.equal(layer(x), layer.bias.expand(5, 96))
    assert torch.allclose(seen[0], x @ layer.weight.t() + layer.bias)  # the other thread


def test_only_decode_only_steps_of_batched_rows_enter_the_scope(smollm_fp32, prompt_ids,
                                                              monkeypatch):
    rows_seen = []
    scope = batch_scope(smollm_fp32.model)
    assert scope is not None  # the loader transposed the fp32 model's layers
    original = Forward._run

    def spy(self, plan, ids, pos, keep):
        rows_seen.append((len(ids), scope.active))
        return original(self, plan, ids, pos, keep)

    monkeypatch.setattr(Forward, "_run", spy)
    engine = Engine(smollm_fp32, EngineConfig(max_slots=8))
    run(engine, [make_request(str(i), ids, greedy(4)) for i, ids in enumerate(prompt_ids[:5])])
    decode_only = [(n, on) for n, on in rows_seen if n <= len(prompt_ids)]
    assert (5, True) in decode_only  # five rows decoding together
    assert all(on == (n in BATCHED_ROWS) for n, on in decode_only)
    assert not any(on for n, on in rows_seen if n > 8)  # the prefill forward
