"""The gateway's Prometheus metrics, kept by ``prometheus_client`` in one registry per process.

The client library does the exposition: values are printed exactly (a hand-written ``:g`` once
turned 1,234,567 into ``1.23457e+06``, so ``rate()`` moved in steps) and label values are escaped.
Each :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry` (not the library's
global one), so a second gateway in one process, as in tests, never collides with the first.
"""

from __future__ import annotations

import logging
import math
import threading

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY = "vloop_request_latency_seconds"
# The text format the gateway has always announced: its names are all legacy-valid, so the
# output is the same as the client's newer 1.0.0 format, which older scrapers may not know.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A `<name>_created` gauge per series doubles the series count; nothing here reads it.
prometheus_client.disable_created_metrics()


class Metrics:
    """Counters made on first use (name, help and label names fixed from then on), the request
    latency histogram by arm, and gauges read at scrape time."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._counters: dict[str, tuple[Counter, tuple[str, ...]]] = {}
        self._latency = Histogram(LATENCY, "end-to-end latency of answered chat requests", ["arm"],
                                  buckets=LATENCY_BUCKETS_S, registry=self.registry)

    def inc(self, name: str, help: str, amount: float = 1.0, **labels) -> None:
        names = tuple(sorted(labels))
        with self._lock:
            entry = self._counters.get(name)
            if entry is None:
                entry = self._counters[name] = (Counter(name, help, names, registry=self.registry), names)
        counter, declared = entry
        if names != declared:
            raise ValueError(f"counter {name} has labels {declared}, got {names}")
        (counter.labels(**{k: str(v) for k, v in labels.items()}) if names else counter).inc(amount)

    def observe_latency(self, seconds: float, **labels) -> None:
        self._latency.labels(**{k: str(v) for k, v in labels.items()}).observe(seconds)

    def gauge(self, name: str, help: str, fn) -> None:
        def read() -> float:
            try:
                return float(fn())
            except Exception as e:  # noqa: BLE001 - one unreadable gauge must not fail the scrape
                log.warning("metric %s could not be read: %r", name, e)
                return math.nan

        Gauge(name, help, registry=self.registry).set_function(read)

    def value(self, name: str, **labels) -> float | None:
        """A sample's current value (None when it has none), for tests and health checks."""
        return self.registry.get_sample_value(name, {k: str(v) for k, v in labels.items()})

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")
