"""Engine configuration, counters, and what the engine reads from a model's config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_layout import DEFAULT_BLOCK_SIZE

_DEFAULT_MAX_LEN = 8192  # tokens; caps max_model_len by default to bound KV memory
# vLLM's 16-token pages: fine-grained prefix sharing, and a row gathers < 16 keys it masks out.
DEFAULT_PAGE_SIZE = 16


@dataclass(slots=True)
class EngineConfig:
    max_slots: int = 32  # sequences running at once (vLLM's max_num_seqs)
    max_model_len: int | None = None  # None: min(max_position_embeddings, 8192)
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per exported/imported KV block
    prefill_chunk: int = 512  # prefill tokens per step, across waiting sequences
    seed: int | None = None  # seeds the draws of rows without their own seed
    page_size: int = DEFAULT_PAGE_SIZE  # tokens per page of the engine's KV pool
    # The pool's budget: kv_cache_bytes if set, else kv_cache_fraction of the device's free
    # memory (see engine/kv_budget.py for the defaults when neither is set).
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float | None = None
    # Keep finished sequences' full pages findable for later ones (vLLM's
    # enable_prefix_caching); off, every prompt is computed (benchmarks that repeat one).
    prefix_caching: bool = True
    # "auto": KV in the model's dtype; "int8" | "uint4": quantized per token and head, for the
    # pool, the store and the handoff alike (engine/kv_quant.py).
    kv_dtype: str = "auto"
    # With a cold tier (Engine(cold_tier=...)), the tokens of KV one sequence keeps in the pool;
    # beyond that its older pages go cold and attention streams them (engine/cold_kv.py).
    # None: three quarters of the pool.
    kv_window: int | None = None
    # Load the next cold segment on a thread while one is attended over. None: on CUDA only,
    # where the copy is a DMA that overlaps; on CPU the load is itself CPU work competing with
    # the forward's threads, measured slower (docs/BENCHMARKS.md, "Context beyond the budget").
    cold_prefetch: bool | None = None
    # Decode-only steps through torch.compile (engine/compiled_step.py): faster at small
    # batches, not bit-exact (vLLM's top-5 rule, docs/BENCHMARKS.md); compiled as the engine starts.
    compile_decode: bool = False


@dataclass(slots=True)
class EngineStats:
    """Monotonic counters since construction (a metrics exporter can read them)."""

    steps: int = 0
    prefill_tokens: int = 0  # tokens fed by prefill forwards
    decode_tokens: int = 0  # tokens fed by batched decode forwards
    kv_copies: int = 0  # page copies (copy-on-write of a shared partial page)
    prefix_device_tokens: int = 0  # prompt tokens whose KV was found in the page pool
    prefix_store_tokens: int = 0  # prompt tokens whose KV was imported (from the store)
    preemptions: int = 0  # sequences evicted from the pool to make room (then recomputed)
    shared_prefix_waits: int = 0  # steps a prompt waited for its prefix to be computed once
    kv_cold_tokens: int = 0  # tokens of KV moved from the pool to the cold tier
    kv_shrinks: int = 0  # times a full pool sent a sequence's pages cold instead of preempting
    # The most KV bytes resident at once: referenced pages plus the cold segments a step held.
    kv_peak_bytes: int = 0


@dataclass(slots=True)
class KVUsage:
    """The page pool's occupancy (gauges; engine/page_pool.py has the states)."""

    pages: int  # pages sequences can hold
    used: int  # in some sequence's page table
    cached: int  # free, but still findable by the prefix cache
    page_size: int  # tokens per page


def default_max_len(mcfg) -> int:
    """min(max_position_embeddings, 8192), and no longer than a sliding window: the engine's
    masks are full causal, which equals sliding-window attention only inside the window."""
    limit = min(getattr(mcfg, "max_position_embeddings", None) or _DEFAULT_MAX_LEN,
                _DEFAULT_MAX_LEN)
    window = getattr(mcfg, "sliding_window", None)
    if window and getattr(mcfg, "use_sliding_window", True):
        limit = min(limit, window)
    return limit


def eos_ids(model: torch.nn.Module) -> frozenset[int]:
    """EOS ids from the model config and generation_config (each an int, a list or None)."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (model.config, gen):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return frozenset(ids)
