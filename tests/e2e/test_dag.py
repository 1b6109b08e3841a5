"""Issue 16 end to end: `tandem serve --model A --model B` (one prefill and one decode worker
each) runs a 10-node DAG over both models; each model computes the shared system prompt once,
every node's text is what it gives alone, and the in-process `LLM` gives the same as `Client`."""

from __future__ import annotations

import json

import httpx
import pytest

from scripts.bench_dag import SYSTEM, A, B, workload
from scripts.bench_dag import computed as computed_by_model
from tandem import DAG, LLM, Client, SamplingParams
from tests.e2e.stack import Stack
from workflow.dag import Node

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("two-models"), "--model", A, "--model", B,
               "--kv-cache-bytes", str(400 << 20)) as s:
        yield s


def computed(stack: Stack) -> dict[str, int]:
    """Prompt tokens each model's workers computed (not loaded), read from the workers."""
    with httpx.Client(timeout=5) as http:
        return computed_by_model(http, stack.url)


def test_models_are_listed_and_an_unknown_one_is_404(two_models):
    names = [m["id"] for m in httpx.get(f"{two_models.url}/v1/models").json()["data"]]
    assert names == [A, B]
    r = httpx.post(f"{two_models.url}/v1/completions",
                   json={"model": "no-such-model", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert sorted(w["model"] for w in two_models.workers()) == [A, A, B, B]


def test_ten_nodes_two_models_shared_prefix_computed_once(two_models, smollm_fp32):
    dag = workload()  # scripts/bench_dag.py: 10 nodes, a shared sheet, a chain, a join
    system_len = len(smollm_fp32.tokenizer.encode(SYSTEM))
    assert system_len >= 1000
    before = computed(two_models)
    with Client(two_models.url) as client:
        outs = client.generate(dag, GREEDY)
    after = computed(two_models)
    text = {o.seq_id: o.text for o in outs}
    assert all(o.error is None and o.finish_reason for o in outs), outs
    assert {o.seq_id: o.model for o in outs}["c2"] == B

    # Each model computed the system prompt once: four nodes of A and three of B hold it, so
    # twice would be 1,000 tokens more. (64: a store block of rounding per node.)
    tok = smollm_fp32.tokenizer
    for model in (A, B):
        nodes = [n for n in dag.validate() if (n.model or A) == model]
        prompts = [len(tok.encode(n.rendered(text).prompt)) for n in nodes]
        holders = sum(1 for n in nodes if n.prompt.startswith(SYSTEM))
        spent = after[model] - before[model]
        assert spent <= sum(prompts) - (holders - 1) * system_len + 64 * len(nodes), model
        assert spent >= system_len, model

    # Every node, run alone in topological order with its parents' text, says the same.
    for node in dag.validate():
        r = httpx.post(f"{two_models.url}/v1/completions", timeout=120, json={
            "model": node.model or A, "prompt": node.rendered(text).prompt,
            "max_tokens": 8, "temperature": 0})
        assert r.json()["choices"][0]["text"] == text[node.id], node.id

    # The in-process LLM, on the same two models, gives the same text as the served DAG.
    llm = LLM([A, B], dtype="float32", device="cpu", kv_cache_bytes=256 << 20)
    assert {o.seq_id: o.text for o in llm.generate(dag, GREEDY)} == text


def test_streamed_dag_and_bad_dags(two_models):
    body = {"nodes": [{"id": "a", "prompt": "One, two,", "max_tokens": 4, "temperature": 0},
                      {"id": "b", "model": B, "prompt": "{{a}} three,", "max_tokens": 4,
                       "temperature": 0}], "stream": True}
    events = []
    with httpx.stream("POST", f"{two_models.url}/v1/dag", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    kinds = [(e["type"], e.get("id")) for e in events]
    assert kinds[0] == ("node.started", "a") and kinds[-1] == ("dag.done", None)
    assert kinds.index(("node.done", "a")) < kinds.index(("node.started", "b"))
    final = {n["id"]: n for n in events[-1]["dag"]["nodes"]}
    assert final["b"]["text"] == "".join(e["delta"] for e in events
                                         if e["type"] == "node.delta" and e["id"] == "b")
    for nodes, code in [
        ([{"id": "a", "prompt": "{{a}}"}], "self_dependency"),
        ([{"id": "a", "prompt": "{{ a.__init__.__globals__ }}"}], "invalid_template"),
        ([{"id": "a", "prompt": "x", "model": "gpt-4"}], "model_not_found"),
        ([{"id": f"n{i}", "prompt": "x"} for i in range(51)], "too_many_nodes"),
    ]:
        r = httpx.post(f"{two_models.url}/v1/dag", json={"nodes": nodes}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_node_order_is_kept_by_the_client(two_models):
    dag = DAG([Node("z", "Hello"), Node("y", "{{z}} again")])
    with Client(two_models.url) as client:
        assert [o.seq_id for o in client.generate(dag, GREEDY)] == ["z", "y"]


def test_a_follow_up_chat_node_reuses_its_parents_prompt_and_answer(two_models):
    first = [{"role": "system", "content": SYSTEM},
             {"role": "user", "content": "Describe station 3 in a long paragraph."}]
    follow = [*first, {"role": "assistant", "content": "{{a}}"},
              {"role": "user", "content": "And station 4?"}]
    r = httpx.post(f"{two_models.url}/v1/dag", timeout=300, json={"nodes": [
        {"id": "a", "messages": first, "max_tokens": 120, "temperature": 0},
        {"id": "b", "messages": follow, "max_tokens": 4, "temperature": 0}]})
    a, b = r.json()["nodes"]
    assert a["status"] == b["status"] == "done", r.text
    prompt, answer = a["usage"]["prompt_tokens"], a["usage"]["completion_tokens"]
    # The answer fills a store block past the prompt (the decode worker stores each block of
    # generated tokens as it fills); b, prefilled on either worker, loads it with the prompt.
    B = two_models.worker_health("decode")[0]["block_size"]
    full_blocks = (prompt + answer - 1) // B * B
    assert full_blocks > prompt, (prompt, answer)
    assert b["cached_tokens"] >= full_blocks, (prompt, answer, b["cached_tokens"])
