"""Prometheus metrics of the service: requests, latency, errors, index size."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """One registry per app, so tests and several apps in one process never collide."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("blocksketch_http_requests", "HTTP requests served.", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("blocksketch_http_request_seconds", "Time to answer a request.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("blocksketch_http_errors", "Requests answered with an error status.",
                              ["route", "error"], registry=self.registry)
        self.index_hosts = Gauge("blocksketch_index_hosts", "Hosts in the index.", registry=self.registry)
        self.index_images = Gauge("blocksketch_index_images", "Images in the index.", registry=self.registry)
        self.index_bytes = Gauge("blocksketch_index_image_bytes", "Bytes of all indexed images.",
                                 registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
