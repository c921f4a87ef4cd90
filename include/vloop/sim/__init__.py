"""The simulation — never imported by production code (tests/test_layout.py checks): a synthetic
shop world (``synth``), a tiny Qwen3-VL built and pretrained here (``tiny``, ``pretrain``), the
demo's days and the whole-loop demo (``demo``, ``demo_loop``), and the loop-efficacy benchmark's
rounds (``efficacy``)."""
