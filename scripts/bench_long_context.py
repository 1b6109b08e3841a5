"""Context beyond the KV budget: decode speed, resident KV and exactness of the streamed path
(engine/cold_kv.py) against all-resident attention, at SmolLM2's full context.

    .venv/bin/python scripts/bench_long_context.py [--dtype float32] [--context 8192]
        [--budgets 4,16] [--rounds 4] [--steps 16] [--disk-memory-mb 8] [--rope-scale 1]

Engines side by side in one process, each given the same prompt (the project's docs, cut so
that prompt + generated tokens = --context), prefilled once, then decoded in alternating rounds
of --steps tokens, so that the machine's noise moves them all alike. Each is reported by its
median decode tok/s over rounds and its ratio to the resident engine's.

    resident      the whole context in the pool (the default budget)
    1/N memory    a KV budget N times smaller than the context needs; cold KV in the worker's
                  cold tier (worker/cold_tier.py) with memory to hold all of it
    1/N disk      the same with a --disk-memory-mb memory tier: nearly every cold segment is
                  read back from the disk tier's files (through the OS page cache); only for
                  the smallest budget, and not at all with --disk-memory-mb 0

--rope-scale F runs SmolLM2 with linear RoPE scaling by F (config.json edited in a copy of the
model folder; max_position_embeddings 8192 * F): no longer-context model is available offline,
and this exercises the mechanics past 8k positions. Its text quality is not the point; the
streamed path must still equal the resident one.

Every cold engine runs its rounds twice, with the next segment prefetched on a thread and with
serial loads (ColdKV.prefetch is read per forward); its budget reserves the prefetcher's three
segments either way. Resident KV is the engine's own measure (EngineStats.kv_peak_bytes: pages
in use plus segments held by the stream, at their peak). The greedy tokens of every engine
must equal the resident engine's, or the script fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.engine import Engine, EngineConfig  # noqa: E402
from engine.kv_layout import KVLayout  # noqa: E402
from engine.loader import load_model, materialize  # noqa: E402
from engine.page_pool import PagePool  # noqa: E402
from engine.registry import DEFAULT_MODEL, resolve_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.sequence import SeqRequest  # noqa: E402
from scripts.serving_targets import cpu_flags  # noqa: E402
from worker.cold_tier import StoreColdTier  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


@dataclass
class Run:
    name: str
    engine: Engine
    stage: str
    budget: int | None = None
    tier: StoreColdTier | None = None
    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    tok_s: dict[str, list[float]] = field(default_factory=dict)

    def steps(self, n: int, prefetch: bool | None) -> float:
        """Decode n tokens; returns tok/s."""
        if self.engine.cold is not None and prefetch is not None:
            self.engine.cold.prefetch = prefetch
        start = time.perf_counter()
        for _ in range(n):
            self.tokens += [e.token_id for e in self.engine.step()]
        return n / (time.perf_counter() - start)


def model_spec(rope_scale: int, folder: Path):
    """The default model, or a copy of its folder with linear RoPE scaling by rope_scale."""
    spec = resolve_model(DEFAULT_MODEL)
    if rope_scale == 1:
        return spec
    source = Path(materialize(spec))
    for f in source.iterdir():
        (folder / f.name).symlink_to(f)
    config = json.loads((source / "config.json").read_text())
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    config["rope_parameters"] = {**rope, "rope_type": "linear", "factor": float(rope_scale)}
    config["max_position_embeddings"] = config["max_position_embeddings"] * rope_scale
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    return resolve_model(str(folder))


def prompt(lm, tokens: int) -> list[int]:
    text = "\n\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    ids = lm.tokenizer(text).input_ids
    if len(ids) < tokens:
        raise SystemExit(f"the docs hold {len(ids)} tokens, fewer than {tokens}")
    return ids[:tokens]


def build(lm, args, ids: list[int], new: int, cold_dir: Path) -> list[Run]:
    per_token = PagePool.page_bytes(KVLayout.from_config(lm.config, 64, lm.dtype), 1)
    runs = [Run("resident", Engine(lm, EngineConfig(prefix_caching=False,
                                                    max_model_len=args.context)), "resident")]
    for div in args.budgets:
        budget = args.context * per_token // div
        for stage, memory in (("memory", 4 << 30), ("disk", args.disk_memory_mb << 20)):
            if stage == "disk" and (div != max(args.budgets) or not memory):
                continue
            tier = StoreColdTier.under(cold_dir, memory, 16 << 30)
            config = EngineConfig(prefix_caching=False, kv_cache_bytes=budget, cold_prefetch=True,
                                  max_model_len=args.context)
            runs.append(Run(f"1/{div} {stage}", Engine(lm, config, tier), stage, budget, tier))
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for run in runs:
        run.engine.add(SeqRequest(run.name, ids, len(ids), params))
        start = time.perf_counter()
        while run.engine.stats.decode_tokens == 0:  # the prompt, and its first token
            run.tokens += [e.token_id for e in run.engine.step()]
        run.prefill_s = time.perf_counter() - start
        print(f"{run.name}: prefill {run.prefill_s:.1f} s", file=sys.stderr)
    return runs


def measure(runs: list[Run], args) -> None:
    modes = {"resident": [None]}
    for run in runs:
        run.steps(4, None)  # warm up
    for r in range(args.rounds):
        for run in runs:
            for mode in modes.get(run.name, [True, False]):
                key = {None: "all", True: "prefetch", False: "serial"}[mode]
                run.tok_s.setdefault(key, []).append(run.steps(args.steps, mode))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)


def report(runs: list[Run], args, lm) -> dict:
    base = statistics.median(runs[0].tok_s["all"])
    rows = []
    for run in runs:
        for mode, values in run.tok_s.items():
            st = run.engine.stats
            tps = statistics.median(values)
            rows.append({
                "engine": run.name, "stage": run.stage, "loads": mode,
                "context": args.context, "budget_mb": run.budget and run.budget / 2**20,
                "peak_resident_mb": st.kv_peak_bytes / 2**20,
                "window_tokens": run.engine.cold and run.engine.cold.window * 16,
                "cold_tokens": st.kv_cold_tokens, "prefill_s": run.prefill_s,
                "tok_s": tps, "slowdown": base / tps,
            })
    rope = f", linear RoPE scaling x{args.rope_scale}" if args.rope_scale > 1 else ""
    print(f"\nSmolLM2-135M{rope} {args.dtype}, context {args.context}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU flags: {cpu_flags()}\n")
    print("| engine | stage | loads | KV budget | peak resident KV | window | prefill s | "
          "decode tok/s | slowdown |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        budget = "all" if r["budget_mb"] is None else f"{r['budget_mb']:.1f} MB"
        window = "-" if r["window_tokens"] is None else str(r["window_tokens"])
        print(f"| {r['engine']} | {r['stage']} | {r['loads']} | {budget} | "
              f"{r['peak_resident_mb']:.1f} MB | {window} | {r['prefill_s']:.1f} | "
              f"{r['tok_s']:.2f} | {r['slowdown']:.2f}x |")
    return {"model": lm.name, "dtype": args.dtype, "cpu_flags": cpu_flags(), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--disk-memory-mb", type=int, default=8)
    ap.add_argument("--rope-scale", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        lm = load_model(model_spec(args.rope_scale, Path(folder)), dtype=args.dtype,
                        device="cpu")
    new = 8 + args.rounds * args.steps * 2
    ids = prompt(lm, args.context - new)
    with tempfile.TemporaryDirectory() as cold_dir:
        runs = build(lm, args, ids, new, Path(cold_dir))
        measure(runs, args)
        out = report(runs, args, lm)
        for run in runs:
            if run.tier is not None:
                run.tier.close()
    ref = runs[0].tokens
    for run in runs[1:]:
        n = min(len(ref), len(run.tokens))
        if run.tokens[:n] != ref[:n]:
            raise SystemExit(f"{run.name}: greedy tokens differ from the resident engine's")
    print(f"\ngreedy tokens of every engine equal the resident engine's ({len(ref)} compared)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
