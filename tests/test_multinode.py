"""Placement on a simulated multi-node cluster: one node per expert, each with a fake GPU."""

from __future__ import annotations

import json

import torch
from ray.cluster_utils import Cluster

from tests.reference import hf_greedy, hf_model
from tests.test_cli import run_cli

PROMPT = [1, 33, 400, 7, 7, 91]


def test_strict_spread_puts_each_worker_on_its_own_gpu_node(make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    # Two experts, so two GPU nodes: each simulated node is a raylet of its own on the 2-core machine.
    checkpoint = make_ckpt(num_local_experts=2, num_experts_per_tok=1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        gpu_nodes = {cluster.add_node(num_cpus=1, num_gpus=1).node_id for _ in range(2)}
        cluster.wait_for_nodes()
        proc = run_cli(
            "generate",
            str(checkpoint),
            "--prompt-ids",
            ",".join(map(str, PROMPT)),
            "--max-tokens",
            "6",
            "--ignore-eos",
            "--json",
            "--strategy",
            "STRICT_SPREAD",
            env=cli_env | {"RAY_ADDRESS": cluster.address},
        )
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    workers = out["workers"]
    assert {w["node_id"] for w in workers} == gpu_nodes and len(workers) == 2  # 2 workers on 2 distinct GPU nodes
    assert all(w["gpu_ids"] == ["0"] for w in workers)  # each sees the one GPU of its node
    assert all(w["device"] == "cpu" for w in workers)  # a fake GPU: torch falls back to the CPU
    ref_ids, ref_logprobs = hf_greedy(hf_model(checkpoint), PROMPT, 6)
    assert out["token_ids"] == ref_ids
    torch.testing.assert_close(torch.tensor(out["logprobs"]), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)
