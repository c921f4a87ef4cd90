"""Training runs in a subprocess whose stderr (progress, library warnings) used to reach the task
log raw, where Airflow logs it at error level; run_streaming echoes it line by line (print: info)."""

from __future__ import annotations

import sys

from vloop.learn.retrain import run_streaming


def test_run_streaming_echoes_stderr_and_returns_stdout(tmp_path):
    child = tmp_path / "child.py"
    child.write_text("import sys, warnings\nprint('step 1 loss 0.5', file=sys.stderr)\n"
                     "for _ in range(3):\n    warnings.warn('old api', FutureWarning)\n"
                     "print('x' * 200000)\nprint('{\"ok\": true}')\n")
    lines = []
    code, out = run_streaming([sys.executable, str(child)], env={"PATH": ""}, echo=lines.append)
    assert code == 0 and out.endswith('{"ok": true}\n') and len(out) > 200000  # a big stdout does not stall it
    assert lines[0] == "step 1 loss 0.5"
    assert sum(": FutureWarning:" in line for line in lines) == 1  # once, not at every call
