"""The simulation — never imported by production code (tests/test_layout.py checks): a synthetic
shop world (``synth``), a tiny Qwen3-VL built and pretrained here (``tiny``, ``pretrain``), days of
traffic written straight into the lake for tests and benchmarks (``traffic``), the demo — the whole
loop on real services (``demo_loop``, ``vloop demo``) — and the loop-efficacy benchmark's rounds
(``efficacy``)."""
