"""Structured output in the engine: guides compile once, masks hold every row to its grammar
inside a batch, and a sequence resumed from its tokens continues exactly as it would have."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.grammar import Grammars, GuideError
from engine.intake import InvalidRequest
from engine.sampler import SampleRow, apply_controls
from engine.sampling_params import Guide, SamplingParams
from tests.engine.helpers import make_request, run, run_one
from tests.structured_corpus import MAX_TOKENS, corpus

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}


def chat(lm, text: str) -> list[int]:
    return lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"]


def guided(schema: dict, temperature: float = 0.0, seed: int | None = None, **kw):
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=seed,
                          guide=Guide("json", json.dumps(schema)), **kw)


@pytest.fixture(scope="module")
def engine(smollm_fp32) -> Engine:
    return Engine(smollm_fp32, EngineConfig(max_slots=32))


def text_of(lm, tokens: list[int]) -> str:
    return lm.tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_repeated_guide_compiles_once(smollm_fp32):
    g = Grammars(smollm_fp32.tokenizer, smollm_fp32.config.vocab_size, frozenset({2}))
    guide = Guide("json", json.dumps(PERSON))
    assert g.compile(guide) is g.compile(Guide("json", json.dumps(PERSON)))
    assert (g.stats.compiles, g.stats.hits) == (1, 1)


def test_unsupported_schema_keyword_is_named(smollm_fp32):
    g = Grammars(smollm_fp32.tokenizer, smollm_fp32.config.vocab_size, frozenset({2}))
    with pytest.raises(GuideError, match='"not"'):
        g.compile(Guide("json", json.dumps({"not": {"type": "string"}})))
    with pytest.raises(GuideError):
        g.compile(Guide("lark", "start: undefined_rule"))


def test_the_engine_refuses_tokens_its_guide_does_not_accept(engine, smollm_fp32):
    ids = chat(smollm_fp32, "hi")
    bad = smollm_fp32.tokenizer.encode("not json")
    req = make_request("bad", ids + bad, guided(PERSON))
    req.num_prompt_tokens = len(ids)
    with pytest.raises(InvalidRequest, match="do not match"):
        engine.check(req)


def test_greedy_json_is_valid_and_ends_without_waiting_for_eos(engine, smollm_fp32):
    r = run_one(engine, chat(smollm_fp32, "Give me a person as JSON."), guided(PERSON))
    value = json.loads(text_of(smollm_fp32, r.tokens))
    jsonschema.validate(value, PERSON)
    assert r.finish_reason == "stop"


def test_a_resumed_sequence_continues_from_its_tokens_exactly(engine, smollm_fp32):
    """A decode handoff or failover: the matcher is rebuilt from the tokens so far."""
    ids = chat(smollm_fp32, "Describe a person as JSON.")
    for params in (guided(PERSON), guided(PERSON, temperature=1.0, seed=11)):
        whole = run_one(engine, ids, params).tokens
        cut = len(whole) // 2
        req = make_request("resumed", ids + whole[:cut], params)
        req.num_prompt_tokens = len(ids)
        rest = run(engine, [req])["resumed"].tokens
        assert whole[:cut] + rest == whole


def test_min_tokens_gives_way_when_the_guide_must_end(engine, smollm_fp32):
    params = SamplingParams(max_tokens=8, temperature=0, min_tokens=5,
                            guide=Guide("regex", "(yes|no)"))
    r = run_one(engine, chat(smollm_fp32, "Is water wet?"), params)
    assert text_of(smollm_fp32, r.tokens) in ("yes", "no")
    assert r.finish_reason == "stop"


def test_guided_and_free_rows_share_a_batch(engine, smollm_fp32):
    ids = chat(smollm_fp32, "Tell me about cats.")
    free = SamplingParams(max_tokens=12, temperature=0)
    alone = run_one(engine, ids, free).tokens
    out = run(engine, [make_request("free", ids, free),
                       make_request("json", ids, guided(PERSON))])
    assert out["free"].tokens == alone  # a neighbour's mask never touches another row
    json.loads(text_of(smollm_fp32, out["json"].tokens))


def test_mask_rows_are_per_row():
    mask = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0])
    rows = [SampleRow(SamplingParams(), 1, [], 0, guide_mask=mask),
            SampleRow(SamplingParams(), 1, [], 0)]
    out = apply_controls(torch.zeros(2, 4), rows)
    assert out[0].tolist() == [float("-inf"), 0.0, float("-inf"), 0.0]
    assert out[1].tolist() == [0.0] * 4


def test_corpus_outputs_parse_and_validate(engine, smollm_fp32):
    """200 schemas, greedy and seeded sampling, batched 32 rows at a time: every output
    parses and validates."""
    schemas = corpus()
    ids = chat(smollm_fp32, "Fill in this JSON object with plausible values.")
    reqs = []
    for i, schema in enumerate(schemas):
        reqs.append(make_request(f"g{i}", ids, guided(schema)))
        reqs.append(make_request(f"s{i}", ids, guided(schema, temperature=1.0, seed=i)))
    out = run(engine, reqs)
    for i, schema in enumerate(schemas):
        for kind in "gs":
            r = out[f"{kind}{i}"]
            text = text_of(smollm_fp32, r.tokens)
            assert r.finish_reason == "stop", (i, kind, text)
            jsonschema.validate(json.loads(text), schema)


def test_objects_with_properties_are_closed_unless_they_say_otherwise():
    from engine.grammar import closed

    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
        "open": {"type": "object", "properties": {}, "additionalProperties": True}},
        "$defs": {"d": {"properties": {"x": {}}}}, "anyOf": [{"properties": {}}]}
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]  # a property map, not a schema
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert out["properties"]["open"]["additionalProperties"] is True
    assert out["$defs"]["d"]["additionalProperties"] is False
    assert out["anyOf"][0]["additionalProperties"] is False
    assert closed({"type": "object"}) == {"type": "object"}  # JSON mode: any object


def test_forked_choices_each_follow_the_guide_as_they_would_alone(engine, smollm_fp32):
    """n > 1: choices forked off one prompt computation each get a matcher of their own."""
    ids = chat(smollm_fp32, "Describe a person as JSON.")
    params = [guided(PERSON, temperature=1.0, seed=s) for s in (1, 2, 3)]
    alone = [run_one(engine, ids, p).tokens for p in params]
    engine.add(make_request("p0", ids, params[0]))
    engine.fork("p0", "p1", params[1])
    engine.fork("p0", "p2", params[2])
    out = run(engine, [])
    assert [out[f"p{i}"].tokens for i in range(3)] == alone
    for tokens in alone:
        jsonschema.validate(json.loads(text_of(smollm_fp32, tokens)), PERSON)


def test_masks_computed_during_the_forward_give_the_same_tokens(engine, smollm_fp32):
    """The CUDA path (masks on a helper thread while the forward runs), forced on CPU."""
    ids = chat(smollm_fp32, "Describe a person as JSON.")
    params = [guided(PERSON), guided(PERSON, temperature=1.0, seed=5)]
    inline = [run_one(engine, ids, p).tokens for p in params]
    engine._masks.overlap = True
    try:
        out = run(engine, [make_request(f"o{i}", ids, p) for i, p in enumerate(params)])
    finally:
        engine._masks.overlap = False
    assert [out["o0"].tokens, out["o1"].tokens] == inline


def test_a_broken_guide_fails_its_row_alone(engine, smollm_fp32):
    ids = chat(smollm_fp32, "Describe a person as JSON.")
    engine.add(make_request("ok", ids, guided(PERSON)))
    engine.add(make_request("bad", ids, guided(PERSON)))
    while not engine.step():
        pass
    bad = engine._seqs["bad"].matcher
    bad.consume_token(smollm_fp32.tokenizer.encode("}")[0])  # `{` then `}`: no "name"
    assert bad.is_error()
    out = run(engine, [])
    [(seq_id, err)] = engine.take_failed()
    assert seq_id == "bad" and isinstance(err, ValueError)
    assert "bad" not in out and out["ok"].finish_reason == "stop"
