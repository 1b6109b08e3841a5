"""Packed bf16 Linear weights: the same bits as the plain model, on CPUs with native bf16."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.device import cpu_has_fast_bf16
from engine.packed_linear import PackedLinear, can_pack, pack_linears


def _packed(model) -> int:
    return sum(isinstance(m, PackedLinear) for m in model.modules())


def test_bf16_model_is_packed_exactly_where_the_cpu_has_native_bf16(smollm_bf16, smollm_fp32):
    layers = smollm_bf16.config.num_hidden_layers
    assert _packed(smollm_fp32.model) == 0  # fp32's packed kernel changes bits: never packed
    if not cpu_has_fast_bf16():  # AVX2 only: bf16 is never auto-picked, and never packed
        assert _packed(smollm_bf16.model) == 0
        assert not can_pack(torch.bfloat16, torch.device("cpu"))
        return
    assert _packed(smollm_bf16.model) == 7 * layers + 1  # q k v o gate up down, lm_head
    m = smollm_bf16.model
    assert m.lm_head.weight is m.model.embed_tokens.weight  # the tie survives


@torch.inference_mode()
def test_packed_model_gives_the_plain_models_logits_bit_for_bit(smollm_bf16):
    plain = AutoModelForCausalLM.from_pretrained(
        smollm_bf16.source, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    assert _packed(plain) == 0
    gen = torch.Generator().manual_seed(0)
    for t in (1, 9, 32, 33, 130):  # 32 rows: the packed path's last; 33 on: F.linear
        ids = torch.randint(1000, 40000, (1, t), generator=gen)
        assert torch.equal(smollm_bf16.model(input_ids=ids).logits, plain(input_ids=ids).logits)


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="oneDNN's bf16 weight reorder needs "
                    "avx512bw/vl/dq or avx_ne_convert, which this CPU lacks (and on such a CPU "
                    "pack_linears is never called: see the first test)")
def test_nothing_is_packed_where_one_shape_would_change_the_bits(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 8)).to(torch.bfloat16)
    monkeypatch.setattr(PackedLinear, "same_as_linear", lambda self: self.in_features != 4)
    assert pack_linears(model) == 0 and _packed(model) == 0
