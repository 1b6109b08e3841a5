"""No sequence can hurt another: every field is checked at intake, a sequence whose own request
breaks a step fails alone (the rest of the batch carries on, token for token), and prompt
logprobs are computed in bounded chunks with the same values. On the tiny random Llama."""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import replace

import pytest
import torch

import engine.sampler as sampler
import engine.scheduler as scheduler_module
from engine.engine import Engine, EngineConfig
from engine.forward import Forward
from engine.intake import InvalidRequest
from engine.runner import EngineRunner
from engine.sequence import SeqRequest
from tests.e2e.faults import poll
from tests.engine.helpers import greedy, make_request, run, run_one

IDS = [5, 17, 230, 1200, 41, 9, 77, 3, 12, 400]
VOCAB = 49152  # the tiny Llama shares SmolLM2's tokenizer


@pytest.fixture
def engine(tiny_fp32) -> Engine:
    assert tiny_fp32.config.vocab_size == VOCAB
    return Engine(tiny_fp32, EngineConfig(max_slots=4, block_size=16, max_model_len=256))


BAD_PARAMS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": VOCAB + 1}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"logit_bias": {VOCAB: 1.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {0: 101.0}}, "logit_bias"),
    ({"logit_bias": {0: math.nan}}, "logit_bias"),
    ({"logit_bias": dict.fromkeys(range(1025), 1.0)}, "logit_bias"),
    ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"seed": 2**63}, "seed"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_PARAMS)
def test_every_bad_sampling_field_is_refused_by_name(engine, fields, param):
    with pytest.raises(InvalidRequest) as e:
        engine.add(make_request("x", IDS, replace(greedy(4), **fields)))
    assert e.value.param == param and param in str(e.value)
    assert not engine.has_work()


@pytest.mark.parametrize(("req", "param"), [
    (SeqRequest("x", IDS, 0, greedy()), "num_prompt_tokens"),
    (SeqRequest("x", IDS, len(IDS) + 1, greedy()), "num_prompt_tokens"),
    (make_request("x", [VOCAB], greedy()), "token_ids"),
    (make_request("x", [-1], greedy()), "token_ids"),
    (make_request("x", IDS * 26, greedy()), "token_ids"),  # 260 >= max_model_len 256
])
def test_bad_tokens_are_refused_by_name(engine, req, param):
    with pytest.raises(InvalidRequest) as e:
        engine.check(req)
    assert e.value.param == param


def test_edge_values_are_accepted(engine):
    edge = replace(greedy(2), top_k=VOCAB, top_p=1.0, min_p=1.0, presence_penalty=-2.0,
                   frequency_penalty=2.0, logit_bias={0: -100.0, VOCAB - 1: 100.0},
                   stop_token_ids=[VOCAB - 1], logprobs=20, prompt_logprobs=20,
                   seed=-(2**63), min_tokens=2)
    assert run_one(engine, IDS, edge).finish_reason is not None
    assert run_one(engine, IDS, replace(greedy(2), top_k=-1)).finish_reason is not None


def test_a_row_that_breaks_sampling_fails_alone(engine, tiny_fp32):
    """Validation bypassed (params changed after add): only that row's sequence is dropped."""
    want = run_one(Engine(tiny_fp32, EngineConfig(max_slots=1)), IDS,
                   greedy(12, ignore_eos=True)).tokens
    bad_params = greedy(12, ignore_eos=True)
    engine.add(make_request("good", IDS, greedy(12, ignore_eos=True)))
    engine.add(make_request("bad", IDS, bad_params))
    first = engine.step()
    assert {ev.seq_id for ev in first} == {"good", "bad"}
    bad_params.logit_bias[VOCAB] = 1.0  # out of range: indexing raises for this row only
    out = run(engine, [])
    assert "bad" not in out
    assert [ev.token_id for ev in first if ev.seq_id == "good"] + out["good"].tokens == want
    [(seq_id, err)] = engine.take_failed()
    assert seq_id == "bad" and isinstance(err, IndexError | RuntimeError)
    assert engine.take_failed() == [] and engine.step() == []
    assert engine.pool.num_referenced == 0


def test_an_import_that_does_not_go_in_fails_alone(engine, tiny_fp32):
    ids = (IDS * 4)[:40]
    # Shaped right (so add() takes it), but a meta tensor has no data to copy into the slot.
    blocks = torch.empty((2, *engine.layout.block_shape), device="meta")
    engine.add(make_request("good", ids, greedy(6, ignore_eos=True)))
    engine.add(make_request("bad", ids, greedy(6), prefix_kv=blocks, prefix_len=32))
    out = run(engine, [])
    assert set(out) == {"good"} and out["good"].finish_reason == "length"
    assert [seq_id for seq_id, _ in engine.take_failed()] == ["bad"]
    want = run_one(Engine(tiny_fp32, EngineConfig(max_slots=1)), ids, greedy(6, ignore_eos=True))
    assert out["good"].tokens == want.tokens
    assert engine.step() == [] and engine.pool.num_referenced == 0  # its pages came back


def _stream(runner: EngineRunner, req: SeqRequest):
    return runner.stream(req).__aiter__()


async def _rest(events) -> list:
    return [ev async for ev in events]


def test_runner_refuses_a_bad_sequence_while_the_batch_streams_on(engine, tiny_fp32):
    want = run_one(Engine(tiny_fp32, EngineConfig(max_slots=1)), IDS,
                   greedy(24, ignore_eos=True)).tokens
    runner = EngineRunner(engine)
    runner.start()

    async def main() -> None:
        good = _stream(runner, make_request("good", IDS, greedy(24, ignore_eos=True)))
        first = await anext(good)  # the good sequence is running
        bad = make_request("bad", IDS, greedy(24, logit_bias={VOCAB: 1.0}))
        with pytest.raises(InvalidRequest) as e:
            await _rest(_stream(runner, bad))
        assert e.value.param == "logit_bias"
        rest = await _rest(good)
        assert [first.token_id] + [ev.token_id for ev in rest] == want
        assert rest[-1].finish_reason == "length"

    try:
        asyncio.run(main())
    finally:
        runner.stop()


def test_runner_tells_a_hung_step_from_an_idle_engine(engine, monkeypatch):
    """turned_within gates the workers' keepalive lines: true while idle or stepping, false
    while a step hangs, so a hung engine's streams fall silent and the router fails over."""
    entered, release = threading.Event(), threading.Event()
    step = engine.step

    def hung_step():
        entered.set()
        release.wait(30)
        return step()

    monkeypatch.setattr(engine, "step", hung_step)
    runner = EngineRunner(engine)
    runner.start()
    try:
        assert runner.turned_within(2.0)  # idle: the loop comes round every 0.5 s
        runner.call(lambda e: e.add(make_request("h", IDS, greedy(2, ignore_eos=True))))
        assert entered.wait(10)
        poll(lambda: not runner.turned_within(0.2), 10, "the hung step to show", every=0.01)
        release.set()
        poll(lambda: runner.turned_within(0.2), 10, "the engine to turn again", every=0.01)
    finally:
        release.set()
        runner.stop()


def test_runner_ends_only_the_stream_of_a_sequence_failing_mid_step(engine, tiny_fp32):
    want = run_one(Engine(tiny_fp32, EngineConfig(max_slots=1)), IDS,
                   greedy(24, ignore_eos=True)).tokens
    runner = EngineRunner(engine)
    runner.start()
    bad_params = greedy(24, ignore_eos=True)

    async def main() -> None:
        good = _stream(runner, make_request("good", IDS, greedy(24, ignore_eos=True)))
        bad = _stream(runner, make_request("bad", IDS, bad_params))
        got = [(await anext(good)).token_id]
        await anext(bad)
        # On the engine thread, between steps: the bad row's next draw raises.
        await asyncio.wrap_future(runner.call(lambda _: bad_params.logit_bias.update({VOCAB: 1.0})))
        with pytest.raises(RuntimeError, match="failed in the engine"):
            await _rest(bad)
        got += [ev.token_id for ev in await _rest(good)]
        assert got == want

    try:
        asyncio.run(main())
    finally:
        runner.stop()


def test_prompt_logprobs_in_chunks_equal_one_pass(tiny_fp32, monkeypatch):
    ids = [(i * 7919) % VOCAB for i in range(600)]  # over two 256-position chunks
    params = greedy(1, prompt_logprobs=5)
    rows = []
    pass_rows = sampler._prompt_logprobs

    def spy(logits, targets, k):
        rows.append(logits.shape[0])
        return pass_rows(logits, targets, k)

    monkeypatch.setattr(sampler, "_prompt_logprobs", spy)
    monkeypatch.setattr(scheduler_module, "LOGITS_CHUNK", 10**9)  # one forward for the prompt
    monkeypatch.setattr(sampler, "PROMPT_LOGPROB_CHUNK", 10**9)  # the whole prompt at once
    whole = run_one(Engine(tiny_fp32), ids, params).events[0].prompt_logprobs
    assert rows == [600]
    monkeypatch.setattr(sampler, "PROMPT_LOGPROB_CHUNK", 256)
    rows.clear()
    chunked = run_one(Engine(tiny_fp32), ids, params).events[0].prompt_logprobs
    assert rows == [256, 256, 88]
    assert len(chunked) == 600 and chunked[0] is None
    assert chunked == whole  # exactly: every op is per row


def test_prompt_logprobs_never_hold_more_than_a_chunk_of_logits(tiny_fp32, monkeypatch):
    """The forward keeps every position's logits for prompt logprobs: [LOGITS_CHUNK, V] at
    most per pass, whatever the prompt's length, and the same values as one pass."""
    ids = [(i * 7919) % VOCAB for i in range(600)]
    params = greedy(1, prompt_logprobs=3)
    rows = []
    forward = Forward.step

    def spy(self, *args):
        out = forward(self, *args)
        rows.append(out.shape[0])
        return out

    monkeypatch.setattr(Forward, "step", spy)
    chunked = run_one(Engine(tiny_fp32), ids, params).events[0].prompt_logprobs
    assert rows == [512, 88]
    monkeypatch.setattr(scheduler_module, "LOGITS_CHUNK", 10**9)
    whole = run_one(Engine(tiny_fp32), ids, params).events[0].prompt_logprobs
    assert rows[2:] == [600]
    for a, b in zip(chunked[1:], whole[1:], strict=True):  # masked chunks vs one pass: ~1e-6
        assert a[0] == pytest.approx(b[0], abs=1e-4)
        assert [t for t, _ in a[1]] == [t for t, _ in b[1]]
