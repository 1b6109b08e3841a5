"""fp32 Linear layers with a second, pre-transposed weight for batched decode steps, on CPU.

`F.linear` multiplies by the weight as stored, [out, in], which the fp32 CPU GEMM takes as a
transposed operand. From 4 to 32 rows that path is several times slower than the same product
against a copy stored [in, out] (2-vCPU Intel Xeon with avx512f, no avx512_bf16, torch 2.13,
mean per call; docs/BENCHMARKS.md, "Batched fp32 decode against a transposed weight"):

    [16, 576] x [576, 1536]     681 -> 118 us     [16, 576] x [576, 576]    267 -> 43 us
    [16, 576] x [576, 49152]   23.0 -> 10.8 ms    (the lm_head)           (2 rows: no gain)

The bits differ from F.linear's. F.linear's own rows already depend on how many rows it is
given (row 0 of a batch is not bit-equal to row 0 alone, same CPU), so a forward of several
sequences, or of a prompt's continuation over its cached prefix, was never bit-identical to any
forward generate() makes. The forwards generate() does make, a lone decode row and a whole
prompt from position 0, keep F.linear, so fp32 greedy stays equal to generate(); every other
one runs inside `BatchScope.batched()` (engine/forward.py), where a layer given BATCHED_ROWS
rows takes the copy. Cost: +1x the Linear weights' memory (a non-persistent buffer: state_dict,
tied embeddings and the fingerprint see the original weight).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

BATCHED_ROWS = range(4, 33)  # rows of a product that take the transposed copy (measured)


class BatchScope:
    """Whether the forward running on this thread may leave F.linear's bits (it is not one
    generate() makes). Per thread: two engines may share one model, each on its own thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def active(self) -> bool:
        return getattr(self._local, "on", False)

    @contextmanager
    def batched(self) -> Iterator[None]:
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = False


class BatchedLinear(nn.Module):
    """F.linear, except inside scope.batched() for BATCHED_ROWS rows: the same product
    against weight_t [in, out]."""

    def __init__(self, linear: nn.Linear, scope: BatchScope):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.scope = scope
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if (torch.compiler.is_compiling() or not self.scope.active
                or x2.shape[0] not in BATCHED_ROWS):
            return nn.functional.linear(x, self.weight, self.bias)
        y = x2 @ self.weight_t if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.reshape(*x.shape[:-1], self.out_features)


def can_transpose(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype == torch.float32 and device.type == "cpu"


@torch.no_grad()
def transpose_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of `model` for a BatchedLinear sharing one BatchScope, in place.
    Returns how many."""
    scope = BatchScope()
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name, child in swaps:
        setattr(parent, name, BatchedLinear(child, scope))
    return len(swaps)


def batch_scope(model: nn.Module) -> BatchScope | None:
    """The scope `transpose_linears` gave the model's layers, None if it was not applied."""
    return next((m.scope for m in model.modules() if isinstance(m, BatchedLinear)), None)
