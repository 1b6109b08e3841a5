"""Engine vs HF generate(): prefill tok/s and decode tok/s at several batch sizes, in one run.

    .venv/bin/python scripts/bench_engine.py [--model M] [--dtype auto] [--batches 1,4,16]
        [--threads N] [--clock wall|cpu]

Same model, dtype and device for both. Every figure is the best of --repeat runs, and engine
and HF runs alternate, so drift on a shared machine hits both alike. `--clock cpu` times this
process's CPU time instead of the wall clock: with `--threads 1` that is nearly immune to other
processes' load (with 2+ threads, waits on a descheduled peer thread would count).

Decode rates exclude prefill: HF's is B * (n - 1) / (t(generate n) - t(generate 1)); the
engine's is tokens / time over the steps that ran no prefill. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.device import dtype_name
from engine.engine import Engine, EngineConfig
from engine.loader import LoadedModel, load_model
from engine.registry import DEFAULT_MODEL, resolve_model
from engine.sampling_params import SamplingParams
from engine.sequence import SeqRequest


def prompts(loaded: LoadedModel, batch: int, length: int) -> list[list[int]]:
    """`batch` distinct prompts of exactly `length` tokens."""
    text = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(400))
    ids = loaded.tokenizer(text).input_ids
    return [ids[i * 7 : i * 7 + length] for i in range(batch)]


@dataclass(slots=True)
class Bench:
    loaded: LoadedModel
    engine: Engine
    clock: Callable[[], float]
    repeat: int

    def hf_time(self, batch: list[list[int]], new: int) -> float:
        ids = torch.tensor(batch, device=self.loaded.device)  # equal lengths: no padding
        t = self.clock()
        with torch.inference_mode():
            self.loaded.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=self.loaded.tokenizer.pad_token_id)
        return self.clock() - t

    def engine_run(self, batch: list[list[int]], new: int) -> tuple[float, float, int]:
        """(time until the last prefill step ended, decode-only time, decode tokens)."""
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        for i, ids in enumerate(batch):
            self.engine.add(SeqRequest(f"b{i}", ids, len(ids), params))
        t0 = self.clock()
        prefill_s, decode_s, decode_tokens = 0.0, 0.0, 0
        while self.engine.has_work():
            before = self.engine.stats.prefill_tokens
            t = self.clock()
            events = self.engine.step()
            if self.engine.stats.prefill_tokens == before:
                decode_s += self.clock() - t
                decode_tokens += len(events)
            else:
                prefill_s = self.clock() - t0
        return prefill_s, decode_s, decode_tokens

    def prefill(self, length: int) -> tuple[float, float]:
        batch = prompts(self.loaded, 1, length)
        hf = eng = float("inf")
        for _ in range(self.repeat):
            hf = min(hf, self.hf_time(batch, 1))
            eng = min(eng, self.engine_run(batch, 1)[0])
        return length / hf, length / eng

    def decode(self, bsz: int, length: int, new: int) -> tuple[float, float]:
        batch = prompts(self.loaded, bsz, length)
        hf = eng = 0.0
        for _ in range(self.repeat):
            t_full, t_first = self.hf_time(batch, new), self.hf_time(batch, 1)
            hf = max(hf, bsz * (new - 1) / (t_full - t_first))
            _, decode_s, tokens = self.engine_run(batch, new)
            eng = max(eng, tokens / decode_s)
        return hf, eng


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="per sequence, decode runs")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level="WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(resolve_model(args.model), dtype=args.dtype, device=args.device)
    batches = [int(b) for b in args.batches.split(",")]
    # Prefix caching off: a repeat must compute its prompt again, not reuse the last run's KV.
    engine = Engine(loaded, EngineConfig(max_slots=max(batches), prefill_chunk=4096,
                                         prefix_caching=False))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    bench = Bench(loaded, engine, clock, args.repeat)
    rows = [(f"prefill {args.prefill_tokens} tok, batch 1", *bench.prefill(args.prefill_tokens))]
    for bsz in batches:
        rows.append((f"decode, batch {bsz}",
                     *bench.decode(bsz, args.prompt_tokens, args.new_tokens)))
    print(f"model {loaded.name}, {dtype_name(loaded.dtype)}, {loaded.device}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"{args.clock} clock, {args.new_tokens} new tokens, prompts of {args.prompt_tokens}")
    print("\n| measure | HF generate tok/s | engine tok/s | engine / HF |")
    print("|---|---:|---:|---:|")
    for name, hf, eng in rows:
        print(f"| {name} | {hf:.1f} | {eng:.1f} | {eng / hf:.2f}x |")
    b1 = next((eng for name, _, eng in rows if name == "decode, batch 1"), None)
    for name, _, eng in rows[1:]:
        if b1 and name != "decode, batch 1":
            print(f"\n{name}: {eng / b1:.1f}x the engine's batch-1 decode rate", end="")
    print()


if __name__ == "__main__":
    main()
