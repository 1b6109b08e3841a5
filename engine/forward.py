"""Model forwards over the slot cache, through the unmodified transformers model code.

transformers decoders (Llama, Qwen2, Mistral, ...) call `cache.update(k, v, layer)` once per
layer and attend over whatever it returns, under the 4D mask we pass (used as is;
needs attn_implementation "sdpa", as the loader sets, or "eager"). `StepCache` is that hook: it
writes each row's new K/V into its slot at the row's own position and returns views of the slot
buffers, so there is no DynamicCache-style concatenation.

This is the engine's seam to transformers' model code. The forward kwarg that takes the cache
is read from the model's signature once (`cache`, or `past_key_values` before transformers
renamed it), and every forward checks that `update` ran once per layer: a model that ignored
our cache would build its own and return wrong logits without complaint.

Two kinds of forward:

- prefill: one sequence, tokens [start, start + t) of slot s. From position 0 no mask is passed,
  so SDPA runs its causal kernel (`is_causal=True`), about 2x faster on CPU than the same
  attention under an explicit mask; a chunk over a cached prefix gets an explicit [1, 1, t, kv]
  mask.
- decode: one token for each of the slots [0, n), row i at position pos[i], under an explicit
  [n, 1, 1, kv] mask that hides each row's positions past its own length.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from engine.cache import SlotKVCache


@dataclass(slots=True)
class StepPlan:
    """Where this forward's new K/V go. Prefill: one slot. Decode: rows = slots [0, n)."""

    start: int = 0  # position of the first new token (decode: of row 0, for the n == 1 case)
    slot: int = 0  # prefill: the sequence's slot
    positions: torch.Tensor | None = None  # decode: [n] write position per row
    rows: torch.Tensor | None = None  # decode: [n] arange, the rows' slots
    kv_len: int = 0  # decode: keys returned per row (max position + 1)


class _SlotLayer(CacheLayerMixin):
    """Answers the size questions transformers' mask code asks; `StepCache.update` does the work."""

    is_sliding = False

    def __init__(self, owner: StepCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise AssertionError("StepCache.update handles every layer")

    def get_seq_length(self) -> int:
        return self.owner.plan.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only asked when we pass no mask: a prefill from position 0 (kv == q, so transformers
        # skips the mask under SDPA and uses is_causal) or a batch-1 decode (one query, all of
        # its keys). Under eager attention transformers builds the same mask from these sizes.
        return self.owner.plan.start + query_length, 0

    def get_max_length(self) -> int:
        return self.owner.slot_cache.max_len


class StepCache(Cache):
    """A transformers `Cache` over the slot buffers, re-aimed by `plan` before each forward."""

    def __init__(self, slot_cache: SlotKVCache):
        self.slot_cache = slot_cache
        self.plan = StepPlan()
        self.updates = 0  # update() calls since the forward began; Forward checks == num_layers
        super().__init__(layers=[_SlotLayer(self) for _ in range(slot_cache.layout.num_layers)])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states, value_states: [B, H, q, D]
        self.updates += 1
        k_buf, v_buf = self.slot_cache.kv[layer_idx]  # each [S, H, T, D]
        p = self.plan
        if p.positions is None:
            t = key_states.shape[2]
            k_buf[p.slot, :, p.start : p.start + t] = key_states[0]
            v_buf[p.slot, :, p.start : p.start + t] = value_states[0]
            if p.start == 0:  # nothing cached before: attend to exactly the new tokens
                return key_states, value_states
            end = p.start + t
            return k_buf[p.slot : p.slot + 1, :, :end], v_buf[p.slot : p.slot + 1, :, :end]
        # Row i writes its one new token at positions[i]: two advanced indices around a slice
        # select [n, H, D], which is the new token's [n, H, 1, D] without the q axis.
        k_buf[p.rows, :, p.positions] = key_states[:, :, 0]
        v_buf[p.rows, :, p.positions] = value_states[:, :, 0]
        n = key_states.shape[0]
        return k_buf[:n, :, : p.kv_len], v_buf[:n, :, : p.kv_len]


def chunk_mask(start: int, t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, t, start + t] additive mask: query i (position start + i) sees keys <= start + i."""
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    k_pos = torch.arange(start + t, device=device)[None, :]
    mask = torch.zeros(t, start + t, dtype=dtype, device=device)
    mask.masked_fill_(k_pos > q_pos, torch.finfo(dtype).min)
    return mask[None, None]


def decode_mask(positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, 1, 1, kv_len] additive mask: row i sees keys at positions <= positions[i]."""
    k_pos = torch.arange(kv_len, device=positions.device)[None, :]
    mask = torch.zeros(positions.shape[0], kv_len, dtype=dtype, device=positions.device)
    mask.masked_fill_(k_pos > positions[:, None], torch.finfo(dtype).min)
    return mask[:, None, None, :]


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which `model.forward` takes a Cache: `cache`, else `past_key_values`.

    transformers 5.x renamed `past_key_values` to `cache` and keeps the old name only as a
    deprecated alias (a FutureWarning per call, until its removal). Passing a name the model
    does not know would land in **kwargs and be ignored, so a model naming neither is refused.
    """
    params = inspect.signature(model.forward).parameters
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for name in ("cache", "past_key_values"):
        if name in params and params[name].kind in named:
            return name
    raise TypeError(
        f"{type(model).__name__}.forward has neither a `cache` nor a `past_key_values` "
        "parameter, so it cannot take the engine's KV cache (unsupported transformers version?)"
    )


class Forward:
    """Runs the model over the slot cache. Returns float32 logits."""

    def __init__(self, model: torch.nn.Module, slot_cache: SlotKVCache):
        self.model = model
        self.slot_cache = slot_cache
        self.cache = StepCache(slot_cache)
        self.cache_kwarg = cache_kwarg(model)
        self.dtype = slot_cache.layout.dtype

    def prefill(
        self, slot: int, token_ids: list[int], start: int, all_logits: bool
    ) -> torch.Tensor:
        """Feed tokens at [start, start + t) of `slot`. Returns logits [t, V], or [1, V] (last)."""
        t = len(token_ids)
        dev = self.slot_cache.device
        self.slot_cache.reserve(length=start + t)
        self.cache.plan = StepPlan(start=start, slot=slot)
        ids = torch.tensor([token_ids], device=dev)  # [1, t]
        pos = torch.arange(start, start + t, device=dev)[None]  # [1, t]
        mask = None if start == 0 else chunk_mask(start, t, self.dtype, dev)
        logits = self._run(ids, pos, mask, logits_to_keep=0 if all_logits else 1)
        return logits[0].float()

    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token per row for slots [0, n); row i's token sits at positions[i]. -> [n, V]."""
        n = len(token_ids)
        dev = self.slot_cache.device
        kv_len = max(positions) + 1
        self.slot_cache.reserve(length=kv_len)
        pos = torch.tensor(positions, device=dev)  # [n]
        self.cache.plan = StepPlan(
            start=kv_len - 1, positions=pos, rows=torch.arange(n, device=dev), kv_len=kv_len
        )
        # One row attending to all of its kv_len keys needs no mask: the same SDPA call as HF's
        # batch-1 decode, so batch-1 output matches generate() bit for bit.
        mask = None if n == 1 else decode_mask(pos, kv_len, self.dtype)
        ids = torch.tensor(token_ids, device=dev)[:, None]  # [n, 1]
        logits = self._run(ids, pos[:, None], mask, logits_to_keep=1)  # [n, 1, V]
        return logits[:, -1].float()

    def _run(self, ids, pos, mask, logits_to_keep: int) -> torch.Tensor:
        """One model forward through `self.cache`; raises unless every layer wrote through it."""
        self.cache.updates = 0
        # use_cache=True is transformers' documented way to pass a cache in (cache_utils'
        # examples); None would fall back to config.use_cache, which some checkpoints set False.
        out = self.model(
            input_ids=ids,
            position_ids=pos,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_kwarg: self.cache},
        )
        want = self.slot_cache.layout.num_layers
        if self.cache.updates != want:
            raise RuntimeError(
                f"{type(self.model).__name__}.forward called StepCache.update "
                f"{self.cache.updates} times, expected {want} (once per layer): the model "
                f"bypassed the engine's KV cache (passed as `{self.cache_kwarg}=`), so its "
                "logits are wrong. Check the transformers version (see README)."
            )
        return out.logits
