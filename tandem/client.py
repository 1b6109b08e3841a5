"""`Client`: the `LLM.generate` interface over HTTP, against `tandem serve` (POST /v1/dag for
DAGs, /v1/completions for plain prompts). Same inputs, same outputs, so code moves between
in-process and served by changing one constructor.

    with Client("http://127.0.0.1:8000") as client:
        outs = client.generate(dag, SamplingParams(temperature=0, max_tokens=64))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import httpx

from engine.sampling_params import SamplingParams
from tandem.llm import NodeFailed, RequestOutput
from workflow.dag import DAG, Node, OnError

# What a node's wire form carries (router/protocol/dag.py); the rest of SamplingParams is
# refused rather than dropped, so a request never silently runs with other parameters.
_WIRE = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
         "frequency_penalty", "repetition_penalty", "guide")
_GUIDE_FIELD = {"json": "guided_json", "regex": "guided_regex", "lark": "guided_grammar"}


class ClientError(RuntimeError):
    """The server refused the request: its status and OpenAI-shaped error."""

    def __init__(self, status: int, error: dict[str, Any]):
        super().__init__(f"{status}: {error.get('message')}")
        self.status = status
        self.code = error.get("code")
        self.param = error.get("param")


def wire_params(params: SamplingParams) -> dict[str, Any]:
    default = SamplingParams()
    unsupported = [f.name for f in fields(params) if f.name not in _WIRE
                   and getattr(params, f.name) != getattr(default, f.name)]
    if unsupported:
        raise ValueError(f"Client cannot send {unsupported} (not part of /v1/dag)")
    out = {name: getattr(params, name) for name in _WIRE}
    guide = out.pop("guide")
    if guide is not None:
        out[_GUIDE_FIELD[guide.kind]] = guide.spec
    return {k: v for k, v in out.items() if v is not None}


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 model: str | None = None, timeout_s: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)
        self.model = model  # plain prompts' model (None: the server's first)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def generate(self, prompts: str | Sequence[str] | DAG, params: SamplingParams | None = None,
                 *, on_error: OnError = "fail_fast", max_concurrency: int | None = None
                 ) -> list[RequestOutput]:
        params = params or SamplingParams()
        if not isinstance(prompts, DAG):
            return self._prompts([prompts] if isinstance(prompts, str) else list(prompts),
                                 params)
        body = {"nodes": [self._node(n, params) for n in prompts.nodes], "on_error": on_error}
        if max_concurrency is not None:
            body["max_concurrency"] = max_concurrency
        nodes = self._post("/v1/dag", body)["nodes"]
        outs = [RequestOutput(n["id"], n.get("text", ""), finish_reason=n.get("finish_reason"),
                              num_cached_tokens=n.get("cached_tokens", 0), model=n["model"],
                              error=(n.get("error") or {}).get("message")) for n in nodes]
        failed = next((o for o, n in zip(outs, nodes, strict=True) if n["status"] == "failed"),
                      None)
        if failed is not None and on_error == "fail_fast":
            raise NodeFailed(failed.seq_id, failed.error or "")
        return outs

    def _node(self, node: Node, params: SamplingParams) -> dict[str, Any]:
        wire: dict[str, Any] = {"id": node.id, "depends_on": list(node.depends_on),
                                **wire_params(node.params or params)}
        if node.model is not None:
            wire["model"] = node.model
        if node.messages is not None:
            wire["messages"] = node.messages
        else:
            wire["prompt"] = node.prompt
        return wire

    def _prompts(self, prompts: list[str], params: SamplingParams) -> list[RequestOutput]:
        model = self.model or self._get("/v1/models")["data"][0]["id"]
        body = {"model": model, "prompt": prompts, **wire_params(params)}
        choices = sorted(self._post("/v1/completions", body)["choices"],
                         key=lambda c: c["index"])
        return [RequestOutput(str(c["index"]), c["text"], finish_reason=c["finish_reason"],
                              model=model) for c in choices]

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._checked(self.http.post(path, json=body))

    def _get(self, path: str) -> dict[str, Any]:
        return self._checked(self.http.get(path))

    @staticmethod
    def _checked(r: httpx.Response) -> dict[str, Any]:
        if r.status_code >= 400:
            try:
                error = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"message": r.text[:500]}
            raise ClientError(r.status_code, error)
        return r.json()
