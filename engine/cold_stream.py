"""One forward's cold segments, loaded a segment ahead of the attention that needs them.

Attention asks for segments in a fixed order: layer by layer, and inside a layer item by item
(the step's rows and chunks that have a cold span, in plan order), segment by segment. A loader
thread walks the same order and hands each segment over through a queue of one, so while the
attention of segment i runs, segment i + 1 is loaded (double buffering); at most three segments
are held at once (one computing, one queued, one loaded and waiting to be queued), which the
KV budget reserves (stream_reserve). With prefetch off the attention loads each segment itself
when it needs it (serial loads: the baseline the overlap is measured against).

On CPU a memory-tier hit is a view of the tier's buffer, a disk hit a read and a checksum:
both CPU work, which a loader thread takes from the forward's own threads, so prefetch
measured slower there in every stage and is off by default (docs/BENCHMARKS.md). On CUDA a
segment is copied to the device on a side stream from pinned host memory (non_blocking), and
the attention waits on its event (written for, not yet run on, a GPU).
"""

from __future__ import annotations

import contextlib
import queue
import threading

import torch

from engine.cold_kv import ColdKV, ColdKVLost, layer_keys
from engine.kv_layout import KVLayout
from engine.kv_quant import dequantize
from engine.split_attention import Partial, attend_part, merge

HELD = 3  # segments a prefetching stream holds at most: computing, queued, loaded


def stream_reserve(layout: KVLayout, prefetch: bool, segment: int) -> int:
    """Bytes of the KV budget a stream's segments of `segment` tokens may take: HELD segments
    of one layer, or the one being attended over when each is loaded as it is needed."""
    per_layer_token = layout.token_bytes // layout.num_layers
    return (HELD if prefetch else 1) * segment * per_layer_token


class ColdStream:
    """items: per item (row or chunk with a cold span), its segment keys without the layer."""

    def __init__(self, cold: ColdKV, items: list[list[str]], layers: int,
                 device: torch.device):
        self.cold = cold
        # layer-major: attention runs layer by layer
        by_segment = [layer_keys(key, layers) for keys in items for key in keys]
        self.order = [names[layer] for layer in range(layers) for names in by_segment]
        self.device = device
        self.next = 0  # index into order of the next segment attention takes
        self.held = 0  # bytes of segments loaded and not yet consumed
        self.peak = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = None
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        if cold.prefetch and self.order:
            self._thread = threading.Thread(target=self._load_all, name="cold-kv-prefetch",
                                            daemon=True)
            self._thread.start()

    def take(self) -> torch.Tensor:
        """The next segment of the order, [2, t, H, W] on the device."""
        key = self.order[self.next]
        self.next += 1
        if self._thread is None:
            return self._load(key)
        got = self._queue.get()
        if isinstance(got, BaseException):
            raise got
        loaded_key, tensor, event = got
        assert loaded_key == key, (loaded_key, key)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return tensor

    def done_with(self, segment: torch.Tensor) -> None:
        with self._lock:
            self.held -= segment.nbytes

    def close(self) -> None:
        """Stop the loader (a forward that raised may leave it blocked on the queue)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get(timeout=0.05)
            self._thread.join()

    def _load(self, key: str) -> torch.Tensor:
        [t] = self.cold.tier.get([key])
        if t is None:
            raise ColdKVLost(key)
        if t.device != self.device:
            t = t.pin_memory().to(self.device, non_blocking=True)
        with self._lock:
            self.held += t.nbytes
            self.peak = max(self.peak, self.held)
        return t

    def _load_all(self) -> None:
        try:
            for key in self.order:
                if self._stop.is_set():
                    return
                event = None
                if self._side is not None:
                    with torch.cuda.stream(self._side):
                        t = self._load(key)
                        event = torch.cuda.Event()
                        event.record(self._side)
                else:
                    t = self._load(key)
                self._queue.put((key, t, event))
        except BaseException as e:  # handed to the attention, which raises it in the forward
            self._queue.put(e)


def attend_with_cold(stream: ColdStream, keys: list[str], q: torch.Tensor,
                     resident: list[Partial], scale: float) -> torch.Tensor:
    """Attention of q [1, Hq, t, D] over its resident keys (`resident`, the parts already
    computed) and the item's cold segments `keys` (all before every query: no mask), merged
    exactly. Returns [1, t, Hq, D] in q's dtype."""
    parts = list(resident)
    quant = stream.cold.pool.layout.quant
    for _ in keys:
        seg = stream.take()  # [2, s, H, W]
        ck, cv = (seg[i].permute(1, 0, 2).unsqueeze(0) for i in (0, 1))  # [1, H, s, W]
        if quant is not None:
            ck, cv = dequantize(ck, quant, q.dtype), dequantize(cv, quant, q.dtype)
        parts.append(attend_part(q, ck, cv, scale))
        stream.done_with(seg)
    return merge(parts).out.to(q.dtype).transpose(1, 2)
