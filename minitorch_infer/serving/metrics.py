"""Prometheus metrics of one server: queue and KV-pool gauges read at scrape time, token counters and latency
histograms fed as requests finish. Each server has a registry of its own (several can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineCollector:
    """Gauges computed from the engine's state whenever Prometheus scrapes."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        scheduler, cache = self.engine.scheduler, self.engine.model.kv_cache
        yield _gauge("minitorch_requests_running", "requests with a sequence in the KV pool", len(scheduler.running))
        yield _gauge("minitorch_requests_waiting", "requests queued for admission", len(scheduler.waiting))
        yield _gauge("minitorch_kv_blocks_used", "KV-cache blocks held by sequences", cache.used_blocks)
        yield _gauge("minitorch_kv_blocks_free", "KV-cache blocks free", cache.free_blocks)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.prompt_tokens = Counter("minitorch_prompt_tokens", "prompt tokens received", registry=self.registry)
        self.generated_tokens = Counter("minitorch_generation_tokens", "tokens generated", registry=self.registry)
        self.prefix_cache_hits = Counter("minitorch_prefix_cache_hit_tokens",
                                         "prompt tokens served from shared prefix blocks", registry=self.registry)
        self.time_to_first_token = Histogram("minitorch_time_to_first_token_seconds", "submission to first token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("minitorch_inter_token_latency_seconds", "between a request's tokens",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        engine.finish_observers.append(self.observe)

    def observe(self, request, result) -> None:
        """Called by the engine as each request finishes."""
        self.prompt_tokens.inc(len(result.prompt_ids))
        self.generated_tokens.inc(len(result.token_ids))
        self.prefix_cache_hits.inc(request.cached_tokens)
        times = request.token_times
        if times:
            self.time_to_first_token.observe(times[0] - request.submitted_at)
        for earlier, later in zip(times, times[1:]):
            self.inter_token_latency.observe(later - earlier)

    def text(self) -> bytes:
        return generate_latest(self.registry)
