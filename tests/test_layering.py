"""The layering is code: import-linter contracts in pyproject.toml, run by `./dev test`."""

from __future__ import annotations

import os
import re
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
    env = os.environ | {"PYTHONPATH": str(tree), "COLUMNS": "1000"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def contract_statuses(stdout: str) -> dict[str, str]:
    """Each contract's name -> "KEPT" or "BROKEN", from lint-imports' summary: a line per contract
    (`lint_imports` widens the terminal so that none wraps), then "Contracts: N kept, M broken."."""
    summary, _, totals = stdout.partition("Contracts:")
    statuses = dict(re.findall(r"^(\S.*) (KEPT|BROKEN)$", summary, flags=re.MULTILINE))
    kept, broken = map(int, re.findall(r"(\d+) kept, (\d+) broken", totals)[0])
    assert len(statuses) == kept + broken, stdout  # every contract's line was read
    return statuses


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
        ("router/channel_transport.py", "import ray", "The MoE layer runs without Ray"),
        ("cluster/serve/http.py", "import cluster.engine.build", "The engine interface"),
        ("cluster/model_runner.py", "import router.moe_block", "Models as a family"),
    ],
)
def test_a_wrong_import_breaks_its_contract(tree: Path, module: str, wrong_import: str, contract: str) -> None:
    assert lint_imports(tree).returncode == 0, "the tree as it is must keep every contract"
    path = tree / module
    path.write_text(path.read_text() + f"\n{wrong_import}  # noqa\n")
    proc = lint_imports(tree)
    assert proc.returncode != 0
    statuses = contract_statuses(proc.stdout)
    named = [name for name in statuses if contract in name]
    assert len(named) == 1, f"{contract!r} names one contract of {list(statuses)}"
    assert [name for name, status in statuses.items() if status == "BROKEN"] == named, proc.stdout


def test_model_router_and_workers_run_without_ray_serve() -> None:
    probe = (
        "import sys, mixtral.checkpoint, mixtral.attention, mixtral.synthetic, router.moe, router.transport, "
        "router.channel_transport, router.trace, workers.expert_worker\n"
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('ray.')} & {'serve'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
