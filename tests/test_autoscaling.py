"""Nodes follow replicas: `plan --emit` files run on a fake-GPU AutoscalingCluster (tests/autoscaling_scenario.py).

The scenario runs in a process of its own, marked own_ray_cluster (the order: tests/conftest.py):
AutoscalingCluster.start stops every Ray process of the user.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cluster.cli import app
from tests.autoscaling_scenario import MAX_NUM_SEQS
from tests.test_serve import free_port

REPOSITORY = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.own_ray_cluster


def ray_processes() -> list[str]:
    """Command lines of Ray's own daemons running on this machine (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # not a process, or one that has just ended
            continue
        if "gcs_server" in cmdline.split(" ")[0] or cmdline.split(" ")[0].endswith("/raylet"):
            found.append(cmdline[:120])
    return found


def test_a_burst_adds_a_replica_and_its_gpu_node_and_both_go_when_it_ends(tmp_path: Path, make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    if running := ray_processes():  # AutoscalingCluster would stop them: never take down someone's cluster
        pytest.skip(f"other Ray processes run on this machine and the fake cluster's start would stop them: {running[0]}")
    checkpoint = make_ckpt(tokenizer=True, vocab_size=32000, num_local_experts=2, max_position_embeddings=2048)
    emitted = tmp_path / "deploy"
    # One expert a GPU: a replica is 1 + 2 GPUs, so two replicas need two of the 4-GPU nodes.
    options = ["--gpu", "L4", "--requests-per-s", "0.05", "--max-replicas", "2", "--max-experts-per-gpu", "1"]
    options += ["--checkpoint-path", str(checkpoint)]
    result = CliRunner().invoke(app, ["plan", "--model", str(checkpoint), *options, "--emit", str(emitted)])
    assert result.exit_code == 0, result.output

    # The emitted Serve config, with what a test on two cores needs: a loopback port, a small batch
    # that a burst overflows, and delays of seconds instead of minutes.
    port = free_port()
    config = yaml.safe_load((emitted / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"] |= {"max_num_seqs": MAX_NUM_SEQS, "upscale_delay_s": 0, "downscale_delay_s": 2}
    assert config["applications"][0]["args"]["min_replicas"] == 1
    (emitted / "serve_config.yaml").write_text(yaml.safe_dump(config))

    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.autoscaling_scenario", str(emitted), str(port)],
            cwd=REPOSITORY,
            env=os.environ | cli_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired as e:
        # The scenario was killed before its own clean-up: stop its fake cluster, or it runs on beside the session.
        subprocess.run(["ray", "stop", "--force", "--grace-period", "3"], env=os.environ | {"PATH": venv_path()}, check=False)
        pytest.fail(f"the scenario took over {e.timeout:.0f} s: {(e.stdout or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(proc.stdout)  # the steps with their times, for -s
    assert "two replicas on 2 GPU nodes" in proc.stdout and "back to one replica on 1 GPU node" in proc.stdout


def venv_path() -> str:
    return f"{Path(sys.executable).parent}:{os.environ['PATH']}"
