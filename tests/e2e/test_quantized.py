"""`tandem serve --quantization int4` end to end (1 prefill + 1 decode worker, fp32
activations): the GGUF's own 4-bit weights answer like that model's `generate()` through the
handoff and the prefix cache, under a fingerprint (so a KV namespace) of their own, and
structured output works on top."""

from __future__ import annotations

import json

import pytest

from engine.loader import load_model
from engine.registry import DEFAULT_MODEL, resolve_model
from tests.e2e.conftest import Reference
from tests.e2e.stack import Stack
from tests.e2e.test_serving import post
from tests.e2e.test_serving import test_prefix_reuse_computes_only_new_tokens as check_reuse


@pytest.fixture(scope="module")
def int4_reference(default_folder) -> Reference:
    return Reference(load_model(resolve_model(DEFAULT_MODEL), dtype="float32", device="cpu",
                                quantization="int4"))


def test_int4_serves_like_its_own_generate(tmp_path, int4_reference, reference):
    with Stack(tmp_path, "--quantization", "int4") as s:
        check_reuse(s, int4_reference)
        prints = {h["fingerprint"] for role in ("prefill", "decode")
                  for h in s.worker_health(role)}
        assert prints == {int4_reference.lm.fingerprint} != {reference.lm.fingerprint}
        r = post(s, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Give a JSON object with a name."}],
            "max_tokens": 48, "temperature": 0, "response_format": {
                "type": "json_schema", "json_schema": {"name": "person", "schema": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string", "maxLength": 12}}}}}})
        assert r.status_code == 200, r.text
        answer = json.loads(r.json()["choices"][0]["message"]["content"])
        assert list(answer) == ["name"] and len(answer["name"]) <= 12
