"""The project layout and packaging that everything else relies on (DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layout_exists():
    for p in ("dags", "plugins", "include/vloop", "training", "serving", "tests", "bench",
              "airflow_settings.yaml", "requirements.txt", "Dockerfile", "serving/Dockerfile",
              "training/Dockerfile", "pyproject.toml", ".ci/run", "Makefile"):
        assert (ROOT / p).exists(), p


def test_packages_import_from_the_installed_project():
    r = subprocess.run([sys.executable, "-c", "import vloop, training, serving; print(vloop.__file__)"],
                       capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(ROOT / "include" / "vloop" / "__init__.py")


def test_requirements_are_exact_pins():
    for f in ("requirements.txt", "requirements/torch.txt", "requirements/dev.txt",
              "requirements/constraints.txt", "requirements/labelstudio.txt"):
        for line in (ROOT / f).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", line), f"{f}: {line}"
    assert "torch==2.13.0" in (ROOT / "requirements/torch.txt").read_text()
    assert "label-studio==1.23.2" in (ROOT / "requirements/labelstudio.txt").read_text()


def test_pip_check_is_clean():
    r = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_sys_path_edits_in_code():
    for p in list((ROOT / "include").rglob("*.py")) + list((ROOT / "dags").rglob("*.py")) + \
            list((ROOT / "training").rglob("*.py")) + list((ROOT / "serving").rglob("*.py")):
        assert "sys.path" not in p.read_text(), p


def test_readme_keeps_exactly_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up and run \(fresh machine\)\n\n```bash\n(.*?)```", readme, re.S).group(1)
    commands = [l.split("#")[0].strip() for l in block.splitlines() if l.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]


def test_make_demo_on_a_fresh_clone_builds_every_venv_it_needs(tmp_path):
    """`make demo` starts Label Studio from its own venv: on a clone without venvs, make's plan
    (``make -n``, nothing run) builds both before the demo."""
    import shutil

    for name in ("Makefile", "requirements.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    r = subprocess.run(["make", "-n", "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    plan = r.stdout
    assert re.search(r"-m venv \.venv\s", plan)
    assert "venv .venv-labelstudio" in plan and "requirements/labelstudio.txt" in plan
    assert plan.index("requirements/labelstudio.txt") < plan.index("vloop demo")


STAGES = ("store", "vlm", "capture", "privacy", "curate", "learn", "release", "sim")  # vloop's subpackages
# Production modules that still reach the simulation (vloop.sim), each with why; the test fails
# when one is fixed (drop it here) or a new one appears. Entry points that dispatch to the demo's commands:
KNOWN_SIMULATION_IMPORTS = {
    ("include/vloop/cli.py", "vloop.sim.demo_loop"),  # `vloop demo`
    ("include/vloop/cli.py", "vloop.sim.tiny"),  # `vloop tiny-model`
    ("include/vloop/cli.py", "vloop.sim.pretrain"),  # `vloop pretrain-base`
}


def _imported_modules(path: Path):
    """Every module an import statement in ``path`` names, at any level (inside functions too)."""
    import ast

    pkg = ".".join(path.relative_to(ROOT / "include").with_suffix("").parts[:-1]) \
        if path.is_relative_to(ROOT / "include") else ".".join(path.relative_to(ROOT).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(p for p in parts + [base] if p)
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def test_production_code_never_imports_the_simulation():
    """DESIGN.md, "Layout": production modules (include/vloop outside vloop.sim, serving,
    training, plugins) never import vloop.sim, not even inside a function. DAG files are wiring
    and may, in a branch that only runs with VLOOP_SIMULATION."""
    files = [p for p in (ROOT / "include" / "vloop").rglob("*.py") if "sim" not in p.relative_to(ROOT / "include/vloop").parts]
    for d in ("serving", "training", "plugins"):
        files += list((ROOT / d).rglob("*.py"))
    found = set()
    for p in files:
        for mod in _imported_modules(p):
            if mod == "vloop.sim" or mod.startswith("vloop.sim."):
                found.add((p.relative_to(ROOT).as_posix(), ".".join(mod.split(".")[:3])))
    assert found - KNOWN_SIMULATION_IMPORTS == set(), "production code imports the simulation"
    assert KNOWN_SIMULATION_IMPORTS - found == set(), "fixed: remove from KNOWN_SIMULATION_IMPORTS"


def test_vloop_is_grouped_by_stage_and_stages_use_each_others_public_names():
    """Every module of vloop lives in a stage's folder (only the package's entry points, the
    ``vloop`` command and the Airflow page, stand at the top), each stage says what it owns in
    its ``__init__``, and no code outside a stage imports its private (underscore) modules or
    names."""
    pkg = ROOT / "include" / "vloop"
    top = {p.stem for p in pkg.glob("*.py")}
    assert top == {"__init__", "cli", "uipage", "services"}, top
    assert {p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(STAGES)
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((pkg / stage / "__init__.py").read_text()))
        assert doc and len(doc) > 150, stage
        assert len(list((pkg / stage).glob("*.py"))) >= 3, stage
    offenders = []
    for p in list(pkg.rglob("*.py")) + [q for d in ("serving", "training", "plugins", "dags", "bench", "tests")
                                        for q in (ROOT / d).rglob("*.py")]:
        rel = p.relative_to(ROOT).as_posix()
        own = p.relative_to(pkg).parts[0] if p.is_relative_to(pkg) else None
        for mod in _imported_modules(p):
            parts = mod.split(".")
            if parts[0] == "vloop" and len(parts) > 2 and parts[1] in STAGES and parts[1] != own \
                    and any(x.startswith("_") for x in parts[2:]) and rel.split("/")[0] != "tests":
                offenders.append((rel, mod))
    assert offenders == [], "imports of another stage's private names"


def test_the_floors_of_the_stages():
    """docs/architecture.md: ``store`` imports no other stage, ``vlm`` only ``store``, and the
    privacy records and the service runner nothing of vloop (so every stage may use them)."""
    pkg = ROOT / "include" / "vloop"
    allowed = {"store": {"store", "services"}, "vlm": {"store", "vlm"}}
    for stage, ok in allowed.items():
        for p in (pkg / stage).glob("*.py"):
            used = {m.split(".")[1] for m in _imported_modules(p) if m.startswith("vloop.")}
            assert used <= ok, (p.name, used - ok)
    for base in (pkg / "privacy" / "records.py", pkg / "services.py"):
        assert not [m for m in _imported_modules(base) if m.startswith("vloop")], base
