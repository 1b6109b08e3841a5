"""Several models behind one router: each request goes to the workers of its own model, and a
worker of a model the router does not serve gets nothing."""

from __future__ import annotations

import httpx

from engine.sampling_params import SamplingParams
from router.dispatch.backend import BackendUnavailable, GenerateRequest
from tests.router.test_dispatch_faults import D1, D2, PROMPT, Workers, ndjson, run

D3 = "http://d3:1"


def _req(model: str) -> GenerateRequest:
    return GenerateRequest(f"req-{model}", model, list(PROMPT),
                           SamplingParams(max_tokens=2, seed=1))


def _workers(models: dict[str, str]) -> Workers:
    def answer(body):
        return httpx.Response(200, content=ndjson([7, 8], 2))

    workers = Workers({url: answer for url in models})
    workers.models = models
    return workers


def test_each_model_goes_to_its_own_workers():
    workers = _workers({D1: "a", D2: "b", D3: "c"})

    async def go(backend):
        for model in ["b", "a", "b", "a"]:
            assert [ev.token_id async for ev in backend.generate(_req(model))] == [7, 8]
        summary = {w["url"]: w["model"] for w in await backend.workers()}
        return summary, await backend.ready()

    summary, ready = run(workers, go, model=["a", "b"], decode_urls=[D1, D2, D3])
    assert workers.paths("/generate") == [D2, D1, D2, D1]  # never D3, whose model is "c"
    assert summary == {D1: "a", D2: "b", D3: None}
    assert ready


def test_a_model_whose_workers_are_all_down_is_unavailable_alone():
    workers = _workers({D1: "a", D2: "b"})
    workers.health_status[D2] = 503

    async def go(backend):
        ok = [ev.token_id async for ev in backend.generate(_req("a"))]
        try:
            [ev async for ev in backend.generate(_req("b"))]
        except BackendUnavailable as e:
            return ok, str(e), await backend.ready()
        raise AssertionError("model b has no worker up")

    ok, error, ready = run(workers, go, model=["a", "b"], decode_urls=[D1, D2])
    assert ok == [7, 8] and "decode" in error
    assert not ready  # /ready: every served model needs a worker
    assert workers.paths("/generate") == [D1]


def test_one_model_takes_every_worker_whatever_it_reports():
    # A router of one model keeps today's behaviour: `--model` spelled differently on the
    # workers (a path vs a registry name) is still the same deployment.
    workers = _workers({D1: "x", D2: "y"})

    async def go(backend):
        return [ev.token_id async for ev in backend.generate(_req("anything"))]

    assert run(workers, go, decode_urls=[D1, D2]) == [7, 8]
