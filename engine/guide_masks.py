"""The next-token masks of a step's guided rows: on CUDA computed on a helper thread while the
forward runs (vLLM and SGLang overlap them the same way), on CPU in line after it.

A row's matcher already holds every token it has sampled when its step begins, so its mask
does not depend on the forward, and llguidance drops the GIL while it computes. On CUDA the
CPU is idle while the device runs the forward, so the masks come for free. On a CPU the forward
already keeps every core busy: measured on a 2-vCPU Xeon (avx512_bf16, amx), SmolLM2 in bf16,
median decode step with a JSON guide on every row vs none, the helper thread cost +4% at
batch 1 and batch 16 (its work lands between the forward's OpenMP threads), in line +2.3% and
+0.5%. A mask takes ~65 us on average in JSON, up to ~0.5 ms where a string may start.

Only the engine thread starts, waits for and reads the work, and it never touches a matcher
while its mask is being computed: every start() is followed by take() (or settle() when the
forward raised) within the same step.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor, wait
from itertools import chain

import numpy as np
import torch

from engine.grammar import GuideError, token_mask
from engine.sequence import Sequence

Masks = dict[Sequence, np.ndarray]  # float32 [V] offsets per guided row (by identity)


class GuideMasks:
    def __init__(self, vocab_size: int, overlap: bool = True):
        self.vocab_size = vocab_size
        self.overlap = overlap  # False: start() computes nothing, complete() all in line
        self._pool: ThreadPoolExecutor | None = None  # started by the first guided row

    def start(self, decoders: list[Sequence], planned: list[tuple[Sequence, int]]
              ) -> Future | None:
        """With overlap, compute the masks of this step's guided sampling rows: every decoder,
        and each prompt whose planned chunk is its last."""
        if not self.overlap:
            return None  # on CPU: nothing to build on the decode step's path
        guided = [s for s in chain(decoders, (s for s, n in planned if s.todo == n))
                  if s.matcher is not None]
        if not guided:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="guide-masks")
        return self._pool.submit(self._compute, guided)

    def _compute(self, seqs: list[Sequence]) -> Masks:
        out = {}
        for seq in seqs:
            # A matcher in an error state gets no mask: the engine fails that row alone.
            with contextlib.suppress(GuideError):
                out[seq] = token_mask(seq.matcher, self.vocab_size)
        return out

    @staticmethod
    def take(pending: Future | None) -> Masks:
        return {} if pending is None else pending.result()

    @staticmethod
    def settle(pending: Future | None) -> None:
        """Wait for work whose step failed, so no matcher is in use once the step is over."""
        if pending is not None:
            wait([pending])

    def complete(self, rows: list[Sequence], ready: Masks
                 ) -> tuple[Masks, list[tuple[Sequence, GuideError]]]:
        """Every guided row's mask: those computed during the forward, the rest now (on CPU,
        and a fork spawned this step). Rows whose matcher is in an error state come back
        apart, with the error, for the engine to fail alone."""
        masks, broken = {}, []
        for seq in rows:
            if seq.matcher is None:
                continue
            try:
                mask = ready.get(seq)
                masks[seq] = mask if mask is not None else token_mask(seq.matcher,
                                                                      self.vocab_size)
            except GuideError as exc:
                broken.append((seq, exc))
        return masks, broken

    @staticmethod
    def tensor(seq: Sequence, masks: Masks, device: torch.device) -> torch.Tensor | None:
        """The row's mask (0 / -inf offsets) on `device`, or None without a guide."""
        mask = masks.get(seq)
        return None if mask is None else torch.from_numpy(mask).to(device, non_blocking=True)
