"""The layering is code: import-linter contracts in pyproject.toml, run by `./dev test`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mixtral", "router", "workers", "cluster", "protos")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: the copy, not the installed (editable) packages, is what gets analysed.
    env = os.environ | {"PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "module,wrong_import,contract",
    [
        ("cluster/planning/planner.py", "import cluster.bench.run", "The planner imports neither the benchmark nor Ray"),
        ("mixtral/layers.py", "import router.moe", "Roles"),
        ("router/moe.py", "import fastapi", "never import the web edge or the CLI"),
        ("cluster/serve/http.py", "import cluster.engine.build", "The engine interface"),
    ],
)
def test_a_wrong_import_breaks_its_contract(tree: Path, module: str, wrong_import: str, contract: str) -> None:
    assert lint_imports(tree).returncode == 0, "the tree as it is must keep every contract"
    path = tree / module
    path.write_text(path.read_text() + f"\n{wrong_import}  # noqa\n")
    proc = lint_imports(tree)
    assert proc.returncode != 0
    broken = [line for line in proc.stdout.splitlines() if "BROKEN" in line]
    assert broken and contract.split()[0] in proc.stdout.split("Contracts:")[0], proc.stdout


def test_model_router_and_workers_run_without_ray_serve() -> None:
    probe = (
        "import sys, mixtral.checkpoint, mixtral.attention, mixtral.synthetic, router.moe, router.transport, "
        "router.trace, workers.expert_worker\n"
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('ray.')} & {'serve'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
