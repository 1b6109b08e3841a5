"""DAG checks, topological order, `{{id}}` references and the schedule both executors share."""

from __future__ import annotations

import pytest

from workflow.dag import DAG, DAGError
from workflow.schedule import Schedule
from workflow.template import TemplateError, references, render


def _code(dag: DAG, **kw) -> tuple[str, str | None]:
    with pytest.raises(DAGError) as e:
        dag.validate(**kw)
    return e.value.code, e.value.node


def test_order_is_topological_and_stable():
    dag = (DAG().add_node("c", "{{b}}").add_node("a", "root").add_node("b", "{{a}}")
           .add_node("d", "alone"))
    order = dag.validate()
    assert [n.id for n in order] == ["a", "d", "b", "c"]
    assert order[3].parents == ("b",)


def test_depends_on_and_references_merge_without_duplicates():
    dag = DAG().add_node("a", "x").add_node("b", "{{a}} {{a}}", depends_on=["a"])
    assert dag.validate()[1].parents == ("a",)


@pytest.mark.parametrize("dag, code, node", [
    (DAG().add_node("a", "{{b}}").add_node("b", "{{a}}"), "cycle", "a"),
    (DAG().add_node("r", "x").add_node("a", "{{c}}").add_node("b", "{{a}}")
     .add_node("c", "{{b}}"), "cycle", "a"),
    (DAG().add_node("a", "x", depends_on=["a"]), "self_dependency", "a"),
    (DAG().add_node("a", "{{ a }}"), "self_dependency", "a"),
    (DAG().add_node("a", "x").add_node("b", "{{nope}}"), "unknown_reference", "b"),
    (DAG().add_node("a", "x", depends_on=["ghost"]), "unknown_reference", "a"),
    (DAG().add_node("a", "x").add_node("a", "y"), "duplicate_node", "a"),
    (DAG().add_node("bad id", "x"), "invalid_node_id", "bad id"),
    (DAG().add_node("a"), "invalid_node", "a"),
    (DAG().add_node("a", "x", messages=[{"role": "user", "content": "y"}]), "invalid_node", "a"),
    (DAG().add_node("a", "{{ 7*7 }}"), "invalid_template", "a"),
    (DAG().add_node("a", "{{ config.__class__ }}"), "invalid_template", "a"),
    (DAG().add_node("a", "{% for x in y %}"), "invalid_template", "a"),
    (DAG().add_node("a", "{# hidden #}"), "invalid_template", "a"),
    (DAG().add_node("a", "x", messages=None, model="m2"), "model_not_found", "a"),
    (DAG(), "empty_dag", None),
])
def test_invalid_dags_name_the_node(dag, code, node):
    assert _code(dag, models={"m1"}) == (code, node)


def test_cycle_message_shows_the_cycle():
    dag = DAG().add_node("a", "{{b}}").add_node("b", "{{c}}").add_node("c", "{{a}}")
    with pytest.raises(DAGError, match=r"a -> b -> c -> a"):
        dag.validate()


def test_node_limit_names_the_first_node_past_it():
    dag = DAG()
    for i in range(51):
        dag.add_node(f"n{i}", "x")
    assert _code(dag) == ("too_many_nodes", "n50")
    assert len(dag.validate(max_nodes=51)) == 51


def test_references_and_render():
    assert references("{{a}} and {{ b }} and {{a}}") == ["a", "b"]
    assert references("JSON like {\"a\": {\"b\": 1}} is fine") == []
    with pytest.raises(TemplateError):
        references("{{a}} {{")


def test_an_output_is_inserted_as_text_never_expanded():
    # A parent that answers with a reference (or a Jinja expression) cannot pull in anything.
    out = render("child: {{a}} / {{b}}", {"a": "{{b}} {{ 7*7 }} {% x %}", "b": "secret"})
    assert out == "child: {{b}} {{ 7*7 }} {% x %} / secret"


def test_render_checks_the_size_before_building_it():
    text = "{{a}}" * 100_000  # 500 KB of template, 100,000 copies of a 1 MB output: 100 GB
    with pytest.raises(TemplateError, match="at most 1000"):
        render(text, {"a": "x" * 2**20}, max_chars=1000)
    assert render("{{a}}!", {"a": "xy"}, max_chars=3) == "xy!"
    with pytest.raises(TemplateError):
        render("{{a}}!", {"a": "xy"}, max_chars=2)


def test_a_node_without_parents_is_never_rendered():
    node = DAG().add_node("a", "literal {{ braces }}").nodes[0]
    assert node.rendered({}) is node


def test_messages_are_rendered_per_content():
    dag = DAG().add_node("a", "x").add_node("b", messages=[
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "{{a}}"},
        {"role": "user", "content": "more"}])
    order = dag.validate()
    rendered = order[1].rendered({"a": "answer"})
    assert [m["content"] for m in rendered.messages] == ["q", "answer", "more"]
    assert order[1].messages[1]["content"] == "{{a}}"  # the DAG's own node is unchanged


def _diamond() -> list:
    return (DAG().add_node("a", "x").add_node("b", "{{a}}").add_node("c", "{{a}}")
            .add_node("d", "{{b}}{{c}}").add_node("e", "other").validate())


def test_schedule_runs_ready_nodes_up_to_the_limit():
    s = Schedule(_diamond())
    assert [n.id for n in s.start(1)] == ["a"]
    assert [n.id for n in s.start(5)] == ["e"]
    assert s.start(5) == []  # b and c wait for a
    s.succeed("a", "A")
    assert [(n.id, n.rendered(s.outputs).prompt) for n in s.start(5)] == [("b", "A"),
                                                                           ("c", "A")]
    s.succeed("b", "B")
    assert s.start(5) == []
    s.succeed("c", "C")
    s.succeed("e", "E")
    assert [(n.id, n.rendered(s.outputs).prompt) for n in s.start(5)] == [("d", "BC")]
    s.succeed("d", "D")
    assert s.finished and not s.failed


def test_continue_skips_only_descendants():
    s = Schedule(_diamond(), on_error="continue")
    s.start(5)
    assert s.fail("a") == ["b", "c", "d"]
    assert not s.stopped and not s.finished
    s.succeed("e", "E")
    assert s.finished and s.skipped == {"b", "c", "d"}


def test_fail_fast_skips_everything_pending():
    s = Schedule(_diamond(), on_error="fail_fast")
    s.start(1)
    assert s.fail("a") == ["e", "b", "c", "d"]  # topological order
    assert s.stopped and s.finished
