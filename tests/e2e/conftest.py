"""End-to-end fixtures: real `tandem serve` process trees, and reference outputs from HF."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.stack import Stack
from tests.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    """A module's own redis-server on a free loopback port (never the shared 6379)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """1 prefill + 1 decode worker on the embedded store (memory + disk)."""
    with Stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


class Reference:
    """Greedy continuations from `model.generate()`, the ground truth for parity."""

    def __init__(self, lm):
        self.lm = lm

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.lm.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = self.lm.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=self.lm.tokenizer.eos_token_id,
            )
        new = out[0, len(prompt_ids):].tolist()
        eos = self.lm.tokenizer.eos_token_id
        return new[: new.index(eos)] if eos in new else new

    def text(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict], max_tokens: int) -> tuple[str, int]:
        ids = self.generate_ids(self.chat_ids(messages), max_tokens)
        return self.text(ids), ids

    def completion(self, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
        ids = self.generate_ids(self.lm.tokenizer.encode(prompt), max_tokens)
        return self.text(ids), ids


@pytest.fixture(scope="session")
def reference(smollm_fp32) -> Reference:
    return Reference(smollm_fp32)
