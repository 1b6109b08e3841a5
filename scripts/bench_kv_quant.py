"""KV quantization quality and cost (--kv-dtype int8 | uint4) against exact KV.

    .venv/bin/python scripts/bench_kv_quant.py [--dtype float32] [--tokens 64]
        [--ttft-prompt 2900] [--repeat 5]

On a fixed set of 50 chat prompts (10 topics x 5 asks, below), each run greedy for --tokens
tokens with ignore_eos:

    agreement    the share of prompts whose greedy text equals exact KV's, and the mean share
                 of leading tokens that do
    ppl delta    perplexity of exact KV's greedy text (the model's own), teacher-forced with
                 each format: the prompt prefilled (its own keys exact, as served), then every
                 token decoded over the stored, quantized KV; reported relative to exact
    bytes/token  KV bytes per token, all layers
    cached TTFT  a --ttft-prompt-token prompt whose blocks are in the store (a disk tier, read
                 back through the OS page cache): store read + import + the first token, the
                 median of --repeat

Prints a markdown table and the CPU flags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.engine import Engine, EngineConfig  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.registry import DEFAULT_MODEL, resolve_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.sequence import SeqRequest  # noqa: E402
from engine.step_plan import Chunk  # noqa: E402
from kvstore import KeyNamespace, StoreConfig, block_keys, build_store  # noqa: E402
from scripts.serving_targets import cpu_flags  # noqa: E402

FORMATS = ("auto", "int8", "uint4")
TOPICS = ["the water cycle", "how a bicycle works", "the history of Rome", "photosynthesis",
          "baking bread", "the rules of chess", "how vaccines work", "the French revolution",
          "binary search", "the solar system"]
ASKS = ["Explain {} to a child.", "Write a short essay about {}.", "List five facts about {}.",
        "What do people often get wrong about {}?", "Describe {} in detail."]
DOCS = Path(__file__).resolve().parents[1] / "docs"


def prompts(lm) -> list[list[int]]:
    return [lm.tokenizer.apply_chat_template([{"role": "user", "content": ask.format(t)}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
            for t in TOPICS for ask in ASKS]


def greedy_texts(lm, kv: str, ids: list[list[int]], n: int) -> list[list[int]]:
    engine = Engine(lm, EngineConfig(kv_dtype=kv, max_slots=len(ids), prefix_caching=False))
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(ids):
        engine.add(SeqRequest(str(i), p, len(p), params))
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for e in engine.step():
            out.setdefault(e.seq_id, []).append(e.token_id)
    return [out[str(i)] for i in range(len(ids))]


@torch.inference_mode()
def nll(engine: Engine, prompts: list[list[int]], texts: list[list[int]]) -> float:
    """Summed negative log-likelihood of each text after its prompt, teacher-forced: the
    prompts in one forward, then one decode step per token for all of them, over the engine's
    (possibly quantized) pool. Drives the engine's forward directly: the public API samples,
    and cannot be made to feed given tokens."""
    pool, P = engine.pool, engine.pool.page_size
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # rows longest first
    ps, ts = [prompts[i] for i in order], [texts[i] for i in order]
    tables = [[pool.allocate() for _ in range(-(-(len(p) + len(t)) // P))]
              for p, t in zip(ps, ts, strict=True)]
    try:
        logits = engine._fwd.step([], [], [], [Chunk(tab, 0, p, keep=1)
                                               for tab, p in zip(tables, ps, strict=True)])
        total = 0.0
        for step in range(len(ts[0])):
            targets = torch.tensor([t[step] for t in ts])
            total -= logits.log_softmax(-1).gather(1, targets[:, None]).sum().item()
            if step + 1 < len(ts[0]):
                logits = engine._fwd.step([t[step] for t in ts],
                                          [len(p) + step for p in ps], tables, [])
        return total
    finally:
        for tab in tables:
            pool.release(tab)


def agreement(runs: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    same = sum(a == b for a, b in zip(runs, ref, strict=True)) / len(ref)
    lead = []
    for a, b in zip(runs, ref, strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(b))
        lead.append(first / len(b))
    return same, statistics.mean(lead)


def cached_ttft(lm, kv: str, prompt: list[int], repeat: int, folder: Path) -> float:
    """Median seconds from the store read to the first token, the prompt's blocks stored."""
    source = Engine(lm, EngineConfig(kv_dtype=kv))
    params = SamplingParams(max_tokens=1, temperature=0.0)
    source.add(SeqRequest("src", prompt, len(prompt), params, prefill_only=True))
    while not source.step():
        pass
    B = source.layout.block_size
    full = (len(prompt) - 1) // B
    ns = KeyNamespace(lm.fingerprint, source.layout.name, B)
    keys = block_keys(prompt, ns)[:full]
    blocks = source.export_blocks("src", 0, full)
    store = build_store(StoreConfig(tiers="disk", disk_path=str(folder / kv)))
    store.put_many(dict(zip(keys, blocks, strict=True)))
    times = []
    for r in range(repeat):
        engine = Engine(lm, EngineConfig(kv_dtype=kv, prefix_caching=False))
        start = time.perf_counter()
        got = store.get_many(keys, borrow=True)
        engine.add(SeqRequest(f"r{r}", prompt, len(prompt), params, prefix_kv=got,
                              prefix_len=full * B))
        while not engine.step():
            pass
        times.append(time.perf_counter() - start)
    store.close()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=50, help="the first N of the fixed 50")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ttft-prompt", type=int, default=2900)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    lm = load_model(resolve_model(DEFAULT_MODEL), dtype=args.dtype, device="cpu")
    ids = prompts(lm)[: args.prompts]
    texts = {kv: greedy_texts(lm, kv, ids, args.tokens) for kv in FORMATS}
    print("greedy runs done", file=sys.stderr)
    ref = texts["auto"]
    ppl = {}
    for kv in FORMATS:
        engine = Engine(lm, EngineConfig(kv_dtype=kv, prefix_caching=False))
        total = nll(engine, ids, ref)
        ppl[kv] = float(torch.tensor(total / (len(ref) * args.tokens)).exp())
        print(f"{kv}: ppl {ppl[kv]:.4f}", file=sys.stderr)
    doc = "\n\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    long_prompt = lm.tokenizer(doc).input_ids[: args.ttft_prompt]
    with tempfile.TemporaryDirectory() as folder:
        ttft = {kv: cached_ttft(lm, kv, long_prompt, args.repeat, Path(folder))
                for kv in FORMATS}
    print(f"\nSmolLM2-135M {args.dtype}, {len(ids)} prompts x {args.tokens} tokens, torch "
          f"{torch.__version__}, CPU flags: {cpu_flags()}\n")
    print("| KV | bytes/token | same text | leading tokens agreeing | ppl (own greedy text) | "
          f"ppl delta | cached TTFT, {args.ttft_prompt}-token prompt |")
    print("|---|---|---|---|---|---|---|")
    for kv in FORMATS:
        layout = Engine(lm, EngineConfig(kv_dtype=kv, kv_cache_bytes=1 << 26)).layout
        same, lead = agreement(texts[kv], ref)
        name = f"exact ({args.dtype})" if kv == "auto" else kv
        print(f"| {name} | {layout.token_bytes:,} | {same:.0%} | {lead:.1%} | {ppl[kv]:.4f} | "
              f"{ppl[kv] / ppl['auto'] - 1:+.2%} | {ttft[kv] * 1000:.0f} ms "
              f"({ttft[kv] / ttft['auto']:.2f}x) |")


if __name__ == "__main__":
    main()
