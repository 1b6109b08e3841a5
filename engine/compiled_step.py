"""An opt-in compiled forward for decode-only steps (EngineConfig.compile_decode).

At batch 1 the eager forward issues ~1,500 small ops a step (norms, rotary, residuals, casts
around the quantized GEMMs), and on 2 cores they cost about as much as the weight GEMMs
(docs/BENCHMARKS.md, "Where a batch-1 decode step goes"). `torch.compile` of the whole model
fuses them into a few dozen C++ kernels, but only as one graph: compiling around the engine's
StepPlan (Python lists of groups, ints that change every step) breaks the graph twice per
layer, and that was measured slower than eager (33 vs 27 ms a bf16 int4 step).

So a decode-only step gets a plan made of tensors alone, `DecodeBatch`:

    slots  [n]              where each row's new K/V go in the pool viewed as [N * P, H, D]
    table  [n, pages]       each row's page ids, padded with the null page
    mask   [n, 1, 1, W]     additive, W = pages * P: row i sees its first lengths[i] keys

Every size is a tensor dim, so one graph serves every step (dims dynamic; n = 1 is
specialised by Dynamo, so two graphs in all). The pool write is a custom op that mutates the
pool in place: written as index_copy_ inside the graph, functionalization copied the whole pool
once per layer. Steps with prompt chunks, cold spans or a quantized pool stay eager.

Not bit-exact: inductor's fused kernels round differently from the eager ops, and all rows
attend in one padded call rather than in length groups. So it is off by default, and measured
under vLLM's rule (greedy tokens equal, or each in the other's top 5): scripts/bench_top5.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine.page_pool import PagePool
from engine.step_plan import decode_attention, decode_mask, page_table


@torch.library.custom_op("tandem::write_kv", mutates_args={"kv"})
def write_kv(kv: torch.Tensor, layer: int, slots: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor) -> None:
    """Store a step's K/V [1, H, n, D] at `slots` of layer `layer` of the pool kv
    [L, 2, N, P, H, D]."""
    flat = kv[layer].view(2, -1, *kv.shape[4:])  # [2, N * P, H, D]
    flat[0].index_copy_(0, slots, key[0].transpose(0, 1))
    flat[1].index_copy_(0, slots, value[0].transpose(0, 1))


@write_kv.register_fake
def _(kv, layer, slots, key, value) -> None:
    return None


@dataclass(slots=True)
class DecodeBatch:
    """A decode-only step's plan, tensors only (see the module docstring)."""

    kv: torch.Tensor  # the whole pool [L, 2, N, P, H, D]
    slots: torch.Tensor  # [n] long
    table: torch.Tensor  # [n, pages] long
    mask: torch.Tensor  # [n, 1, 1, pages * P]

    @classmethod
    def build(cls, pool: PagePool, tables: list[list[int]], positions: list[int]
              ) -> DecodeBatch:
        P, dev = pool.page_size, pool.kv.device
        # At least 2: Dynamo specialises a dim of size 1, so a 1-page context would compile
        # graphs of its own; the null page pads (masked).
        pages = max(2, -(-(max(positions) + 1) // P))
        slots = [t[p // P] * P + p % P for t, p in zip(tables, positions, strict=True)]
        return cls(pool.kv, torch.tensor(slots, device=dev),
                   page_table(tables, pages, dev).view(len(tables), pages),
                   decode_mask([p + 1 for p in positions], pages * P, pool.layout.dtype, dev))

    def attend(self, module: torch.nn.Module, query: torch.Tensor, scaling: float | None
               ) -> torch.Tensor:
        """[1, n, Hq, D] for the step's queries [1, Hq, n, D], each row over its pages: the
        eager engine's packed decode attention (engine/step_plan.py) over one padded group."""
        kv = self.kv[module.layer_idx]  # [2, N, P, H, D]
        n, pages = self.table.shape
        _, _, P, H, D = kv.shape
        k, v = (kv[i][self.table].reshape(n, pages * P, H, D).transpose(1, 2) for i in (0, 1))
        q = query[0].transpose(0, 1).unsqueeze(2)  # [n, Hq, 1, D]
        out = decode_attention(sdpa_attention_forward, module, q, k, v, self.mask,
                               {"scaling": scaling})  # [n, 1, Hq, D]
        return out.transpose(0, 1)


class _BatchCache(Cache):
    """StepCache's counterpart for a DecodeBatch: the write only, as the custom op."""

    def __init__(self, layers: list):
        self.batch: DecodeBatch | None = None
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        write_kv(self.batch.kv, layer_idx, self.batch.slots, key_states, value_states)
        return key_states, value_states


class CompiledDecode:
    """The model's forward over a DecodeBatch, compiled once per n = 1 / n > 1 (warm_up).
    `layers` are StepCache's size-answering layers (transformers asks them questions)."""

    def __init__(self, model: torch.nn.Module, pool: PagePool, cache_kwarg: str, layers: list,
                 no_mask: torch.Tensor):
        self.model = model
        self.pool = pool
        self.cache = _BatchCache(layers)
        self.cache_kwarg = cache_kwarg
        self.no_mask = no_mask
        self.steps = 0  # forwards it ran
        self._fn = torch.compile(self._forward, dynamic=True, fullgraph=True,
                                 options={"freezing": True})

    @torch.inference_mode()  # as Engine.step runs it: grad mode is part of the graph's guards
    def warm_up(self) -> None:
        """Compile both graphs now (~1.5 min on 2 cores), not in a user's first decode step:
        a lone row and two rows, over two borrowed pages, zeroed and handed back after."""
        pages = [self.pool.allocate(), self.pool.allocate()]
        P = self.pool.page_size
        try:
            self.step([0], [P], [pages])
            self.step([0, 0], [P, P + 1], [pages, pages])
        finally:
            self.pool.kv[:, :, pages].zero_()
            self.pool.release(pages)
        self.steps = 0

    @staticmethod
    def takes(shifts: list[int] | None, colds: list | None, pool: PagePool) -> bool:
        """Can a decode-only step with these cold spans run compiled?"""
        return (pool.layout.quant is None and not (shifts and any(shifts))
                and not (colds and any(c is not None for c in colds)))

    def step(self, decode_ids: list[int], positions: list[int], tables: list[list[int]]
             ) -> torch.Tensor:
        """Logits [n, V] float32 of the n decode rows."""
        dev = self.pool.kv.device
        self.cache.batch = batch = DecodeBatch.build(self.pool, tables, positions)
        try:
            logits = self._fn(torch.tensor([decode_ids], device=dev),
                              torch.tensor([positions], device=dev), batch)
        finally:
            self.cache.batch = None
        self.steps += 1
        return logits[0].float()

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=self.no_mask,
                         use_cache=True, logits_to_keep=0, tandem_plan=batch,
                         **{self.cache_kwarg: self.cache})
        return out.logits
