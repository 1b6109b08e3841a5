"""Engine configuration, counters, and what the engine reads from a model's config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_layout import DEFAULT_BLOCK_SIZE

_DEFAULT_MAX_LEN = 8192  # tokens; caps max_model_len by default to bound KV memory


@dataclass(slots=True)
class EngineConfig:
    max_slots: int = 32  # sequences holding KV at once
    max_model_len: int | None = None  # None: min(max_position_embeddings, 8192)
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per exported/imported KV block
    prefill_chunk: int = 512  # prefill tokens per step, across waiting sequences
    seed: int | None = None  # seeds the draws of rows without their own seed
    # Keep the last finished sequence's KV in its slot (evicted first when a slot is needed),
    # so a next request sharing its tokens (same tenant) starts from it without a store load.
    retain_finished: bool = True


@dataclass(slots=True)
class EngineStats:
    """Monotonic counters since construction (a metrics exporter can read them)."""

    steps: int = 0
    prefill_tokens: int = 0  # tokens fed by prefill forwards
    decode_tokens: int = 0  # tokens fed by batched decode forwards
    kv_copies: int = 0  # whole-sequence KV copies between slots (compaction, fork)


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
