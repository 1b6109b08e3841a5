"""Issue 14's burst: c=64 streamed chats whose KV needs four times the pool's budget, served
by `tandem serve --colocated` as users run it. Every request must succeed (preemption, never
failure), the pool must stay within the budget, and preemptions are counted.

    .venv/bin/python scripts/bench_kv_budget.py [--concurrency 64] [--over 4] [--max-tokens 64]
        [--dtype auto] [--workdir DIR]

The budget is computed from the workload: each request's prompt tokens (the chat template
applied by the model's tokenizer) plus max_tokens (ignore_eos: every request runs to it), in
16-token pages, summed and divided by --over. While the burst runs, the worker's
tandem:kv_pages_used gauge is sampled every 0.2 s for the peak.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoConfig, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import DEFAULT_PAGE_SIZE  # noqa: E402
from engine.kv_layout import DEFAULT_BLOCK_SIZE, KVLayout  # noqa: E402
from engine.loader import materialize  # noqa: E402
from engine.page_pool import PagePool  # noqa: E402
from engine.registry import DEFAULT_MODEL, resolve_model  # noqa: E402
from scripts.bench_peer import run, story  # noqa: E402
from scripts.serving_targets import cpu_flags, default_dtype, tandem_serve  # noqa: E402

P = DEFAULT_PAGE_SIZE


def page_bytes(folder: str, dtype: str) -> int:
    layout = KVLayout.from_config(AutoConfig.from_pretrained(folder), DEFAULT_BLOCK_SIZE,
                                  getattr(torch, dtype))
    return PagePool.page_bytes(layout, P)


def needed_pages(folder: str, prompts: list[list[dict]], max_tokens: int) -> int:
    tok = AutoTokenizer.from_pretrained(folder)
    lengths = [len(tok.apply_chat_template(m, add_generation_prompt=True)) for m in prompts]
    return sum(-(-(n + max_tokens) // P) for n in lengths)


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith(("tandem:kv_pages", "tandem:num_preemptions"))}


def sample_peak(url: str, stop: threading.Event, peak: list[float]) -> None:
    while not stop.wait(0.2):
        with contextlib.suppress(httpx.HTTPError):
            peak[0] = max(peak[0], gauges(url).get("tandem:kv_pages_used", 0.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--over", type=float, default=4.0, help="KV needed / budget")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    dtype = args.dtype or default_dtype()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-kv-budget-"))
    folder = str(materialize(resolve_model(DEFAULT_MODEL)))
    prompts = [story(f"budget.{i}") for i in range(args.concurrency)]
    need = needed_pages(folder, prompts, args.max_tokens) * page_bytes(folder, dtype)
    budget = int(need / args.over)
    server = tandem_serve("tandem-budget", workdir, workdir / "kv", "--colocated",
                          f"--kv-cache-bytes={budget}", f"--max-slots={args.concurrency}",
                          f"--max-queue={args.concurrency}", dtype=dtype)
    with server:
        worker = httpx.get(f"{server.url}/workers", timeout=10).json()["workers"][0]["url"]
        stop, peak = threading.Event(), [0.0]
        sampler = threading.Thread(target=sample_peak, args=(worker, stop, peak), daemon=True)
        sampler.start()
        m = run(server, args.concurrency, prompts, args.max_tokens, ignore_eos=True)
        stop.set()
        sampler.join()
        after = gauges(worker)
    capacity = after["tandem:kv_pages_capacity"]
    pool_bytes = (capacity + 1) * page_bytes(folder, dtype)  # + the null page
    flags = cpu_flags()
    print(f"{DEFAULT_MODEL}, {dtype}, torch {torch.__version__}, {platform.machine()} "
          f"({', '.join(flags)}), nproc {len(os.sched_getaffinity(0))}; c={args.concurrency}, "
          f"max_tokens {args.max_tokens}")
    print(f"KV needed {need / 1e6:.1f} MB = {need / budget:.2f}x the budget {budget / 1e6:.1f} MB"
          f"; pool {pool_bytes / 1e6:.1f} MB ({capacity:.0f} pages + the null page)")
    print(f"{len(prompts) - len(m['errors'])}/{len(prompts)} requests succeeded, "
          f"{m['completion_tokens']} tokens, {m['tok_s']:.1f} tok/s; preemptions "
          f"{after.get('tandem:num_preemptions_total', 0):.0f}; peak pages used "
          f"{peak[0]:.0f} of {capacity:.0f}")
    ok = not m["errors"] and pool_bytes <= budget
    print("burst: " + ("all succeeded within the budget" if ok else f"FAILED {m['errors'][:3]}"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
