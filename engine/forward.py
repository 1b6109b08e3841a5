"""Model forwards over the paged KV pool, through the unmodified transformers model code.

transformers decoders (Llama, Qwen2, Mistral, ...) call `cache.update(k, v, layer)` once per
layer and then their attention function. `StepCache` is that hook: it writes the step's new K/V
into their pages and hands attention the step's own K/V, and the engine's attention function
(engine/attention.py) reads the layer's pages group by group as the step's plan says (one flat
row of decode rows and prompt chunks: engine/step_plan.py). No DynamicCache-style concatenation, and
no mask building by transformers: a prepared 4D mask is passed, which it takes as is.

This is the engine's seam to transformers' model code. The forward kwarg that takes the cache
is read from the model's signature once (`cache`, or `past_key_values` before transformers
renamed it), and every forward checks that `update` ran once per layer: a model that ignored
our cache would build its own and return wrong logits without complaint.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from engine.attention import use_step_attention
from engine.batched_linear import batch_scope
from engine.cold_kv import ColdKV
from engine.cold_stream import ColdStream
from engine.compiled_step import CompiledDecode
from engine.kv_quant import rotation
from engine.page_pool import PagePool
from engine.step_plan import Chunk, StepPlan, Workspace


class _PagedLayer(CacheLayerMixin):
    """Answers transformers' size questions; `StepCache.update` does the work. The engine passes
    position ids and a prepared mask, so the answers only matter to code it does not run."""

    is_sliding = False

    def __init__(self, owner: StepCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise AssertionError("StepCache.update handles every layer")

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return self.owner.max_len


class StepCache(Cache):
    """A transformers `Cache` over the page pool, re-aimed by `plan` before each forward."""

    def __init__(self, pool: PagePool, max_len: int):
        self.pool = pool
        self.max_len = max_len
        self.plan = StepPlan()
        self.updates = 0  # update() calls since the forward began; Forward checks == num_layers
        super().__init__(layers=[_PagedLayer(self) for _ in range(pool.layout.num_layers)])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states, value_states: [1, H, T, D], the step's flat row
        self.updates += 1
        self.plan.write(self.pool.kv[layer_idx], key_states, value_states)  # [2, N, P, H, D]
        self.plan.written = layer_idx
        return key_states, value_states


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


def generate_twin(decode_ids: list[int], chunks: list[Chunk]) -> bool:
    """Is this forward one generate() makes itself, with the same rows: a lone decode row, or
    a whole prompt from position 0? Those keep F.linear's bits (engine/batched_linear.py)."""
    if not chunks:
        return len(decode_ids) == 1
    return not decode_ids and len(chunks) == 1 and chunks[0].start == 0


class Forward:
    """Runs the model over the page pool. Returns float32 logits."""

    def __init__(self, model: torch.nn.Module, pool: PagePool, max_len: int,
                 cold: ColdKV | None = None, compile_decode: bool = False):
        self.model = model
        self.pool = pool
        self.cold = cold
        self.stream_peak = 0  # bytes of cold segments the last forward held at once
        lay = pool.layout
        self.rotation = None if lay.quant is None else rotation(lay.head_dim, lay.dtype,
                                                                pool.kv.device)
        self.cache = StepCache(pool, max_len)
        self.workspace = Workspace()
        self.cache_kwarg = cache_kwarg(model)
        self.dtype = pool.layout.dtype
        use_step_attention(model)
        # transformers takes a 4D mask as prepared and skips building its own; attention
        # reads the plan's masks instead, so this one is never looked at.
        self._no_mask = torch.zeros(1, 1, 1, 1, dtype=self.dtype, device=pool.kv.device)
        # Decode-only steps through torch.compile (engine/compiled_step.py). Prefill always
        # runs eager first, so the seam check below has vetted the model before any of them.
        self.compiled = None if not compile_decode else CompiledDecode(
            model, pool, self.cache_kwarg, self.cache.layers, self._no_mask)
        self.batch_scope = batch_scope(model)  # engine/batched_linear.py

    def step(self, decode_ids: list[int], positions: list[int], tables: list[list[int]],
             chunks: list[Chunk], shifts: list[int] | None = None,
             colds: list[list[str] | None] | None = None) -> torch.Tensor:
        """One forward: a token for each decode row (row i's at positions[i], which is
        positions[i] - shifts[i] of page table tables[i] when its cold span, segment keys
        colds[i], holds shifts[i] tokens; rows longest first) and every prompt chunk. Every page
        written must be in its table already. Returns logits [n + sum(chunk.keep), V]: the
        decode rows', then each chunk's last `keep` positions', in order."""
        if (self.compiled is not None and not chunks
                and CompiledDecode.takes(shifts, colds, self.pool)):
            return self.compiled.step(decode_ids, positions, tables)
        dev = self.pool.kv.device
        shifts = shifts or [0] * len(positions)
        rows = [(t, p - s) for t, p, s in zip(tables, positions, shifts, strict=True)]
        plan = StepPlan.build(rows, chunks, self.pool.page_size, self.dtype, dev, colds)
        plan.workspace = self.workspace
        plan.quant, plan.rotation = self.pool.layout.quant, self.rotation
        ids, pos = plan.flat_inputs(decode_ids, positions)
        keep = plan.kept_rows()
        items = plan.cold_items()
        if items:
            plan.stream = ColdStream(self.cold, items, self.pool.layout.num_layers, dev)
        try:
            if self.batch_scope is not None and not generate_twin(decode_ids, chunks):
                with self.batch_scope.batched():
                    return self._run(plan, ids, pos, keep)
            return self._run(plan, ids, pos, keep)
        finally:
            if plan.stream is not None:
                plan.stream.close()
                self.stream_peak = plan.stream.peak

    def _run(self, plan: StepPlan, ids: list[int], pos: list[int], keep: int | list[int]
             ) -> torch.Tensor:
        dev = self.pool.kv.device
        self.cache.plan = plan
        self.cache.updates = 0
        # use_cache=True is transformers' documented way to pass a cache in (cache_utils'
        # examples); None would fall back to config.use_cache, which some checkpoints set False.
        out = self.model(
            input_ids=torch.tensor([ids], device=dev),  # [1, T]
            position_ids=torch.tensor([pos], device=dev),  # [1, T]
            attention_mask=self._no_mask,
            use_cache=True,
            logits_to_keep=keep if isinstance(keep, int) else torch.tensor(keep, device=dev),
            tandem_plan=plan,
            **{self.cache_kwarg: self.cache},
        )
        self.cache.plan = StepPlan()  # drop the step's tensors
        want = self.pool.layout.num_layers
        if self.cache.updates != want:
            raise RuntimeError(
                f"{type(self.model).__name__}.forward called StepCache.update "
                f"{self.cache.updates} times, expected {want} (once per layer): the model "
                f"bypassed the engine's KV cache (passed as `{self.cache_kwarg}=`), so its "
                "logits are wrong. Check the transformers version (see README)."
            )
        return out.logits[0].float()
