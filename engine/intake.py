"""The engine's intake: checking a SeqRequest, and trimming its imported prefix KV to the tokens
the sequence will use.

A prefix arrives as whole blocks [n, L, 2, H, B, D] or a list of n blocks [L, 2, H, B, D] (from
the KV store), optionally followed by a partial tail [L, 2, H, t, D] (t < B), or as one
concatenated [L, 2, H, T, D] tensor.
"""

from __future__ import annotations

import torch

from engine.kv_layout import KVLayout
from engine.sequence import SeqRequest


def check_request(req: SeqRequest, lay: KVLayout, vocab: int, max_model_len: int) -> None:
    """Raise ValueError on a request the engine cannot run."""
    n = len(req.token_ids)
    if not 1 <= req.num_prompt_tokens <= n:
        raise ValueError(f"num_prompt_tokens {req.num_prompt_tokens} not in [1, {n}]")
    if n >= max_model_len:
        raise ValueError(f"{n} tokens leave no room under max_model_len {max_model_len}")
    if min(req.token_ids) < 0 or max(req.token_ids) >= vocab:
        raise ValueError(f"token id out of range [0, {vocab})")
    if req.prefix_kv is not None and req.prefix_len > 0:
        check_prefix(req.prefix_kv, req.prefix_tail, req.prefix_len, n, lay)


def _flat_ok(x: torch.Tensor, lay: KVLayout) -> bool:
    return x.ndim == 5 and (x.shape[0], x.shape[1], x.shape[2], x.shape[4]) == (
        lay.num_layers, 2, lay.num_kv_heads, lay.head_dim)


def check_prefix(
    prefix: torch.Tensor | list[torch.Tensor], tail: torch.Tensor | None, prefix_len: int,
    num_tokens: int, lay: KVLayout,
) -> None:
    """Raise ValueError unless prefix (+ tail) is shaped for `lay` and covers prefix_len."""
    if isinstance(prefix, list):
        if any(tuple(b.shape) != lay.block_shape for b in prefix):
            raise ValueError(f"a prefix block does not match {lay.block_shape}")
        covered = len(prefix) * lay.block_size
    elif prefix.ndim == 6:
        if tuple(prefix.shape[1:]) != lay.block_shape:
            raise ValueError(f"prefix blocks {tuple(prefix.shape)} do not match {lay.block_shape}")
        covered = prefix.shape[0] * lay.block_size
    elif _flat_ok(prefix, lay):
        covered = prefix.shape[3]
    else:
        raise ValueError(f"prefix_kv shape {tuple(prefix.shape)} does not match the KV layout")
    if tail is not None:
        if not _flat_ok(tail, lay):
            raise ValueError(f"prefix_tail shape {tuple(tail.shape)} does not match the KV layout")
        covered += tail.shape[3]
    if not 0 < prefix_len <= min(covered, num_tokens):
        raise ValueError(f"prefix_len {prefix_len} not in [1, {min(covered, num_tokens)}]")


def trim_prefix(
    prefix: torch.Tensor | list[torch.Tensor], tail: torch.Tensor | None, length: int,
    lay: KVLayout,
) -> tuple[torch.Tensor | list[torch.Tensor] | None, torch.Tensor | None]:
    """(blocks, flat) views covering at least tokens [0, length): the blocks first, then flat."""
    if not isinstance(prefix, list) and prefix.ndim == 5:
        flat = prefix if tail is None else torch.cat([prefix, tail.to(prefix.device)], dim=3)
        return None, flat[:, :, :, :length]
    B = lay.block_size
    n = min(len(prefix), -(-length // B))  # whole blocks, the last may pass `length`
    rest = length - n * B
    flat = tail[:, :, :, :rest] if rest > 0 and tail is not None else None
    return prefix[:n], flat


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit` (<= both lengths)."""
    n, step = 0, 256
    while n < limit:
        m = min(limit, n + step)
        if a[n:m] != b[n:m]:  # slices compare in C; walk only the differing one
            while a[n] == b[n]:
                n += 1
            return n
        n = m
    return limit
