"""HTTP side of the benchmark: model discovery and one timed streaming request."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx

from tandem.bench.config import BenchConfig
from tandem.bench.records import RequestRecord
from tandem.bench.sse import StreamAccumulator, error_message, parse_line
from tandem.bench.workloads import render_prompt

log = logging.getLogger(__name__)

ERROR_BODY_CHARS = 500  # enough for an OpenAI error object, bounded for a peer's HTML page


def make_client(cfg: BenchConfig) -> httpx.AsyncClient:
    """The single client of a benchmark invocation, pooled for the highest concurrency level."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=max(cfg.concurrency),
                          max_keepalive_connections=max(cfg.concurrency))
    # Connect fails fast; reads wait as long as a whole request may take.
    timeout = httpx.Timeout(cfg.timeout_s, connect=10.0)
    return httpx.AsyncClient(base_url=cfg.base_url, headers=headers, limits=limits,
                             timeout=timeout)


async def fetch_model(client: httpx.AsyncClient) -> str | None:
    """The first model id from GET /v1/models, or None if the peer cannot list them."""
    try:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        log.warning("GET /v1/models failed: %s", exc)
        return None


def request_body(cfg: BenchConfig, model: str, messages: list[dict], max_tokens: int) -> dict:
    body: dict = {"model": model}
    if cfg.endpoint == "chat":
        body["messages"] = messages
    else:
        body["prompt"] = render_prompt(messages)
    body |= {
        "max_tokens": max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:  # not an OpenAI field: some peers reject it with a 422, so opt-in only
        body["ignore_eos"] = True
    return body


def _http_error(status: int, raw: bytes) -> str:
    text = raw[:ERROR_BODY_CHARS].decode(errors="replace")
    try:
        detail = error_message(json.loads(text).get("error") or text)
    except (ValueError, AttributeError):
        detail = text
    return f"HTTP {status}: {detail}".strip()


async def _stream(client: httpx.AsyncClient, path: str, body: dict,
                  acc: StreamAccumulator, t0: float) -> None:
    async with client.stream("POST", path, json=body) as resp:
        acc.record.status_code = resp.status_code
        if resp.status_code != 200:
            acc.fail(_http_error(resp.status_code, await resp.aread()))
            return
        kind = resp.headers.get("content-type", "")
        if "text/event-stream" not in kind:
            acc.fail(f"expected text/event-stream, got {kind or 'no content-type'}")
            return
        async for line in resp.aiter_lines():
            payload = parse_line(line)
            if payload is not None:
                acc.feed(payload, time.perf_counter() - t0)


async def send(client: httpx.AsyncClient, cfg: BenchConfig, body: dict,
               record: RequestRecord) -> str:
    """Sends one streaming request, filling `record`; returns the answer text.

    Never raises for a peer's behaviour: transport errors, timeouts and odd payloads all end
    up as record.error, so one bad response cannot stop a benchmark.
    """
    acc = StreamAccumulator(record)
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(_stream(client, cfg.path, body, acc, t0), cfg.timeout_s)
    except TimeoutError:
        acc.fail(f"timed out after {cfg.timeout_s:g} s")
    except Exception as exc:  # any failure of a peer is a measured failure, not a crash
        acc.fail(f"{type(exc).__name__}: {exc}")
    return acc.finish(time.perf_counter() - t0)
