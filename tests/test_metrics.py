"""The gateway's /metrics exposition (serving.metrics), read back with prometheus_client's own
text parser, as Prometheus reads it."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import LATENCY_BUCKETS_S, Metrics


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of an exposition; fails on anything unparsable."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_counters_past_a_million_are_exact():
    m = Metrics()
    m.inc("vloop_requests_total", "answered chat requests", 1_234_567, arm="champion", logged="true")
    m.inc("vloop_records_shipped_total", "records moved to the lake", 123_456_789, stream="interactions")
    m.inc("vloop_ship_failures_total", "failed attempts to ship the spool")
    text = m.render()
    got = samples(text)
    # The hand-written exposition printed 1.23457e+06 (six significant digits): rate() in steps.
    assert got[("vloop_requests_total", (("arm", "champion"), ("logged", "true")))] == 1_234_567
    assert got[("vloop_records_shipped_total", (("stream", "interactions"),))] == 123_456_789
    assert got[("vloop_ship_failures_total", ())] == 1
    # One more request is one more in the exposition, not lost in the rounding.
    m.inc("vloop_requests_total", "answered chat requests", arm="champion", logged="true")
    assert samples(m.render())[("vloop_requests_total", (("arm", "champion"), ("logged", "true")))] == 1_234_568
    # The names dashboards use are kept, as counters.
    assert "# TYPE vloop_requests_total counter" in text


def test_label_values_are_escaped():
    m = Metrics()
    nasty = 'say "hi"\\ then\nnewline'
    m.inc("vloop_feedback_total", "feedback events received", type=nasty)
    m.inc("vloop_feedback_total", "feedback events received", type="accept")
    m.observe_latency(0.3, arm=nasty)
    text = m.render()
    assert '\nnewline' not in text  # a raw newline would end the sample line midway
    got = samples(text)  # the hand-written exposition did not parse at all
    assert got[("vloop_feedback_total", (("type", nasty),))] == 1
    assert got[("vloop_feedback_total", (("type", "accept"),))] == 1
    assert got[("vloop_request_latency_seconds_count", (("arm", nasty),))] == 1


def test_histogram_and_gauges():
    m = Metrics()
    depth = [0]
    m.gauge("vloop_spool_segments", "spool segments not yet shipped", lambda: depth[0])
    m.gauge("vloop_broken", "a gauge whose reading fails", lambda: 1 / 0)
    for s in (0.004, 0.005, 0.2, 30.0):
        m.observe_latency(s, arm="canary")
    depth[0] = 7
    got = samples(m.render())
    assert got[("vloop_spool_segments", ())] == 7  # read at scrape time
    assert got[("vloop_broken", ())] != got[("vloop_broken", ())]  # NaN: the scrape still succeeds
    bucket = {dict(k[1])["le"]: v for k, v in got.items() if k[0] == "vloop_request_latency_seconds_bucket"}
    assert bucket["0.005"] == 2 and bucket["0.25"] == 3 and bucket["10.0"] == 3 and bucket["+Inf"] == 4
    assert len(bucket) == len(LATENCY_BUCKETS_S) + 1
    assert got[("vloop_request_latency_seconds_sum", (("arm", "canary"),))] == pytest.approx(30.209)
    with pytest.raises(ValueError, match="labels"):  # one label set per counter
        m.inc("vloop_feedback_total", "feedback", type="accept")
        m.inc("vloop_feedback_total", "feedback", kind="accept")


def test_one_registry_per_gateway():
    a, b = Metrics(), Metrics()
    a.inc("vloop_adapter_loads_total", "adapter loads", 3)
    b.inc("vloop_adapter_loads_total", "adapter loads")  # no clash with a's registry
    assert a.value("vloop_adapter_loads_total") == 3 and b.value("vloop_adapter_loads_total") == 1
