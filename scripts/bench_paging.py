"""The cost of paging: decode attention over page tables against the dense cache it replaced.

    .venv/bin/python scripts/bench_paging.py [--dtype bfloat16,float32] [--rows 1,16,64]
        [--context 128,512,2048] [--repeat 50]

Times one decode step's attention over all of SmolLM2-135M's layers (30 layers, 9 query heads,
3 KV heads, head_dim 64) with random K/V, the two ways:

    dense  the slot cache's path: K/V of every row contiguous [n, H, T, D], transformers' SDPA
           function under the batch mask (batch 1: unmasked), as the engine ran before paging
    paged  the engine's path now (engine/step_plan.py): each row's 16-token pages scattered
           over a pool, an index_select gather per layer for K and one for V into the
           engine's reused workspace, then attention with the query heads packed per KV head
           (batch 1: transformers' SDPA function)
    run    batch 1 only: the row's pages consecutive in the pool, read in place (a view, no
           gather), which is what a lone sequence gets while its pages come fresh

Prints ms per step for each and paged / dense. Both attend over the same keys (every row has the
same context, so no grouping is involved) and their outputs are checked equal.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.step_plan import (  # noqa: E402
    Keys,
    Workspace,
    decode_attention,
    decode_mask,
)
from scripts.serving_targets import cpu_flags  # noqa: E402

LAYERS, HQ, H, D, P = 30, 9, 3, 64, 16


class _Attn:  # what transformers' SDPA function reads off an attention module
    num_key_value_groups = HQ // H
    is_causal = True
    training = False


def _case(dtype: torch.dtype, n: int, T: int) -> dict:
    g = torch.Generator().manual_seed(0)
    pages = T // P
    num = n * pages + 1
    kv = torch.randn(2, num, P, H, D, generator=g).to(dtype)  # one layer's pool
    order = (torch.randperm(num - 1, generator=g) + 1).tolist()  # scattered, never page 0
    tables = [order[i * pages:(i + 1) * pages] for i in range(n)]
    keys = Keys.of(tables, pages, T, torch.device("cpu"))
    dense_k, dense_v = (x.contiguous() for x in keys.read(kv, None))
    q = torch.randn(n, HQ, 1, D, generator=g).to(dtype)
    mask = decode_mask([T] * n, T, dtype, torch.device("cpu")) if n > 1 else None
    run = Keys.of([list(range(1, pages + 1))], pages, T, torch.device("cpu")) if n == 1 else None
    return dict(q=q, kv=kv, keys=keys, run=run, dense_k=dense_k, dense_v=dense_v, mask=mask,
                ws=Workspace())


def dense(c: dict) -> torch.Tensor:
    out, _ = sdpa_attention_forward(_Attn(), c["q"], c["dense_k"], c["dense_v"], c["mask"],
                                    scaling=D ** -0.5)
    return out


def _paged(c: dict, keys: Keys) -> torch.Tensor:
    k, v = keys.read(c["kv"], c["ws"])
    return decode_attention(sdpa_attention_forward, _Attn(), c["q"], k, v, c["mask"],
                             {"scaling": D ** -0.5})


def paged(c: dict) -> torch.Tensor:
    return _paged(c, c["keys"])


def run(c: dict) -> torch.Tensor:
    return _paged(c, c["run"])


def per_step_ms(fn, c: dict, repeat: int) -> float:
    for _ in range(3):
        fn(c)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn(c)
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best * LAYERS * 1e3  # one call per layer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16,float32")
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--context", default="128,512,2048")
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args(argv)
    flags = cpu_flags()
    print(f"torch {torch.__version__}, {platform.machine()} ({', '.join(flags)}), "
          f"{torch.get_num_threads()} threads, nproc {len(os.sched_getaffinity(0))}")
    print("| dtype | rows | context | dense ms/step | paged ms/step | paged / dense "
          "| run ms/step | run / dense |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.dtype.split(","):
        dtype = getattr(torch, name)
        for n in (int(x) for x in args.rows.split(",")):
            for T in (int(x) for x in args.context.split(",")):
                c = _case(dtype, n, T)
                with torch.inference_mode():
                    assert torch.equal(dense(c), paged(c)), (name, n, T)
                    a, b = per_step_ms(dense, c, args.repeat), per_step_ms(paged, c, args.repeat)
                    r = per_step_ms(run, c, args.repeat) if c["run"] is not None else None
                tail = "- | -" if r is None else f"{r:.2f} | {r / a:.2f}x"
                print(f"| {name} | {n} | {T} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {tail} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
