"""Placement on a simulated multi-node cluster: 4 nodes with a fake GPU each and one CPU node,
running the expert map the planner emitted for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ray.cluster_utils import Cluster

from router.expert_map import ExpertMap
from tests.reference import hf_greedy, hf_model
from tests.test_cli import run_cli, run_cli_here

PROMPT = [1, 33, 400, 7, 7, 91]

pytestmark = pytest.mark.own_ray_cluster  # a Ray cluster of its own (the order: tests/conftest.py)


def test_a_planned_map_with_a_cpu_worker_runs_on_gpu_nodes_and_a_cpu_node(make_ckpt, cli_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(tokenizer=True)  # 8 experts
    # The plan for this cluster: experts two a GPU on 3 GPUs, the coordinator on the 4th, two on a CPU worker.
    planned = run_cli_here(
        "plan", "--model", str(checkpoint), "--gpu", "A100-80GB", "--max-experts-per-gpu", "2", "--cpu-experts", "2",
        "--prompt-len", "128", "--output-len", "64", "--emit", str(tmp_path), env=cli_env,  # within tiny's 256 tokens
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    expert_map = ExpertMap.read(tmp_path / "expert_map.json", num_experts=8)
    assert expert_map.workers == ((0, 1), (2, 3), (4, 5), (6, 7)) and expert_map.kinds == ("gpu", "gpu", "gpu", "cpu")
    assert "4 GPUs + 1 CPU worker per replica" in planned.stdout

    # The head is the CPU node (a raylet fewer on 2 cores); the coordinator and GPU workers need GPU nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cpu_node = cluster.head_node.node_id
        gpu_nodes = {cluster.add_node(num_cpus=1, num_gpus=1).node_id for _ in range(4)}
        cluster.wait_for_nodes()
        proc = run_cli(
            "generate", str(checkpoint), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", "6", "--ignore-eos",
            "--json", "--strategy", "STRICT_SPREAD", "--expert-map", str(tmp_path / "expert_map.json"),
            env=cli_env | {"RAY_ADDRESS": cluster.address},
        )  # fmt: skip
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    workers = out["workers"]
    assert [w["experts"] for w in workers] == [list(h) for h in expert_map.workers]
    gpu_workers, [cpu_worker] = workers[:3], workers[3:]
    assert len({w["node_id"] for w in gpu_workers}) == 3 and {w["node_id"] for w in gpu_workers} < gpu_nodes
    assert all(w["gpu_ids"] == ["0"] for w in gpu_workers)  # each sees the one GPU of its node
    assert all(w["device"] == "cpu" for w in gpu_workers)  # a fake GPU: torch falls back to the CPU
    assert cpu_worker["node_id"] == cpu_node and cpu_worker["gpu_ids"] == []
    ref_ids, ref_logprobs = hf_greedy(hf_model(checkpoint), PROMPT, 6)
    assert out["token_ids"] == ref_ids
    torch.testing.assert_close(torch.tensor(out["logprobs"]), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)
    assert out["finish_reason"] == "length" and isinstance(out["text"], str) and out["text"]
    # 6 prompt tokens and 5 fed-back outputs, each routed to 2 experts, in every layer.
    assert [sum(row) for row in out["expert_load"]] == [(6 + 5) * 2] * 2
