"""Every command and flag the README's command table names exists: each runs with ``--help``
and its help mentions each flag the table gives it (a fresh user copies them from there)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLOOP = Path(sys.executable).with_name("vloop")


def table_commands() -> list[tuple[list[str], list[str], str]]:
    """(argv prefix, flags, as written) for every runnable command in the "What exists" table."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What exists", 1)[1].split("\nLibrary", 1)[0]
    out = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first = line[2:].split(" | ", 1)[0]
        for written in re.findall(r"`([^`]+)`", first):
            words = written.replace("\\|", "|").split()
            flags = sorted({w.strip("[]|").split("|")[0] for w in words if w.strip("[").startswith("--")} - {"--help"})
            # The command itself: the words before the first placeholder, flag or alternative.
            cmd = words[:3] if words[:2] == ["python", "-m"] else []
            for w in words[len(cmd):]:
                if w.startswith(("[", "-")) or w.isupper() or "|" in w:
                    if "|" in w and not w.startswith("["):  # `opt-out add|remove|list`: check the first
                        cmd.append(w.split("|")[0])
                    break
                cmd.append(w)
            if cmd[0] == "vloop":
                argv = [str(VLOOP), *cmd[1:]]
            elif cmd[:2] == ["python", "-m"]:
                argv = [sys.executable, "-m", *cmd[2:]]
            elif cmd[0].startswith(("bench/", "scripts/")) and cmd[0].endswith(".py"):
                argv = [sys.executable, str(ROOT / cmd[0])]
            else:  # make targets: checked by test_layout
                continue
            out.append((argv, flags, written))
    return out


COMMANDS = table_commands()


def test_the_table_was_read():
    written = [w for _, _, w in COMMANDS]
    assert len(COMMANDS) >= 25 and any(w.startswith("bench/loop_efficacy.py") for w in written)
    assert any(w.startswith("python -m training") for w in written)


@pytest.mark.parametrize("argv,flags,written", COMMANDS, ids=[w for _, _, w in COMMANDS])
def test_readme_command_exists(argv, flags, written):
    r = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=180, cwd=ROOT,
                       env={**__import__("os").environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert r.returncode == 0, f"{written}: {r.stderr[-2000:]}"
    missing = [f for f in flags if f not in r.stdout]
    assert not missing, f"{written}: its --help does not mention {missing}"
