"""Shared fixtures: one Ray instance per session and small checkpoints made once per session."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from mixtral.synthetic import make_checkpoint

# A small shape so that a test checkpoint loads in well under a second; tests override fields.
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
)

torch.set_num_threads(1)  # the test process shares 2 cores with Ray's actors


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "own_ray_cluster: starts a Ray cluster of its own (order: pytest_collection_modifyitems)")
    config.addinivalue_line(
        "markers", "quiet_machine: starts Ray from nothing, as a user does (order: pytest_collection_modifyitems)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The one order the tests depend on, by marker; every test that starts Ray other than through
    the ray_session fixture carries one of the two markers, and no other test relies on its place.

    1. own_ray_cluster (tests/test_autoscaling.py, tests/test_multinode.py): a Ray cluster of their
       own, started before the session's Ray exists. AutoscalingCluster.start stops every Ray process
       of the user, the session's own included, and a second cluster beside the session's would
       share two cores with it.
    2. quiet_machine (the `serve` command in tests/test_serve.py): Ray started from nothing, as a user
       starts it on a machine with no other Ray, so before the session's Ray and Serve apps exist.
    3. Every other test, in file order. The session's Ray starts with the first that asks for
       ray_session and stays up to the end.
    """

    def order(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("own_ray_cluster") else 1 if item.get_closest_marker("quiet_machine") else 2

    items.sort(key=order)


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_ckpt(tokenizer=False, seed=0, preset="tiny", **config overrides) -> a checkpoint dir, made once
    per key; preset "mistral-tiny" makes a dense MistralForCausalLM of the same small shape."""
    made: dict[tuple, Path] = {}

    def make(*, tokenizer: bool = False, seed: int = 0, preset: str = "tiny", **overrides: object) -> Path:
        key = (tokenizer, seed, preset, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt") / "model"
            small = SMALL | (dict(sliding_window=None) if preset == "mistral-tiny" else {})
            made[key] = make_checkpoint(
                out, preset_name=preset, seed=seed, overrides=small | overrides, tokenizer=tokenizer, max_shard_size="300KB"
            )
        return made[key]

    return make


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY_START_ATTEMPTS = 3


@pytest.fixture(scope="session")
def ray_session() -> Iterator[int]:
    """The session's Ray; yields the port where its metrics export serves Prometheus text (/metrics).

    The port is free when chosen, but Ray's own components take random ports as they start, and the
    metrics agent binds it last: where the port was taken meanwhile, the agent fails and the node with
    it. Then Ray is started again on another port."""
    import ray

    for attempt in range(RAY_START_ATTEMPTS):
        port = free_local_port()
        try:
            # As many logical CPUs as CI's machine has cores: replicas size their workers' shares from it
            # (cluster.placement.fitted), and one replica at a time runs (module-scoped clusters).
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
                _metrics_export_port=port,
                _system_config={"metrics_report_interval_ms": 500},
            )
            break
        except Exception:
            ray.shutdown()
            # A node that failed to start leaves its processes behind: this session's only Ray, by now.
            subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=60)
            if attempt == RAY_START_ATTEMPTS - 1:
                raise
    yield port
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_port(ray_session: int) -> int:
    """Where Ray's metrics export serves Prometheus text (/metrics) for the session's Ray."""
    return ray_session


@pytest.fixture(scope="session")
def ray_address(ray_session: int) -> str:
    """For a CLI subprocess to join the session's Ray (RAY_ADDRESS) instead of starting its own."""
    import ray

    return str(ray.get_runtime_context().gcs_address)


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What CLI subprocesses get on top of this process's environment: a private preset cache."""
    return {"MOE_CLUSTER_CACHE": str(tmp_path_factory.mktemp("cache"))}
