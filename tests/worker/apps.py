"""Real worker apps in process: the tiny random Llama, a memory (or shared disk) store, driven
through Starlette's TestClient (it runs the lifespan: model, engine thread, store)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from starlette.testclient import TestClient

from decode_worker.app import create_app as create_decode_app
from engine.sampling_params import SamplingParams
from prefill_worker.app import create_app as create_prefill_app
from worker.runtime import Worker
from worker.settings import WorkerSettings

BLOCK = 16  # small blocks: a prompt of a few dozen tokens spans blocks and a tail
PROMPT = [5, 17, 230, 1200, 41, 9, 77, 3, 12, 400] * 4  # 40 tokens: 2 blocks + an 8-token tail


def settings(model: Path, **kw) -> WorkerSettings:
    base = dict(model=str(model), dtype="float32", device="cpu", store_tiers="memory",
                block_size=BLOCK, max_slots=4, max_queue=4, max_model_len=512)
    return WorkerSettings(_env_file=None, **(base | kw))


@contextmanager
def client(role: str, model: Path, **kw):
    create = create_prefill_app if role == "prefill" else create_decode_app
    with TestClient(create(settings(model, **kw)), raise_server_exceptions=False) as c:
        yield c


def worker_of(c: TestClient) -> Worker:
    return c.app.state.worker


def params(max_tokens: int = 4, **kw) -> dict:
    p = SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                          **kw})
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


def decode_body(rid: str, tokens: list[int], n_prompt: int | None = None, **kw) -> dict:
    return {"request_id": rid, "token_ids": tokens, "params": params(),
            "num_prompt_tokens": len(tokens) if n_prompt is None else n_prompt} | kw


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]
