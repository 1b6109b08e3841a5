"""A DAG of prompts: nodes, their dependencies, and the checks that run before any of them.

    dag = DAG()
    dag.add_node("doc", "Summarize: ...")
    dag.add_node("qa", "Summary: {{doc}}\nQuestion: ...", model="refiner")
    order = dag.validate(max_nodes=50, models={"drafter", "refiner"})

A node's parents are its `depends_on` plus every node its text refers to as `{{id}}`
(workflow/template.py). The HTTP form (`POST /v1/dag`), the in-process `LLM` and the HTTP
`Client` all build this same structure, so they agree on what is valid and in which order
nodes run.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from workflow.template import NODE_ID_PATTERN, TemplateError, references, render

DEFAULT_MAX_NODES = 50  # DAGFlowCache's scale; a setting raises or lowers it per deployment
OnError = Literal["fail_fast", "continue"]


class DAGError(ValueError):
    """The DAG is invalid because of `node` (None: the DAG as a whole)."""

    def __init__(self, node: str | None, message: str, code: str):
        super().__init__(f"node {node!r}: {message}" if node is not None else message)
        self.node = node
        self.code = code


@dataclass(slots=True)
class Node:
    """One prompt. Exactly one of `prompt` (raw text) and `messages` (chat turns, each a
    `{"role", "content"}` dict) is set; `params` is the caller's sampling parameters, opaque
    here."""

    id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    depends_on: tuple[str, ...] = ()
    model: str | None = None  # None: the default model
    params: Any = None
    parents: tuple[str, ...] = field(default=(), init=False)  # depends_on + references

    def texts(self) -> list[str]:
        if self.messages is not None:
            return [m.get("content") or "" for m in self.messages]
        return [self.prompt or ""]

    def rendered(self, outputs: dict[str, str], max_chars: int | None = None) -> Node:
        """A copy with every `{{id}}` replaced by that parent's output; the node itself when
        it has no parents (so a plain prompt is never read as a template). Raises
        TemplateError past `max_chars` characters of text in all."""
        if not self.parents:
            return self
        if self.messages is not None:
            budget = max_chars
            msgs = []
            for m in self.messages:
                content = render(m.get("content") or "", outputs, budget)
                budget = None if budget is None else budget - len(content)
                msgs.append({**m, "content": content})
            return replace(self, messages=msgs)
        return replace(self, prompt=render(self.prompt or "", outputs, max_chars))


class DAG:
    """Nodes in the order they were added. `add_node` returns the DAG, so calls chain."""

    def __init__(self, nodes: Sequence[Node] = ()):
        self.nodes: list[Node] = list(nodes)

    def add_node(
        self, id: str, prompt: str | None = None, depends_on: Sequence[str] = (),
        model: str | None = None, params: Any = None, *,
        messages: list[dict[str, str]] | None = None,
    ) -> DAG:
        self.nodes.append(Node(id, prompt, messages, tuple(depends_on), model, params))
        return self

    def __len__(self) -> int:
        return len(self.nodes)

    def validate(self, max_nodes: int = DEFAULT_MAX_NODES,
                 models: Container[str] | None = None) -> list[Node]:
        """The nodes in a topological order (ties keep the order they were added), each with
        its `parents` set. Raises DAGError naming the first offending node. `models`: the
        model names a node may ask for (None: any)."""
        if not self.nodes:
            raise DAGError(None, "a DAG needs at least one node", "empty_dag")
        if len(self.nodes) > max_nodes:
            raise DAGError(self.nodes[max_nodes].id, f"the DAG has {len(self.nodes)} nodes; "
                           f"at most {max_nodes} are allowed", "too_many_nodes")
        ids = _check_ids(self.nodes)
        for node in self.nodes:
            _check_node(node, ids, models)
        return _topological(self.nodes)


def _check_ids(nodes: Sequence[Node]) -> set[str]:
    ids: set[str] = set()
    for node in nodes:
        if not isinstance(node.id, str) or not NODE_ID_PATTERN.match(node.id):
            raise DAGError(str(node.id), "a node id is 1-64 of A-Z a-z 0-9 _ - (not starting "
                           "with -)", "invalid_node_id")
        if node.id in ids:
            raise DAGError(node.id, "two nodes have this id", "duplicate_node")
        ids.add(node.id)
    return ids


def _check_node(node: Node, ids: set[str], models: Container[str] | None) -> None:
    if (node.prompt is None) == (node.messages is None):
        raise DAGError(node.id, "give exactly one of `prompt` and `messages`", "invalid_node")
    if models is not None and node.model is not None and node.model not in models:
        raise DAGError(node.id, f"model {node.model!r} is not served here", "model_not_found")
    refs: list[str] = []
    for text in node.texts():
        try:
            refs += references(text)
        except TemplateError as e:
            raise DAGError(node.id, str(e), "invalid_template") from None
    parents = tuple(dict.fromkeys([*node.depends_on, *refs]))
    for parent in parents:
        if parent == node.id:
            raise DAGError(node.id, "a node cannot depend on itself", "self_dependency")
        if parent not in ids:
            raise DAGError(node.id, f"it refers to {parent!r}, which is not a node of this "
                           "DAG", "unknown_reference")
    node.parents = parents


def _topological(nodes: Sequence[Node]) -> list[Node]:
    """Kahn's algorithm, taking ready nodes in the order they were added."""
    waiting = {n.id: len(n.parents) for n in nodes}
    children: dict[str, list[str]] = {n.id: [] for n in nodes}
    for n in nodes:
        for p in n.parents:
            children[p].append(n.id)
    by_id = {n.id: n for n in nodes}
    ready = [n.id for n in nodes if not n.parents]
    order: list[Node] = []
    while ready:
        nid = ready.pop(0)
        order.append(by_id[nid])
        for child in children[nid]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    if len(order) < len(nodes):
        left = {n.id for n in nodes} - {n.id for n in order}
        stuck = next(n for n in nodes if n.id in left)
        raise DAGError(stuck.id, "it is on a dependency cycle "
                       f"({' -> '.join(_cycle(stuck.id, by_id, left))})", "cycle")
    return order


def _cycle(start: str, by_id: dict[str, Node], left: set[str]) -> list[str]:
    """A cycle through the nodes Kahn's algorithm could not order, for the message: each of
    them waits on a parent that is also left, so walking such parents must come back."""
    path: list[str] = []
    at: dict[str, int] = {}
    nid = start
    while nid not in at:
        at[nid] = len(path)
        path.append(nid)
        nid = next(p for p in by_id[nid].parents if p in left)
    return [*path[at[nid]:], nid]
