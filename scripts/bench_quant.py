"""Weight quantization (--quantization int8 | int4): quality, memory and engine decode speed
against the unquantized model, in one run.

    .venv/bin/python scripts/bench_quant.py [--dtype bfloat16] [--tokens 64] [--steps 32]

For each mode of `--dtype` (none, int8, int4):

    agreement   on bench_kv_quant's 50 chat prompts, greedy for --tokens tokens (ignore_eos),
                through the engine: the share of prompts whose text equals fp32's (unquantized,
                float32: the reference at every dtype), and the mean leading share that does
    ppl delta   perplexity relative to fp32's, teacher-forced on (a) fp32's own greedy texts
                after their prompts and (b) docs/ARCHITECTURE.md's prose in 512-token windows
                (a fixed text nobody generated)
    weights     resident bytes of parameters and buffers
    decode      engine decode tok/s at batch 1 and batch 16 (median step over --steps steps)

and, for int4, the largest difference between the weights Int4Linear multiplies by and the
GGUF's own dequantization of its Q4_1 blocks (q * d + m, fp32).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.engine import Engine, EngineConfig  # noqa: E402
from engine.gguf_q4 import GROUP, read_q4_1  # noqa: E402
from engine.loader import gguf_source, load_model  # noqa: E402
from engine.quant_linear import Int4Linear  # noqa: E402
from engine.quantize import MODES, weight_bytes  # noqa: E402
from engine.registry import DEFAULT_MODEL, resolve_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.sequence import SeqRequest  # noqa: E402
from scripts.bench_kv_quant import agreement, greedy_texts, prompts  # noqa: E402
from scripts.bench_step import median_step_ms  # noqa: E402
from scripts.serving_targets import cpu_flags  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"
WINDOW = 512


@torch.inference_mode()
def nll_of(lm, seqs: list[list[int]], scored_from: list[int]) -> tuple[float, int]:
    """Summed NLL of tokens[scored_from:] of each sequence (one plain forward each), and the
    count of scored tokens."""
    total, n = 0.0, 0
    for ids, start in zip(seqs, scored_from, strict=True):
        logits = lm.model(torch.tensor([ids])).logits[0, :-1].float()  # [T - 1, V]
        lp = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        total -= lp[start - 1:].sum().item()
        n += len(ids) - start
    return total, n


def doc_windows(lm) -> list[list[int]]:
    ids = lm.tokenizer(DOC.read_text()).input_ids
    return [ids[i:i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)][:8]


@torch.inference_mode()
def decode_rate(lm, batch: int, steps: int) -> float:
    """Tokens per second of the engine's decode steps at `batch` rows (median step)."""
    engine = Engine(lm, EngineConfig(max_slots=batch, prefix_caching=False))
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        ids = [1 + i, 2, 3, 4, 5, 6, 7, 8]
        engine.add(SeqRequest(str(i), ids, len(ids), params))
    return batch / median_step_ms(engine, steps, warmup=0) * 1e3


def gguf_difference(lm) -> float:
    """Max |the weight Int4Linear stores - the GGUF's q * d + m| over every projection: its
    scale and zero are kept in the activation dtype, so (q - 8) * scale + zero, in fp32."""
    cfg = lm.model.config
    blocks = read_q4_1(gguf_source(resolve_model(DEFAULT_MODEL)), cfg.num_attention_heads,
                       cfg.num_key_value_heads)
    worst = 0.0
    for name, module in lm.model.named_modules():
        if isinstance(module, Int4Linear):
            q, d, m = blocks[f"{name}.weight"]
            ref = q.float() * d.repeat_interleave(GROUP, 1) + m.repeat_interleave(GROUP, 1)
            scale, zero = module.scales_zeros.float().unbind(-1)  # [in / GROUP, out] each
            mine = ((q.float() - 8) * scale.t().repeat_interleave(GROUP, 1)
                    + zero.t().repeat_interleave(GROUP, 1))
            worst = max(worst, (mine - ref).abs().max().item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    spec = resolve_model(DEFAULT_MODEL)
    ref = load_model(spec, dtype="float32", device="cpu")
    ids = prompts(ref)
    ref_texts = greedy_texts(ref, "auto", ids, args.tokens)
    text_seqs = [p + t for p, t in zip(ids, ref_texts, strict=True)]
    windows = doc_windows(ref)
    base = {"texts": nll_of(ref, text_seqs, [len(p) for p in ids]),
            "doc": nll_of(ref, windows, [1] * len(windows))}
    del ref
    print(f"{DEFAULT_MODEL}, {args.dtype}, torch {torch.__version__} ({', '.join(cpu_flags())}); "
          f"{len(ids)} prompts x {args.tokens} tokens; doc: {len(windows)} x {WINDOW} tokens")
    print("| mode | same text | leading share | ppl delta (own texts) | ppl delta (doc) | "
          "weights | decode b=1 | decode b=16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        lm = load_model(spec, dtype=args.dtype, device="cpu", quantization=mode)
        same, lead = agreement(greedy_texts(lm, "auto", ids, args.tokens), ref_texts)
        deltas = []
        for key, (seqs, starts) in (("texts", (text_seqs, [len(p) for p in ids])),
                                    ("doc", (windows, [1] * len(windows)))):
            total, n = nll_of(lm, seqs, starts)
            deltas.append(math.exp((total - base[key][0]) / n) - 1)
        print(f"| {mode} | {same:.0%} | {lead:.1%} | {deltas[0]:+.2%} | {deltas[1]:+.2%} | "
              f"{weight_bytes(lm.model) / 2**20:.0f} MiB | "
              f"{decode_rate(lm, 1, args.steps):.1f} tok/s | "
              f"{decode_rate(lm, 16, args.steps):.1f} tok/s |", flush=True)
        if mode == "int4":
            print(f"int4 weights vs the GGUF's dequantization: max |diff| "
                  f"{gguf_difference(lm):.3g}")


if __name__ == "__main__":
    main()
