"""`LLM`: DAGs and prompts in process on the real model (fp32): the output of every node is
what running it alone gives, a shared prefix is computed once per model, a follow-up turn
reuses its parent's prompt and answer, and KV never crosses models."""

from __future__ import annotations

import pytest

from engine.registry import DEFAULT_MODEL
from tandem import DAG, LLM, DAGError, NodeFailed, SamplingParams
from workflow.dag import Node

DERIVED = "SmolLM2-135M-Instruct-int8r"  # configs/models.toml: int8-rounded projections
SYSTEM = ("You are a careful assistant for a small bakery. The bakery sells bread, rolls, "
          "cakes and pastries, opens at seven and closes at six, and is closed on Mondays. "
          "Answer in one short sentence, and never invent prices or opening hours. ") * 3
GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM([DEFAULT_MODEL, DERIVED], dtype="float32", device="cpu",
               kv_cache_bytes=256 << 20)


def _stats(llm: LLM, model: str):
    return llm.engines[model].stats


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def test_a_dag_equals_its_nodes_run_alone(llm):
    dag = (DAG()
           .add_node("q1", messages=_chat("When do you open?"))
           .add_node("q2", messages=_chat("Do you sell cakes?"))
           .add_node("q3", messages=_chat("Are you open on Monday?"), model=DERIVED)
           .add_node("c1", "Rewrite: {{q1}}", model=DERIVED)
           .add_node("c2", "Shorter: {{c1}}", depends_on=["q2"])
           .add_node("both", "{{q2}} / {{q3}}"))
    outs = llm.generate(dag, GREEDY)
    assert [o.seq_id for o in outs] == ["q1", "q2", "q3", "c1", "c2", "both"]
    text = {o.seq_id: o.text for o in outs}
    assert all(text.values()) and all(o.error is None for o in outs)
    for node in dag.validate():
        r = node.rendered(text)
        alone = llm.generate(DAG([Node(r.id, r.prompt, r.messages, (), r.model)]), GREEDY)
        assert alone[0].text == text[node.id], node.id
    assert outs[2].model == outs[3].model == DERIVED and outs[0].model == DEFAULT_MODEL


def test_siblings_compute_their_shared_prefix_once(llm):
    stats = _stats(llm, DEFAULT_MODEL)
    before = stats.prefill_tokens
    salt = "Unrelated preamble to miss the earlier tests' cache. " * 8  # 4+ pages of its own
    dag = DAG()
    for i, q in enumerate(["Hours?", "Cakes?", "Mondays?"]):
        dag.add_node(f"n{i}", salt + SYSTEM + q)
    outs = llm.generate(dag, SamplingParams(temperature=0, max_tokens=2))
    ids = [llm.prompt_ids(n) for n in dag.nodes]
    shared = min(outs[1].num_cached_tokens, outs[2].num_cached_tokens)
    assert outs[0].num_cached_tokens == 0 and shared >= len(ids[0]) - 32
    assert stats.prefill_tokens - before == sum(map(len, ids)) - (
        outs[1].num_cached_tokens + outs[2].num_cached_tokens)


def test_a_follow_up_turn_reuses_the_parents_prompt_and_answer(llm):
    first = _chat("Describe your bread in a long paragraph.")
    dag = (DAG().add_node("a", messages=first)
           .add_node("b", messages=[*first, {"role": "assistant", "content": "{{a}}"},
                                    {"role": "user", "content": "And bread?"}]))
    a, b = llm.generate(dag, SamplingParams(temperature=0, max_tokens=40))
    parent = llm.prompt_ids(dag.nodes[0])
    assert len(a.token_ids) > 16  # the answer fills at least one page of its own
    # Every full page of the parent's prompt and answer (its last token was never fed).
    assert b.num_cached_tokens == (len(parent) + len(a.token_ids) - 1) // 16 * 16


def test_kv_is_not_shared_across_models(llm):
    prompt = "A fresh prompt for both models, long enough to fill pages. " * 8
    dag = DAG().add_node("a", prompt).add_node("b", prompt + "More.", model=DERIVED,
                                                depends_on=["a"])
    a, b = llm.generate(dag, SamplingParams(temperature=0, max_tokens=2))
    assert b.num_cached_tokens == 0  # the same tokens, other weights: recomputed


def test_plain_prompts_are_never_templates(llm):
    outs = llm.generate(["Hello {{x}} {% y %}", "One, two,"], GREEDY)
    assert [o.seq_id for o in outs] == ["0", "1"] and all(o.text for o in outs)


def test_errors(llm):
    with pytest.raises(DAGError, match="cycle"):
        llm.generate(DAG().add_node("a", "{{b}}").add_node("b", "{{a}}"))
    with pytest.raises(DAGError, match="not served"):
        llm.generate(DAG().add_node("a", "x", model="nope"))
    refused = SamplingParams(max_tokens=0)  # the engine's own check refuses it
    dag = (DAG().add_node("bad", "x", params=refused).add_node("child", "{{bad}}")
           .add_node("ok", "Fine."))
    with pytest.raises(NodeFailed, match="'bad'"):
        llm.generate(dag, GREEDY)
    bad, child, ok = llm.generate(dag, GREEDY, on_error="continue")
    assert bad.error and child.error and "not run" in child.error
    assert ok.error is None and ok.text


def test_a_guided_node_answers_in_its_grammar(llm):
    from tandem import Guide
    from tandem.client import wire_params

    pick = SamplingParams(temperature=0, max_tokens=4, guide=Guide("regex", "(bread|cake)"))
    dag = (DAG().add_node("pick", "Name a bakery product:", params=pick)
           .add_node("say", "We sell {{pick}}. It is"))
    pick_out, say_out = llm.generate(dag, GREEDY)
    assert pick_out.text in ("bread", "cake") and pick_out.finish_reason == "stop"
    assert say_out.text
    assert wire_params(pick)["guided_regex"] == "(bread|cake)"  # what Client sends
