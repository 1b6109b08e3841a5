"""`LLM`: prompts and DAGs run in process, on the engine directly (no HTTP, no workers).

    from tandem import DAG, LLM, SamplingParams

    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct")
    dag = (DAG().add_node("doc", "Summarize: ...")
                .add_node("qa", "Summary: {{doc}}\\nQ: ...", depends_on=["doc"]))
    for out in llm.generate(dag, SamplingParams(temperature=0, max_tokens=64)):
        print(out.seq_id, out.text)

The interface follows DAGFlowCache's (`LLM(model, share_kv_cache, cpu_offloading)`,
`generate(dag, params)` returning each node's `seq_id` and `text`). Several models load into
one LLM (`LLM(["a", "b"])`, the first the default) and a node picks one with `model=`. Nodes
whose parents are done join one continuous batch per model; a shared prefix is computed once
per model through the engine's prefix cache. Prompts are built exactly as the server builds
them (raw text with the tokenizer's special tokens; messages through the chat template), so a
greedy DAG gives the same text here and through `Client` against `tandem serve`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from engine.cold_kv import HostColdTier
from engine.engine import Engine, EngineConfig
from engine.loader import load_model
from engine.registry import resolve_model
from engine.sampling_params import SamplingParams
from engine.sequence import SeqRequest, TokenEvent
from router.api.chat_prompt import chat_prompt_ids
from router.errors import APIError
from router.protocol.chat import Messages
from workflow.dag import DAG, DEFAULT_MAX_NODES, Node, OnError
from workflow.schedule import Schedule

_MESSAGES = TypeAdapter(Messages)  # the chat endpoint's own message schema


@dataclass(slots=True)
class RequestOutput:
    """One prompt's or one node's result. `seq_id` is the node id (for prompts, its index)."""

    seq_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV was reused, not computed
    model: str = ""
    error: str | None = None  # set when the node failed or was skipped (on_error="continue")


class NodeFailed(RuntimeError):
    """A node of a DAG failed under on_error="fail_fast"."""

    def __init__(self, node: str, message: str):
        super().__init__(f"node {node!r} failed: {message}")
        self.node = node


class LLM:
    def __init__(self, model: str | Sequence[str], *, dtype: str = "auto",
                 device: str | None = None, share_kv_cache: bool = True,
                 cpu_offloading: bool = True, max_slots: int = 32,
                 kv_cache_bytes: int | None = None):
        """`share_kv_cache`: reuse KV across prompts and nodes (the prefix cache);
        `cpu_offloading`: a sequence longer than the KV pool keeps its older KV in host
        memory, streamed back exactly (engine/cold_kv.py), instead of being refused."""
        names = [model] if isinstance(model, str) else list(model)
        self.engines: dict[str, Engine] = {}
        for name in names:
            loaded = load_model(resolve_model(name), dtype=dtype, device=device)
            config = EngineConfig(max_slots=max_slots, prefix_caching=share_kv_cache,
                                  kv_cache_bytes=kv_cache_bytes)
            self.engines[name] = Engine(loaded, config,
                                        HostColdTier() if cpu_offloading else None)
        self.default = names[0]
        self._calls = 0

    def generate(self, prompts: str | Sequence[str] | DAG, params: SamplingParams | None = None,
                 *, on_error: OnError = "fail_fast", max_nodes: int = DEFAULT_MAX_NODES
                 ) -> list[RequestOutput]:
        """One output per prompt, or per node in the DAG's order. A node's own `params`
        override `params`. Raises DAGError for an invalid DAG, NodeFailed when a node fails
        under fail_fast; with on_error="continue" a failed node's output carries `error`."""
        params = params or SamplingParams()
        if isinstance(prompts, DAG):
            return self._run(prompts.nodes, prompts.validate(max_nodes, self.engines), params,
                             on_error)
        # Plain prompts are never templates: no checks, no references, all at once.
        nodes = [Node(str(i), p) for i, p in enumerate([prompts] if isinstance(prompts, str)
                                                       else prompts)]
        return self._run(nodes, nodes, params, "fail_fast")

    def prompt_ids(self, node: Node) -> list[int]:
        """The node's prompt through the server's own code (router/api/planning.py, chat.py),
        so a greedy node reads the same tokens here and served. Raises ValueError or APIError
        on a prompt the server would refuse."""
        tok = self._engine(node.model).loaded.tokenizer
        if node.messages is None:
            return tok.encode(node.prompt, add_special_tokens=True)  # as completion_prompts
        return chat_prompt_ids(tok, _MESSAGES.validate_python(node.messages))

    def _engine(self, model: str | None) -> Engine:
        return self.engines[model or self.default]

    def _run(self, nodes: Sequence[Node], order: Sequence[Node], params: SamplingParams,
             on_error: OnError) -> list[RequestOutput]:
        self._calls += 1  # sequence ids stay unique across calls, whatever node ids repeat
        run = _DagRun(self, Schedule(order, on_error), params, f"llm{self._calls}")
        outputs = run.drive()
        return [outputs[n.id] for n in nodes]


@dataclass(slots=True)
class _DagRun:
    """One generate() call: start ready nodes, step every engine with work, repeat."""

    llm: LLM
    schedule: Schedule
    params: SamplingParams
    prefix: str
    outputs: dict[str, RequestOutput] = field(default_factory=dict)

    def drive(self) -> dict[str, RequestOutput]:
        while not self.schedule.finished:
            for node in self.schedule.start(len(self.schedule.order)):
                self._add(node)
            if self.schedule.running and not any(e.has_work()
                                                 for e in self.llm.engines.values()):
                raise RuntimeError(f"nodes {sorted(self.schedule.running)} are running, yet "
                                   "no engine has work")  # a bug, never a hang
            for engine in self.llm.engines.values():
                if engine.has_work():
                    for ev in engine.step():
                        self._on_token(engine, ev)
                    for seq_id, exc in engine.take_failed():
                        self._fail(self._node_id(seq_id), str(exc))
        return self.outputs

    def _add(self, node: Node) -> None:
        model = node.model or self.llm.default
        self.outputs[node.id] = RequestOutput(node.id, model=model)
        try:
            ids = self.llm.prompt_ids(node.rendered(self.schedule.outputs))
            self.llm.engines[model].add(SeqRequest(
                f"{self.prefix}-{node.id}", ids, len(ids), node.params or self.params))
        except (ValueError, APIError) as exc:  # the engine's or the server's own checks
            self._fail(node.id, str(exc))

    def _node_id(self, seq_id: str) -> str:
        return seq_id[len(self.prefix) + 1:]

    def _on_token(self, engine: Engine, ev: TokenEvent) -> None:
        out = self.outputs[self._node_id(ev.seq_id)]
        if ev.num_cached_tokens is not None:
            out.num_cached_tokens = ev.num_cached_tokens
        out.token_ids.append(ev.token_id)
        if ev.finish_reason is None:
            return
        out.finish_reason = ev.finish_reason
        out.text = engine.loaded.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        self.schedule.succeed(out.seq_id, out.text)

    def _fail(self, node_id: str, message: str) -> None:
        self.outputs[node_id].error = message
        for skipped in self.schedule.fail(node_id):
            self.outputs[skipped] = RequestOutput(skipped, error=f"not run: node {node_id!r} "
                                                  "failed")
        if self.schedule.stopped:
            self._abort_running()
            raise NodeFailed(node_id, message)

    def _abort_running(self) -> None:
        """fail_fast: stop every running node (one started in the same batch as the failed
        node may not have reached its engine yet)."""
        for node_id in list(self.schedule.running):
            out = self.outputs.get(node_id)
            if out is not None:
                self.llm.engines[out.model].abort(f"{self.prefix}-{node_id}")
            self.schedule.cancel(node_id)

