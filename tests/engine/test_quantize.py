"""Weight-only quantization (engine/quantize.py): the GGUF's own 4-bit blocks load exactly, the
packed kernels compute what the dequantized weights do, a quantized model has its own KV
namespace, and the engine's batched path equals the quantized model's own generate()."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine.engine import Engine, EngineConfig
from engine.gguf_q4 import GROUP, read_q4_1
from engine.loader import gguf_source, load_model
from engine.quant_linear import Int4Linear, Int8Linear
from engine.quantize import weight_bytes
from engine.registry import DEFAULT_MODEL, resolve_model
from tests.engine.helpers import close_by_top5, greedy, hf_greedy, make_request, run, run_one


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, default_folder):
    return load_model(resolve_model(DEFAULT_MODEL), dtype="float32", device="cpu",
                      quantization=request.param)


def test_gguf_q4_1_blocks_are_the_weights_transformers_dequantizes(default_folder):
    """Read as 4-bit blocks and unpermuted, every projection equals the fp32 conversion."""
    spec = resolve_model(DEFAULT_MODEL)
    state = load_file(str(default_folder / "model.safetensors"))
    blocks = read_q4_1(gguf_source(spec), 9, 3)  # SmolLM2-135M: 9 query heads, 3 kv heads
    assert len(blocks) == 30 * 7
    for name, (q, d, m) in blocks.items():
        assert q.max() <= 15
        w = q.float() * d.repeat_interleave(GROUP, 1) + m.repeat_interleave(GROUP, 1)
        assert torch.equal(w, state[name].float()), name


def test_packed_kernels_compute_the_dequantized_product():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    x = torch.randn(5, 64)
    for layer in (Int8Linear.from_weight(w), Int4Linear.from_weight(w)):
        # The kernels run in bf16 (engine/quant_linear.py): inputs and outputs are rounded.
        want = x.bfloat16().float() @ layer.dequantized().t()
        got = layer(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=0.1)  # |y| ~ 8
        assert layer(x.reshape(5, 1, 64)).shape == (5, 1, 96)
    # The quantization error is bounded by half a step, plus bf16's rounding of the scale and
    # zero (|w| < 4 here: 2^-8 relative, ~0.016).
    q4 = Int4Linear.from_weight(w)
    step = (w.reshape(96, 2, GROUP).amax(-1) - w.reshape(96, 2, GROUP).amin(-1)) / 15
    err = (q4.dequantized() - w).abs().reshape(96, 2, GROUP).amax(-1)
    assert bool((err <= step / 2 + 0.02).all())


def test_quantization_has_its_own_fingerprint_and_fewer_bytes(quantized, smollm_fp32):
    assert quantized.fingerprint != smollm_fp32.fingerprint
    assert weight_bytes(quantized.model) < weight_bytes(smollm_fp32.model) / 2


def test_engine_equals_the_quantized_models_own_generate(quantized, prompt_ids):
    """Alone, the engine decodes exactly what generate() does on the same weights. Batched
    with late joins, within vLLM's top-5 rule: the kernels round activations to bf16, which
    turns the last-bit differences batching makes elsewhere (fp32 attention over other rows'
    shapes) into different roundings, as in a bf16 model (tests/engine/test_parity.py)."""
    engine = Engine(quantized, EngineConfig(max_slots=4))
    refs = [hf_greedy(quantized, ids, 24) for ids in prompt_ids[:4]]
    for ids, (want, _, _) in zip(prompt_ids, refs, strict=False):
        assert run_one(engine, ids, greedy(24)).tokens == want
    reqs = [make_request(str(i), ids, greedy(24, logprobs=5))
            for i, ids in enumerate(prompt_ids[:4])]
    out = run(engine, reqs[:3], joins={3: reqs[3:]})
    for i, (want, _, lps) in enumerate(refs):
        close_by_top5(out[str(i)].events, want, lps)


def test_quantized_text_stays_close_to_full_precision(quantized, smollm_fp32, prompt_ids):
    """Greedy agreement with fp32 over the first 16 tokens (the full figure, 50 prompts x 64
    tokens, is in docs/BENCHMARKS.md)."""
    agree = total = 0
    for ids in prompt_ids:
        ref, _, _ = hf_greedy(smollm_fp32, ids, 16)
        got, _, _ = hf_greedy(quantized, ids, 16)
        n = min(len(ref), len(got))
        first_diff = next((i for i in range(n) if ref[i] != got[i]), n)
        agree += first_diff
        total += n
    assert agree / total >= 0.5
