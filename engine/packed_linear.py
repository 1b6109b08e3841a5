"""bf16 Linear layers with their weights packed once for oneDNN, on CPUs with native bf16.

`F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every call.
Reordering once at load (what torch.compile's CPU freezing does) gives the same bits at half the
time for a decode step's small GEMMs. Measured on the 2-vCPU avx512_bf16 dev box
(docs/BENCHMARKS.md, "Serving speed after three changes"), per call:

    [1, 576] x [576, 1536]:     69 -> 35 us       [16, 576] x [576, 1536]:  131 -> 92 us
    [1, 576] x [576, 49152]:  3412 -> 1827 us     (the lm_head)

and `torch.equal` on every output, at batch sizes 1 to 100 and 3D inputs, so the exact path
stays exact. On a CPU with AMX (a 2-vCPU Sapphire Rapids-class Xeon, amx_bf16) the two paths
agree only up to 32 rows: above that oneDNN runs F.linear's reorder-per-call GEMM on AMX tiles
and the packed one on another kernel, and the bits differ (measured: every row count 33..299
differs, 1..32 none). So the packed weight serves inputs of at most PACK_MAX_ROWS rows (decode
batches, where the reorder dominates) and larger inputs take F.linear; and `pack_linears`
checks each weight shape on this CPU before it packs anything. fp32 has no such twin: its
packed kernel (MKL) changes the bits at batch 1, so fp32 weights stay as they are.

The module keeps the original `weight` (tied embeddings read it, state_dict and the fingerprint
see it unchanged); the packed copy is a non-persistent buffer: +1x the Linear weights' memory.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.device import cpu_has_fast_bf16

PACK_MAX_ROWS = 32  # rows per input the packed weight serves (see the docstring)
_PROBE_ROWS = (1, 7, 16, PACK_MAX_ROWS)


class PackedLinear(nn.Module):
    """Computes exactly what `linear` does, through a weight reordered once for oneDNN."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # batch hint 1: decode's shape; measured no slower than the default hint at 16-100 rows
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dynamo cannot trace the opaque packed tensor; inductor packs weights its own way.
        if torch.compiler.is_compiling() or x.numel() > PACK_MAX_ROWS * self.in_features:
            return nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def same_as_linear(self) -> bool:
        """Does the packed path give F.linear's bits on this CPU, at the row counts it serves?"""
        gen = torch.Generator().manual_seed(0)
        for rows in _PROBE_ROWS:
            x = torch.randn(rows, self.in_features, generator=gen).to(self.weight.dtype)
            if not torch.equal(self(x), nn.functional.linear(x, self.weight, self.bias)):
                return False
        return True


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return (dtype == torch.bfloat16 and device.type == "cpu" and cpu_has_fast_bf16()
            and torch.backends.mkldnn.is_available())


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of `model` for a PackedLinear in place, unless one weight shape
    computes different bits packed on this CPU (then none is swapped). Returns how many."""
    swaps = [(parent, name, PackedLinear(child)) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    probes = {(p.in_features, p.out_features, p.bias is not None): p for _, _, p in swaps}
    if not all(p.same_as_linear() for p in probes.values()):
        return 0
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    return len(swaps)
