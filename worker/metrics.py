"""A worker's /metrics: KV store per tier (via the kvstore observer hook, and the tiers' own
counters read at scrape time), KV handoff sizes and times, queue time, and engine load, KV pool
occupancy and engine counters read at scrape time. One registry per worker process (each worker
is one process, so no multiprocess mode is needed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.config import EngineStats, KVUsage
from engine.grammar import GrammarStats

# A 16-token SmolLM2 block is 368 KB (bf16) to 737 KB (fp32); a read spans one block in memory
# to a whole prompt's from Redis.
STORE_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HANDOFF_BYTES = tuple(float(1 << k) for k in range(20, 34, 2))  # 1 MiB .. 4 GiB, x4 apart
# From a free slot (~0) to a full batch of long prompts ahead (tens of seconds on a CPU).
QUEUE_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StoreMetrics:
    """kvstore.StoreObserver → Prometheus."""

    def __init__(self, registry: CollectorRegistry, model: str):
        self.model = model
        t = ["model_name", "tier"]
        self.get_seconds = Histogram("tandem:kvstore_get_seconds", "Batched store reads.", t,
                                     buckets=STORE_SECONDS, registry=registry)
        self.put_seconds = Histogram("tandem:kvstore_put_seconds", "Batched store writes.", t,
                                     buckets=STORE_SECONDS, registry=registry)
        self.bytes = Counter("tandem:kvstore_bytes", "Bytes moved.", t + ["op"], registry=registry)
        self.hits = Counter("tandem:kvstore_hits", "Blocks found.", t, registry=registry)
        self.misses = Counter("tandem:kvstore_misses", "Blocks not found.", t, registry=registry)
        self.corrupt = Counter("tandem:kvstore_corrupt_blocks", "Blocks that failed decoding.",
                               t, registry=registry)
        self.up = Gauge("tandem:kvstore_tier_up", "1 while the tier answers.", t,
                        registry=registry)

    def on_get(self, tier: str, seconds: float, nbytes: int, hits: int, misses: int) -> None:
        self.get_seconds.labels(self.model, tier).observe(seconds)
        self.bytes.labels(self.model, tier, "get").inc(nbytes)
        self.hits.labels(self.model, tier).inc(hits)
        self.misses.labels(self.model, tier).inc(misses)

    def on_put(self, tier: str, seconds: float, nbytes: int) -> None:
        self.put_seconds.labels(self.model, tier).observe(seconds)
        self.bytes.labels(self.model, tier, "put").inc(nbytes)

    def on_corrupt(self, tier: str) -> None:
        self.corrupt.labels(self.model, tier).inc()

    def on_tier_state(self, tier: str, up: bool) -> None:
        self.up.labels(self.model, tier).set(1.0 if up else 0.0)


class StoreCollector:
    """Counters that tiers keep themselves (TieredStore.stats()), read at scrape time: they
    happen inside a tier, out of reach of the observer hook. A tier without one has no
    sample."""

    COUNTERS = (("evictions", "Blocks evicted to keep the tier under its cap."),
                ("disk_full", "Writes that found the disk full (ENOSPC, EDQUOT)."))

    def __init__(self, model: str, read: Callable[[], dict]):
        self.model = model
        self.read = read  # -> TieredStore.stats()

    def collect(self):
        tiers = self.read()["tiers"]
        out = []
        for field, doc in self.COUNTERS:
            c = CounterMetricFamily(f"tandem:kvstore_{field}", doc,
                                    labels=["model_name", "tier"])
            for tier, stats in tiers.items():
                if field in stats:
                    c.add_metric([self.model, tier], stats[field])
            out.append(c)
        return out


class HandoffMetrics:
    """KV moved per request between workers through the store."""

    def __init__(self, registry: CollectorRegistry, model: str):
        self.model = model
        labels = ["model_name", "op"]  # op: store (prefill writes) | load (decode reads)
        self.bytes = Histogram("tandem:kv_handoff_bytes", "KV bytes per request handoff.",
                               labels, buckets=HANDOFF_BYTES, registry=registry)
        self.seconds = Histogram("tandem:kv_handoff_seconds", "KV handoff time per request.",
                                 labels, buckets=STORE_SECONDS, registry=registry)

    def observe(self, op: str, nbytes: int, seconds: float) -> None:
        self.bytes.labels(self.model, op).observe(nbytes)
        self.seconds.labels(self.model, op).observe(seconds)


class QueueMetrics:
    """vLLM's request_queue_time_seconds, measured where the queue is: from a sequence's
    submission to the engine thread until the first engine step that feeds it."""

    def __init__(self, registry: CollectorRegistry, model: str):
        self.model = model
        self.queue_time = Histogram("tandem:request_queue_time_seconds",
                                    "Submission to the first engine step that feeds it.",
                                    ["model_name"], buckets=QUEUE_SECONDS, registry=registry)

    def observe(self, seconds: float) -> None:
        self.queue_time.labels(self.model).observe(seconds)


@dataclass(slots=True)
class EngineReading:
    """What EngineCollector reads at scrape time: ints and snapshots a non-engine thread may
    read (Worker.engine_reading builds it)."""

    running: int
    waiting: int
    max_slots: int
    counters: object  # WorkerCounters: each field is exported as tandem:worker_<field>_total
    kv: KVUsage
    stats: EngineStats
    grammar: GrammarStats  # a copy: the engine thread and the checks on the loop update it


class EngineCollector:
    """Load and KV pool gauges, engine and worker counters, read from their owners at scrape
    time."""

    def __init__(self, model: str, read: Callable[[], EngineReading]):
        self.model = model
        self.read = read

    def collect(self):
        r = self.read()
        return ([self._family(GaugeMetricFamily, *g) for g in self._gauges(r)]
                + [self._family(CounterMetricFamily, *c) for c in self._counters(r)])

    def _family(self, kind, name: str, doc: str, value: float):
        family = kind(name, doc, labels=["model_name"])
        family.add_metric([self.model], value)
        return family

    @staticmethod
    def _gauges(r: EngineReading) -> list[tuple[str, str, float]]:
        kv = r.kv
        return [
            ("tandem:num_requests_running", "Sequences in the running batch.", r.running),
            ("tandem:num_requests_waiting", "Sequences waiting for a slot.", r.waiting),
            ("tandem:kv_slots_usage_perc", "Fraction of KV slots in use.",
             r.running / max(1, r.max_slots)),
            # vLLM's name: the share of the pool's pages held by running sequences.
            ("tandem:kv_cache_usage_perc", "Fraction of KV pages in use.",
             kv.used / max(1, kv.pages)),
            ("tandem:kv_pages_capacity", "KV pages sequences can hold.", kv.pages),
            ("tandem:kv_pages_used", "KV pages in some sequence's page table.", kv.used),
            ("tandem:kv_pages_cached", "Free KV pages the prefix cache can still find.",
             kv.cached),
            ("tandem:kv_resident_peak_bytes", "The most KV bytes resident at once: pages in "
             "use plus cold segments being streamed.", r.stats.kv_peak_bytes),
        ]

    @staticmethod
    def _counters(r: EngineReading) -> list[tuple[str, str, float]]:
        st = r.stats
        engine = [
            ("tandem:num_preemptions", "Sequences evicted from the KV pool to make room "
             "(recomputed when readmitted).", st.preemptions),
            ("tandem:prefix_cache_device_tokens", "Prompt tokens whose KV was found in the KV "
             "pool.", st.prefix_device_tokens),
            ("tandem:prefix_cache_store_tokens", "Prompt tokens whose KV was imported from the "
             "store.", st.prefix_store_tokens),
            ("tandem:kv_cold_tokens", "Tokens of KV moved out of the pool to the cold tier "
             "(long sequences past their window).", st.kv_cold_tokens),
            ("tandem:kv_cold_shrinks", "Times a full KV pool sent a running sequence's pages "
             "cold instead of preempting one.", st.kv_shrinks),
            ("tandem:guide_compiles", "Structured-output guides compiled (cache misses).",
             r.grammar.compiles),
            ("tandem:guide_cache_hits", "Structured-output guides found compiled.",
             r.grammar.hits),
            ("tandem:guide_compile_seconds", "Time spent compiling guides.",
             r.grammar.compile_seconds),
        ]
        worker = [(f"tandem:worker_{field.removesuffix('_total')}",
                   f"WorkerCounters.{field} (see /health).", value)
                  for field, value in asdict(r.counters).items()]
        return engine + worker
