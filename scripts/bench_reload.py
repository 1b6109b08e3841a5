"""A prompt reloaded from the disk tier by a fresh engine: issue 13's after-restart TTFT without
the HTTP hops, split into its parts.

    .venv/bin/python scripts/bench_reload.py [--dtype bfloat16] [--block-tokens 16,64]
        [--prompt 2888] [--shared 2864] [--repeat 3]

One engine computes a --prompt-token prompt and its full blocks go to a disk tier in a temporary
folder (written once per block size). Then, --repeat times per block size, a new store and a new
engine (a fresh pool, as after a restart) take another prompt that shares its first --shared
tokens: `load` reads the shared full blocks from the disk tier (page cache), `place` imports them
into the pool, `forward` computes the rest of the prompt and samples its first token. The
defaults are the chat of scripts/bench_peer_ttft.py: ~2,900 tokens, of which the document and the
chat template (~2,864) are shared with the earlier question.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.engine import Engine, EngineConfig  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.registry import DEFAULT_MODEL, resolve_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.sequence import SeqRequest  # noqa: E402
from kvstore import KeyNamespace, block_keys  # noqa: E402
from kvstore.config import StoreConfig, build_store  # noqa: E402


def timers(engine: Engine) -> dict[str, float]:
    """Wrap the engine's import and forward with timers (seconds, summed per step)."""
    times: dict[str, float] = {"place": 0.0, "forward": 0.0}

    def wrap(obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[label] += time.perf_counter() - start
        setattr(obj, name, timed)

    wrap(engine._kv, "place", "place")  # noqa: SLF001 (a benchmark looks inside)
    wrap(engine, "_forward", "forward")  # noqa: SLF001
    return times


def reload_once(lm, folder: str, keys: list[str], ids: list[int], B: int) -> dict[str, float]:
    engine = Engine(lm, EngineConfig(block_size=B))
    times = timers(engine)
    start = time.perf_counter()
    blocks = build_store(StoreConfig(tiers="memory+disk", disk_path=folder)).get_many(
        keys, borrow=True, retain=False)  # as worker/sequence.py's load_prefix
    times["load"] = time.perf_counter() - start
    assert all(b is not None for b in blocks), "a block is missing from the disk tier"
    engine.add(SeqRequest("b", ids, len(ids), SamplingParams(max_tokens=1, temperature=0.0),
                          prefix_kv=blocks, prefix_len=len(keys) * B))
    while not (events := engine.step()):
        pass
    times["total"] = time.perf_counter() - start
    assert events[0].num_cached_tokens == len(keys) * B, "the engine did not take the blocks"
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--block-tokens", default="16,64")
    ap.add_argument("--prompt", type=int, default=2888)
    ap.add_argument("--shared", type=int, default=2864)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    lm = load_model(resolve_model(DEFAULT_MODEL), dtype=args.dtype, device="cpu")
    first = [100 + (i * 37) % 20000 for i in range(args.prompt)]
    second = first[:args.shared] + [7 + i for i in range(args.prompt - args.shared)]
    with tempfile.TemporaryDirectory() as folder:
        for B in map(int, args.block_tokens.split(",")):
            source = Engine(lm, EngineConfig(block_size=B))
            source.add(SeqRequest("a", first, len(first), SamplingParams(max_tokens=1)))
            while not source.step():
                pass
            n = args.shared // B
            ns = KeyNamespace("bench-reload", source.layout.store_dtype, B)
            keys = block_keys(first, ns)[:n]
            build_store(StoreConfig(tiers="disk", disk_path=folder)).put_many(
                dict(zip(keys, source.export_blocks("a", 0, n).unbind(0), strict=True)))
            runs = [reload_once(lm, folder, keys, second, B) for _ in range(args.repeat)]
            cells = ", ".join(f"{k} {statistics.median(r[k] for r in runs) * 1e3:.0f} ms"
                              for k in ("load", "place", "forward", "total"))
            print(f"{args.dtype} B={B}: {n * B} of {len(second)} tokens loaded, "
                  f"{len(second) - n * B} computed; medians of {args.repeat}: {cells}", flush=True)


if __name__ == "__main__":
    main()
