"""fp32 Linear layers with a transposed copy for batched decode steps (engine/batched_linear.py)."""

from __future__ import annotations

import threading

import torch
from torch import nn

from engine.batched_linear import batch_scope, transpose_linears
from engine.engine import Engine, EngineConfig
from engine.forward import Forward, generate_twin
from engine.step_plan import Chunk
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
    assert torch.equal(layer(x[0]), nn.functional.linear(x[0], layer.weight, layer.bias))
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
        two = x[:2]  # below BATCHED_ROWS: F.linear even inside the scope
        assert torch.equal(layer(two), nn.functional.linear(two, layer.weight, layer.bias))
    assert torch.allclose(seen[0], x @ layer.weight.t() + layer.bias)  # the other thread


def test_generate_s_own_forwards_are_its_twins_and_nothing_else():
    whole, later = Chunk([1], 0, [5, 6, 7]), Chunk([1], 3, [8, 9])
    assert generate_twin([4], []) and generate_twin([], [whole])
    assert not generate_twin([4, 5], [])  # several sequences
    assert not generate_twin([], [later])  # a prompt's continuation over its cached prefix
    assert not generate_twin([4], [whole]) and not generate_twin([], [whole, whole])


def test_every_other_forward_runs_in_the_scope_and_keeps_generate_s_tokens(
        smollm_fp32, prompt_ids, hf_refs_fp32, monkeypatch):
    scope = batch_scope(smollm_fp32.model)
    assert scope is not None  # the loader transposed the fp32 model's layers
    twins, active = [], []
    step, run_ = Forward.step, Forward._run

    def spy_step(self, decode_ids, positions, tables, chunks, *args, **kwargs):
        twins.append(generate_twin(decode_ids, chunks))
        return step(self, decode_ids, positions, tables, chunks, *args, **kwargs)

    def spy_run(self, *args):
        active.append(scope.active)
        return run_(self, *args)

    monkeypatch.setattr(Forward, "step", spy_step)
    monkeypatch.setattr(Forward, "_run", spy_run)
    engine = Engine(smollm_fp32, EngineConfig(max_slots=8, prefill_chunk=24))
    reqs = [make_request(str(i), ids, greedy(16)) for i, ids in enumerate(prompt_ids[:5])]
    out = run(engine, reqs)
    alone = run(Engine(smollm_fp32, EngineConfig()), [make_request("a", prompt_ids[0], greedy(4))])
    assert active == [not t for t in twins] and any(active) and not all(active)
    assert alone["a"].tokens == hf_refs_fp32[0][0][:4]
    assert not scope.active  # left on the way out
    for i, (ref, _, _) in enumerate(hf_refs_fp32[:5]):
        assert out[str(i)].tokens == ref[:16], f"prompt {i}"
