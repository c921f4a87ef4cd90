"""A few Prometheus metrics in the text exposition format (no client library needed)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(labels: tuple) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self.gauges: dict[str, callable] = {}
        self.hist_counts: dict[tuple, list[int]] = {}
        self.hist_sum: dict[tuple, float] = defaultdict(float)
        self.help: dict[str, str] = {}

    def inc(self, name: str, help: str, amount: float = 1.0, **labels) -> None:
        with self._lock:
            self.help[name] = help
            self.counters[name][tuple(sorted(labels.items()))] += amount

    def observe_latency(self, seconds: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts = self.hist_counts.setdefault(key, [0] * (len(LATENCY_BUCKETS_S) + 1))
            counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            self.hist_sum[key] += seconds

    def gauge(self, name: str, help: str, fn) -> None:
        self.help[name] = help
        self.gauges[name] = fn

    def render(self) -> str:
        out = []
        with self._lock:
            for name, series in sorted(self.counters.items()):
                out += [f"# HELP {name} {self.help[name]}", f"# TYPE {name} counter"]
                out += [f"{name}{_labels(k)} {v:g}" for k, v in sorted(series.items())]
            name = "vloop_request_latency_seconds"
            out += [f"# HELP {name} end-to-end latency of answered chat requests", f"# TYPE {name} histogram"]
            for key, counts in sorted(self.hist_counts.items()):
                cum = 0
                for le, c in zip((*LATENCY_BUCKETS_S, "+Inf"), counts):
                    cum += c
                    out.append(f"{name}_bucket{_labels(key + (('le', le),))} {cum}")
                out.append(f"{name}_sum{_labels(key)} {self.hist_sum[key]:.6f}")
                out.append(f"{name}_count{_labels(key)} {cum}")
        for name, fn in sorted(self.gauges.items()):
            out += [f"# HELP {name} {self.help[name]}", f"# TYPE {name} gauge", f"{name} {fn():g}"]
        return "\n".join(out) + "\n"
