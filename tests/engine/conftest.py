"""Engine fixtures: prompt ids and HF reference outputs, computed once per session."""

from __future__ import annotations

import pytest

from tests.engine.helpers import PROMPTS, hf_greedy


@pytest.fixture(scope="session")
def prompt_ids(smollm_fp32) -> list[list[int]]:
    return [smollm_fp32.tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="session")
def hf_refs_fp32(smollm_fp32, prompt_ids):
    """HF greedy references for PROMPTS, 64 new tokens, fp32 (computed once per session)."""
    return [hf_greedy(smollm_fp32, ids, 64) for ids in prompt_ids]
