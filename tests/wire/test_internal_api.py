"""The internal wire: the engine's own SamplingParams and TokenEvent cross it unchanged."""

from __future__ import annotations

import json

import pytest

from engine.sampling_params import SamplingParams
from engine.sequence import TokenEvent
from wire.internal_api import DecodeRequest, PrefillResponse, event_line, parse_event

PARAMS = SamplingParams(
    max_tokens=7, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5,
    frequency_penalty=-0.5, repetition_penalty=1.1, logit_bias={0: -100.0, 49151: 2.5},
    seed=2**63 - 1, logprobs=3, prompt_logprobs=2, min_tokens=1, stop_token_ids=[2, 5],
    ignore_eos=True,
)


def test_sampling_params_round_trip_exactly():
    body = DecodeRequest(request_id="r", token_ids=[1, 2], params=PARAMS, num_prompt_tokens=1)
    back = DecodeRequest.model_validate_json(body.model_dump_json())
    assert back.params == PARAMS and isinstance(back.params, SamplingParams)
    assert all(type(k) is int for k in back.params.logit_bias)  # JSON keys are strings


def test_event_line_carries_set_fields_only_and_parses_back():
    ev = TokenEvent(9, -0.25, [(9, -0.25), (4, -2.0)], "stop", num_cached_tokens=64,
                    prompt_logprobs=[None, (-1.5, [(3, -0.5)])], seq_id="cmpl-x-3")
    line = event_line(ev)
    fields = json.loads(line)
    # seq_id names the choice: a call with forks streams several sequences' events.
    assert line.endswith("\n") and fields["seq_id"] == "cmpl-x-3"
    assert None not in fields.values()
    assert parse_event(line) == ev
    assert parse_event(event_line(TokenEvent(3))) == TokenEvent(3)


@pytest.mark.parametrize("line", ['{"token_id": 3, "logp', '{"logprob": -1.0}', "[]",
                                  '{"token_id": "three"}'])
def test_malformed_event_lines_raise_value_error(line):
    with pytest.raises(ValueError):
        parse_event(line)


def test_prefill_head_hides_the_seq_id():
    head = PrefillResponse(event=TokenEvent(5, num_cached_tokens=0, seq_id="x"), tail_start=64)
    wire = head.model_dump_json(exclude_none=True, exclude={"event": {"seq_id"}})
    assert "seq_id" not in wire
    assert PrefillResponse.model_validate_json(wire).event == TokenEvent(5, num_cached_tokens=0)
