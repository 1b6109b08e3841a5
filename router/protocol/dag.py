"""POST /v1/dag: a DAG of prompts in one request (workflow/dag.py), its response and its events.

Each node is a completion (`prompt`) or a chat turn (`messages`) with the sampling fields of
those endpoints; `{{id}}` in its text is that parent's output. Unknown fields are refused here,
unlike the OpenAI endpoints: this API is ours, and a misspelt `depends_on` would otherwise
silently run nodes in the wrong order.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from router.protocol.chat import ChatCompletionRequest, Messages
from router.protocol.common import (
    CacheSalt,
    ErrorDetail,
    Flag,
    MinP,
    ModelName,
    Penalty,
    RepetitionPenalty,
    Seed,
    Stop,
    Temperature,
    Text,
    TopK,
    TopP,
    Usage,
)
from router.protocol.completions import CompletionRequest
from router.protocol.structured import (
    GuidedChoice,
    GuidedGrammar,
    GuidedJson,
    GuidedRegex,
    ResponseFormat,
)
from workflow.dag import Node

# The schema's own cap on nodes; the served limit is the `dag_max_nodes` setting (default 50),
# checked with a message naming the first node past it. This one only bounds parsing.
MAX_DAG_NODES = 1000
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
             "presence_penalty", "frequency_penalty", "repetition_penalty", "response_format",
             "guided_json", "guided_regex", "guided_choice", "guided_grammar")


class DagNode(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    id: StrictStr = Field(description="1-64 of A-Z a-z 0-9 _ -; `{{id}}` in a later node's "
                          "text is this node's output")
    model: ModelName | None = Field(None, description="default: the server's first model")
    prompt: Text | None = Field(None, description="raw text (exactly one of prompt, messages)")
    messages: Messages | None = Field(None, description="chat turns, through the model's "
                                      "chat template")
    depends_on: list[StrictStr] = Field(
        default_factory=list, max_length=MAX_DAG_NODES,
        description="nodes that must finish first (those its text refers to are added)")
    max_tokens: int | None = Field(None, ge=1, description="default: as /v1/completions (16) "
                                   "or /v1/chat/completions (what the context leaves)")
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    seed: Seed = None
    stop: Stop = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    repetition_penalty: RepetitionPenalty = None
    # Structured output, as /v1/chat/completions and /v1/completions take it (one of them).
    response_format: ResponseFormat | None = None
    guided_json: GuidedJson = None
    guided_regex: GuidedRegex = None
    guided_choice: GuidedChoice = None
    guided_grammar: GuidedGrammar = None

    def node(self) -> Node:
        """The workflow node (chat contents flattened to text, where references live)."""
        messages = None if self.messages is None else [
            {"role": m.role, "content": m.text()} for m in self.messages]
        return Node(self.id, self.prompt, messages, tuple(self.depends_on), self.model)

    def request(self, rendered: Node, model: str, cache_salt: str | None
                ) -> CompletionRequest | ChatCompletionRequest:
        """The node as the OpenAI request it stands for, with its parents' outputs filled in:
        it is checked and run exactly as that request would be."""
        fields: dict[str, Any] = self.model_dump(include=set(_SAMPLING), exclude_unset=True,
                                                 by_alias=True)
        fields |= {"model": model, "cache_salt": cache_salt}
        if rendered.messages is not None:
            return ChatCompletionRequest.model_validate({"messages": rendered.messages, **fields})
        return CompletionRequest.model_validate({"prompt": rendered.prompt, **fields})


class DagRequest(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    nodes: list[DagNode] = Field(min_length=1, max_length=MAX_DAG_NODES)
    stream: Flag = Field(False, description="server-sent events per node: node.started, "
                         "node.delta, node.done, node.error, then dag.done")
    on_error: Literal["fail_fast", "continue"] = Field(
        "fail_fast", description="fail_fast: a failed node cancels the rest; continue: only "
        "its descendants are skipped")
    max_concurrency: int | None = Field(None, ge=1, description="nodes running at once "
                                        "(default and cap: the server's dag_max_concurrency)")
    cache_salt: CacheSalt = None


class DagTimings(BaseModel):
    started_s: float = Field(description="seconds from the DAG's start to the node's")
    ttft_s: float | None = Field(None, description="from the node's start to its first token")
    total_s: float = Field(description="from the node's start to its end")


class DagNodeResult(BaseModel):
    id: str
    model: str
    status: Literal["done", "failed", "skipped", "cancelled"]
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    cached_tokens: int = Field(0, description="prompt tokens whose KV was reused")
    timings: DagTimings | None = None
    error: ErrorDetail | None = None


class DagResponse(BaseModel):
    id: str
    object: Literal["dag"] = "dag"
    created: int
    nodes: list[DagNodeResult] = Field(description="in the request's order")
    usage: Usage = Field(description="summed over the nodes that ran")


class DagEvent(BaseModel):
    """One SSE event of a streamed DAG: `data: <DagEvent JSON>`."""

    type: Literal["node.started", "node.delta", "node.done", "node.error", "dag.done"]
    id: str | None = Field(None, description="the node (absent on dag.done)")
    delta: str | None = None
    node: DagNodeResult | None = Field(None, description="on node.done and node.error")
    dag: DagResponse | None = Field(None, description="on dag.done")
