"""The server's Prometheus metrics, served on --metrics-port (prometheus-client's own HTTP server).

Counters and histograms are fed by the engine as requests end and batches run (`engine.observe.Observer`);
gauges are read from the engine when scraped. No label names an adapter: per-adapter counts stay in
ListAdapters, so the series stay as few as they are however many adapters exist. The one exception is
`omni_grpc_lora_requests_info` (vLLM's `lora_requests_info`, read by adapter-aware routers): one series at a
time, whose labels list the adapters running and waiting requests hold.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from omni_grpc.engine.engine import Engine
from omni_grpc.engine.observe import RequestRecord

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_IMAGES = (1, 2, 4, 8, 16, 32, 64)
_TIERS = ("device", "host", "disk")


class ServerMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "omni_grpc_requests",
            "Generate requests ended, by outcome (gRPC status name).",
            ["outcome"],
            registry=self.registry,
        )
        self.e2e = Histogram(
            "omni_grpc_request_duration_seconds",
            "Generate requests from arrival to reply.",
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.queue = Histogram(
            "omni_grpc_request_queue_seconds",
            "Time requests waited for their batch.",
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "omni_grpc_request_inference_seconds",
            "Denoising and decoding time of each request's batch.",
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "omni_grpc_batch_images",
            "Images per denoising batch (pipeline call).",
            buckets=_IMAGES,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))
        engine.observers.append(self)

    def request_done(self, record: RequestRecord) -> None:
        self.requests.labels(outcome=record.outcome).inc()
        self.e2e.observe(record.total_s)
        if record.outcome == "OK":  # queue and inference times of requests that ran
            self.queue.observe(record.queue_s)
            self.inference.observe(record.inference_s)

    def batch_done(self, images: int) -> None:
        self.batch_images.observe(images)

    def serve(self, host: str, port: int) -> Any:
        """Start the HTTP endpoint (a thread); raises OSError when the port cannot be bound."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


class _EngineCollector(Collector):
    """Gauges and totals read from the engine at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        state = self._engine.state()
        yield GaugeMetricFamily("omni_grpc_requests_running", "Generate requests in a running batch.", state.running)
        yield GaugeMetricFamily("omni_grpc_requests_waiting", "Generate requests waiting for a batch.", state.waiting)
        tiers = GaugeMetricFamily("omni_grpc_adapters", "Adapters in the table, by tier.", labels=["tier"])
        for tier in _TIERS:
            tiers.add_metric([tier], state.tiers.get(tier, 0))
        yield tiers
        for name, what in (
            ("loads", "Adapter file reads (first loads and re-reads from the disk tier)."),
            ("hits", "Requests that found their adapter on the device."),
            ("promotions", "Adapters moved from host memory back to the device."),
            ("evictions", "Adapters moved down a tier (device to host or disk, host to disk)."),
        ):
            yield CounterMetricFamily(f"omni_grpc_adapter_{name}", what, state.adapter_totals.get(name, 0))
        info = GaugeMetricFamily(
            "omni_grpc_lora_requests_info",
            "The adapters running and waiting requests hold (vLLM's lora_requests_info); the value is the time.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric(
            [str(state.max_device_adapters), ",".join(state.running_adapters), ",".join(state.waiting_adapters)],
            time.time(),
        )
        yield info
