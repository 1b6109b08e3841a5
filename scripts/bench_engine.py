"""Engine vs HF generate(): prefill tok/s and decode tok/s at several batch sizes, one run.

    .venv/bin/python scripts/bench_engine.py [--model M] [--dtype auto] [--batches 1,4,16]

Same model, dtype and device for both. Every figure is the best of --repeat runs (the dev
machines are shared and noisy), and engine and HF runs alternate so drift hits both alike.
Decode rates exclude prefill: HF's is (B * (n - 1)) / (t(generate n) - t(generate 1)); the
engine's is tokens / time over steps that run no prefill. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time

import torch

from engine.device import dtype_name
from engine.engine import Engine, EngineConfig
from engine.loader import LoadedModel, load_model
from engine.registry import DEFAULT_MODEL, resolve_model
from engine.sampling_params import SamplingParams
from engine.sequence import SeqRequest

log = logging.getLogger("bench_engine")


def prompts(loaded: LoadedModel, batch: int, length: int) -> list[list[int]]:
    """`batch` distinct prompts of exactly `length` tokens."""
    text = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(400))
    ids = loaded.tokenizer(text).input_ids
    return [ids[i * 7 : i * 7 + length] for i in range(batch)]


def hf_time(loaded: LoadedModel, batch: list[list[int]], new: int) -> float:
    ids = torch.tensor(batch, device=loaded.device)  # equal lengths: no padding needed
    t = time.perf_counter()
    with torch.inference_mode():
        loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False,
                              pad_token_id=loaded.tokenizer.pad_token_id)
    return time.perf_counter() - t


def engine_run(engine: Engine, batch: list[list[int]], new: int) -> tuple[float, float, int]:
    """(time to the first tokens of all, decode-only time, decode tokens)."""
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(batch):
        engine.add(SeqRequest(f"b{i}", ids, len(ids), params))
    t0 = time.perf_counter()
    prefill_s, decode_s, decode_tokens = 0.0, 0.0, 0
    while engine.has_work():
        before = engine.stats.prefill_tokens
        t = time.perf_counter()
        events = engine.step()
        dt = time.perf_counter() - t
        if engine.stats.prefill_tokens == before:
            decode_s += dt
            decode_tokens += len(events)
        else:
            prefill_s = time.perf_counter() - t0
    return prefill_s, decode_s, decode_tokens


def bench_prefill(loaded, engine, length: int, repeat: int) -> tuple[float, float]:
    batch = prompts(loaded, 1, length)
    hf = eng = float("inf")
    for _ in range(repeat):
        hf = min(hf, hf_time(loaded, batch, 1))
        eng = min(eng, engine_run(engine, batch, 1)[0])
    return length / hf, length / eng


def bench_decode(loaded, engine, bsz: int, length: int, new: int, repeat: int):
    batch = prompts(loaded, bsz, length)
    hf = eng = 0.0
    for _ in range(repeat):
        t_full, t_first = hf_time(loaded, batch, new), hf_time(loaded, batch, 1)
        hf = max(hf, bsz * (new - 1) / (t_full - t_first))
        _, decode_s, tokens = engine_run(engine, batch, new)
        eng = max(eng, tokens / decode_s)
    return hf, eng


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="per sequence, decode runs")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    logging.basicConfig(level="WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(resolve_model(args.model), dtype=args.dtype, device=args.device)
    batches = [int(b) for b in args.batches.split(",")]
    engine = Engine(loaded, EngineConfig(max_slots=max(batches), prefill_chunk=4096))
    rows = []
    hf_p, eng_p = bench_prefill(loaded, engine, args.prefill_tokens, args.repeat)
    rows.append((f"prefill {args.prefill_tokens} tok, batch 1", hf_p, eng_p))
    for bsz in batches:
        hf_d, eng_d = bench_decode(loaded, engine, bsz, args.prompt_tokens, args.new_tokens,
                                   args.repeat)
        rows.append((f"decode, batch {bsz}", hf_d, eng_d))
    print(f"model {loaded.name}, {dtype_name(loaded.dtype)}, {loaded.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print("\n| measure | HF generate tok/s | engine tok/s | engine / HF |")
    print("|---|---:|---:|---:|")
    for name, hf, eng in rows:
        print(f"| {name} | {hf:.1f} | {eng:.1f} | {eng / hf:.2f}x |")
    b1 = next((eng for name, _, eng in rows if name == "decode, batch 1"), None)
    if b1:
        for name, _, eng in rows[2:]:
            print(f"\n{name}: {eng / b1:.1f}x the engine's batch-1 decode rate", end="")
        print()


if __name__ == "__main__":
    main()
