"""Attention over keys in parts, merged exactly by log-sum-exp (flash-decoding's split-KV).

For one query row and keys split into parts 1..n, softmax attention is

    out = sum_i exp(lse_i - lse) * out_i,    lse = log sum_i exp(lse_i)

where out_i is attention over part i alone (softmax within the part) and lse_i the log-sum-exp
of that part's scores. So a sequence whose keys do not all fit in memory at once can attend
over them a part at a time (resident pages, then cold blocks streamed in) and get the output
of attention over all of them, up to float rounding. Outputs are merged in fp32.

On CPU a part without an explicit mask runs torch's fused flash-attention kernel, which returns
the log-sum-exp with the output (in the KV dtype, accumulating in fp32): measured on the 2-vCPU
AMD box in fp32, 1024 queries over 6000 keys took 117 ms against 754 ms for the matmul form
below, and one decode query over 1024 keys 0.12 ms against 0.31 ms. A causal part (a prompt
chunk's own keys) is maskless too (`causal`). Masked parts, and other devices, use the matmul
form, in fp32.

Shapes: queries q [B, Hq, Tq, D]; a part's keys and values k, v [B, H, Tk, D] with Hq a
multiple of H (grouped-query attention: the Hq / H query heads of a KV head are computed as
that head's rows, no repeat of K/V); an optional additive mask [B, 1, Tq, Tk].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Partial:
    """Attention over some of the keys: out [B, Hq, Tq, D] (fp32, normalised within these keys)
    and lse [B, Hq, Tq] (fp32; -inf for a query that sees none of them)."""

    out: torch.Tensor
    lse: torch.Tensor


def attend_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                mask: torch.Tensor | None = None, causal: bool = False) -> Partial:
    """Attention of q over one part's keys k, v (see the module docstring for shapes).
    causal: q and k are the same Tq positions, and query i sees keys <= i."""
    B, Hq, Tq, D = q.shape
    H, Tk = k.shape[1], k.shape[2]
    g = Hq // H
    if mask is None and q.device.type == "cpu":
        return _flash_cpu(q, k, v, scale, causal)
    if causal:
        mask = torch.full((Tq, Tk), float("-inf"), device=q.device).triu(1)[None, None]
    qf = q.float().reshape(B, H, g * Tq, D)  # query heads packed per KV head
    scores = (qf @ k.float().transpose(-1, -2)) * scale  # [B, H, g * Tq, Tk]
    if mask is not None:
        scores = (scores.view(B, H, g, Tq, Tk) + mask.float()[:, :, None]).view(B, H, g * Tq, Tk)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, g * Tq]
    seen = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(seen, lse, 0.0)[..., None])
    out = (probs @ v.float()) * seen[..., None]  # [B, H, g * Tq, D]; 0 where nothing is seen
    return Partial(out.view(B, Hq, Tq, D), lse.view(B, Hq, Tq))


def merge(parts: list[Partial]) -> Partial:
    """The attention over all the parts' keys together."""
    lse = torch.stack([p.lse for p in parts])  # [n, B, Hq, Tq]
    total = torch.logsumexp(lse, dim=0)  # [B, Hq, Tq]
    weights = torch.exp(lse - torch.where(torch.isfinite(total), total, 0.0))  # 0 for -inf parts
    out = sum(w[..., None] * p.out for w, p in zip(weights, parts, strict=True))
    return Partial(out, total)


def _flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal: bool) -> Partial:
    """attend_part through torch's CPU flash kernel, query heads packed per KV head (a causal
    part keeps one query head per row instead: packed rows would break the diagonal)."""
    B, Hq, Tq, D = q.shape
    H = k.shape[1]
    if causal:
        k, v = (x.repeat_interleave(Hq // H, dim=1) for x in (k, v))
        qp = q
    else:
        qp = q.reshape(B, H, Hq // H * Tq, D)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qp, k, v, 0.0, causal, scale=scale)  # out [B, H', Tq', D], lse [B, H', Tq']
    return Partial(out.reshape(B, Hq, Tq, D).float(), lse.reshape(B, Hq, Tq))
