"""Stop conditions, continuous batching, aborts and validation, on the tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from engine.engine import Engine, EngineConfig, default_max_len
from engine.loader import load_model
from engine.registry import ModelSpec
from engine.sequence import SeqRequest
from tests.engine.helpers import greedy, make_request, run, run_one

IDS = [5, 17, 230, 1200, 41, 9, 77]


@pytest.fixture
def tiny_engine(tiny_fp32):
    return Engine(tiny_fp32, EngineConfig(max_slots=4, prefill_chunk=16))


def test_max_tokens_finishes_with_length(tiny_engine):
    r = run_one(tiny_engine, IDS, greedy(5, ignore_eos=True))
    assert len(r.tokens) == 5
    assert [e.finish_reason for e in r.events] == [None] * 4 + ["length"]
    assert not tiny_engine.has_work()


def test_stop_token_ids_and_min_tokens(tiny_engine):
    free = run_one(tiny_engine, IDS, greedy(12, ignore_eos=True)).tokens
    stop = free[2]
    first = free.index(stop)
    r = run_one(tiny_engine, IDS, greedy(12, ignore_eos=True, stop_token_ids=[stop]))
    assert r.tokens == free[: first + 1] and r.finish_reason == "stop"
    # min_tokens suppresses the stop id until reached
    r = run_one(tiny_engine, IDS, greedy(12, ignore_eos=True, stop_token_ids=[stop],
                                         min_tokens=first + 2))
    assert stop not in r.tokens[: first + 2]


def test_eos_stops_unless_ignored(tiny_engine):
    eos = next(iter(tiny_engine.eos_token_ids))
    bias = {eos: 100.0}
    assert run_one(tiny_engine, IDS, greedy(6, logit_bias=bias)).events[0].finish_reason == "stop"
    r = run_one(tiny_engine, IDS, greedy(6, logit_bias=bias, ignore_eos=True))
    assert r.tokens == [eos] * 6 and r.finish_reason == "length"
    r = run_one(tiny_engine, IDS, greedy(6, logit_bias=bias, min_tokens=3))
    assert eos not in r.tokens[:3] and r.tokens[3] == eos and len(r.tokens) == 4


def test_context_length_finishes_with_length(tiny_fp32):
    engine = Engine(tiny_fp32, EngineConfig(max_model_len=10))
    r = run_one(engine, IDS, greedy(100, ignore_eos=True))
    assert len(IDS) + len(r.tokens) == 10 and r.finish_reason == "length"
    with pytest.raises(ValueError):
        engine.add(make_request("long", list(range(10)), greedy()))


def test_batch_with_joins_matches_solo_runs(tiny_fp32):
    # 7 sequences through 3 slots: queueing, different lengths, holes refilled mid-run.
    prompts = [IDS[: 2 + i] * (1 + i % 3) for i in range(7)]
    lengths = [3, 9, 5, 14, 2, 7, 11]
    solo_engine = Engine(tiny_fp32, EngineConfig(max_slots=1))
    solo = [run_one(solo_engine, p, greedy(n, ignore_eos=True)).tokens
            for p, n in zip(prompts, lengths, strict=True)]
    engine = Engine(tiny_fp32, EngineConfig(max_slots=3, prefill_chunk=8))
    reqs = [make_request(str(i), p, greedy(n, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    out = run(engine, reqs[:4], joins={2: reqs[4:6], 6: reqs[6:]})
    assert [out[str(i)].tokens for i in range(7)] == solo
    assert engine.step() == [] and engine.pool.num_referenced == 0  # all pages given back


def test_abort_stops_events_and_frees_the_slot(tiny_engine):
    tiny_engine.add(make_request("a", IDS, greedy(50, ignore_eos=True)))
    tiny_engine.add(make_request("b", IDS, greedy(3, ignore_eos=True)))
    tiny_engine.step()
    tiny_engine.abort("a")
    tiny_engine.abort("unknown")  # ignored
    seen = [ev.seq_id for _ in range(5) for ev in tiny_engine.step()]
    assert "a" not in seen and seen.count("b") == 2
    assert not tiny_engine.has_work() and tiny_engine.pool.num_referenced == 0


def test_prefill_only_keeps_kv_until_release(tiny_engine):
    tiny_engine.add(make_request("p", IDS, greedy(10), prefill_only=True))
    events = tiny_engine.step()
    assert [e.seq_id for e in events] == ["p"] and not tiny_engine.has_work()
    kv = tiny_engine.export_kv("p", 0, len(IDS))
    assert tiny_engine.kv_len("p") == len(IDS)
    tiny_engine.step()  # not released yet: its pages stay, still exportable
    assert torch.equal(tiny_engine.export_kv("p", 0, len(IDS)), kv)
    assert tiny_engine.pool.num_referenced > 0
    tiny_engine.release("p")
    assert tiny_engine.pool.num_referenced == 0
    with pytest.raises(KeyError):
        tiny_engine.kv_len("p")


def test_prompt_logprobs_match_a_full_forward(tiny_fp32, tiny_engine):
    ids = (IDS * 4)[:25]  # 25 tokens: two chunks of 16
    params = greedy(2, prompt_logprobs=3)
    first = run_one(tiny_engine, ids, params).events[0]
    with torch.inference_mode():
        lp = tiny_fp32.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert first.prompt_logprobs[0] is None and len(first.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        got, top = first.prompt_logprobs[i]
        assert abs(got - lp[i - 1, ids[i]].item()) < 1e-4
        assert [t for t, _ in top] == lp[i - 1].topk(3).indices.tolist()


def test_rejects_malformed_requests(tiny_engine):
    tiny_engine.add(make_request("x", IDS, greedy()))
    with pytest.raises(ValueError):
        tiny_engine.add(make_request("x", IDS, greedy()))  # duplicate, still running
    with pytest.raises(ValueError):
        tiny_engine.add(make_request("y", [10**9], greedy()))
    bad = torch.zeros(1, 2, 2, 64, 16)  # wrong layer count for blocks
    with pytest.raises(ValueError):
        tiny_engine.add(make_request("z", IDS, greedy(), prefix_kv=bad, prefix_len=3))
    with pytest.raises(ValueError):
        tiny_engine.add(SeqRequest("w", IDS, 0, greedy()))  # no prompt tokens


def test_prompt_logprobs_ignore_a_given_prefix(tiny_engine):
    tiny_engine.add(make_request("a", IDS, greedy(1), prefill_only=True))
    tiny_engine.step()
    kv = tiny_engine.export_kv("a", 0, len(IDS))
    req = make_request("b", IDS, greedy(1, prompt_logprobs=0), prefix_kv=kv,
                       prefix_len=len(IDS))
    before = tiny_engine.stats.prefill_tokens
    ev = run(tiny_engine, [req])["b"].events[0]
    assert tiny_engine.stats.prefill_tokens - before == len(IDS)  # computed in full
    assert len(ev.prompt_logprobs) == len(IDS)


def test_default_max_len_respects_sliding_window(tiny_fp32):
    cfg = tiny_fp32.config
    assert default_max_len(cfg) == 2048
    cfg_window = type(cfg)(**{**cfg.to_dict(), "sliding_window": 1024})
    assert default_max_len(cfg_window) == 1024


def test_eager_attention_gives_the_same_tokens(tiny_folder, tiny_fp32):
    # Without SDPA, transformers builds the masks itself from StepCache's sizes.
    eager = load_model(ModelSpec("tiny-eager", "path", str(tiny_folder)), dtype="float32")
    eager.model.set_attn_implementation("eager")
    assert eager.model.config._attn_implementation == "eager"

    def reqs():
        return [make_request(str(i), IDS[: 3 + i], greedy(6, ignore_eos=True)) for i in range(3)]

    want = run(Engine(tiny_fp32, EngineConfig(prefill_chunk=4)), reqs())
    got = run(Engine(eager, EngineConfig(prefill_chunk=4)), reqs())
    assert {k: r.tokens for k, r in got.items()} == {k: r.tokens for k, r in want.items()}
