"""Autoscaling end to end, in a process of its own (tests/test_autoscaling.py runs it).

`python -m tests.autoscaling_scenario EMITTED_DIR PORT` starts ray.cluster_utils.AutoscalingCluster
with the GPU worker node type of EMITTED_DIR/cluster.yaml (fake GPUs) and runs
EMITTED_DIR/serve_config.yaml with `serve run`. Then:

1. A burst overflows the one replica: Serve adds a replica, and the autoscaler the GPU node its
   placement group needs. Every request gets the one-replica run's tokens.
2. The burst ends while one long request runs on each replica: the load falls below target, Serve
   removes a replica, and that replica drains: its long request finishes, with the same tokens.
3. /v1/experts/load sums both replicas' counts, the stopped one's included; /metrics showed both.
4. The idle GPU node goes away: back to the minimum, no request lost.

Exit status 0 when every check holds. AutoscalingCluster.start runs `ray stop --force`, which
stops every Ray process of the user: never run this beside another Ray session.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve
from ray.cluster_utils import AutoscalingCluster

HEAD_NODE_TYPE = "ray.head.default"  # the fake provider's name for the head
MAX_NUM_SEQS = 4
PROMPT = [5 + i for i in range(10)]
SHORT, LONG = 32, 800  # a long request outlasts the scale-down by seconds, even on a faster CPU
API_KEY = "autoscaling-test-key"
START = time.monotonic()


class FakeGpuCluster(AutoscalingCluster):
    """AutoscalingCluster with its base config supplied here: the wheel lacks the example file it reads."""

    def _generate_config(
        self, head_resources: dict, worker_node_types: dict, autoscaler_v2: bool = False, **config_kwargs: Any
    ) -> dict:
        return {
            "cluster_name": "fake-gpus",
            "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
            "upscaling_speed": 1.0,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "auth": {"ssh_user": "nobody"},
            "available_node_types": worker_node_types
            | {HEAD_NODE_TYPE: {"resources": head_resources, "node_config": {}, "max_workers": 0}},
            "head_node_type": HEAD_NODE_TYPE,
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        } | config_kwargs

    def start(self, _system_config: dict | None = None, override_env: dict | None = None) -> None:
        """As AutoscalingCluster.start, with no dashboard: nothing here reads it, and two cores have no room for it."""
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as config:
            json.dump(self._config, config)
        subprocess.check_call(["ray", "stop", "--force"])
        env = os.environ | {"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"} | (override_env or {})
        head = ["ray", "start", "--head", f"--autoscaling-config={config.name}", "--include-dashboard=false"]
        subprocess.check_call([*head, f"--num-cpus={self._head_resources['CPU']}"], env=env)

    def shutdown(self) -> None:
        # SIGKILLed workers linger as zombies until their raylet goes, and `ray stop` waits out its
        # grace period for each group of processes: a short one, as everything is killed anyway.
        subprocess.check_call(["ray", "stop", "--force", "--grace-period", "3"])


class Client:
    """The app over HTTP as a user reaches it, with the API key."""

    def __init__(self, port: int, model: str) -> None:
        self.port, self.model = port, model

    def request(self, method: str, path: str, body: dict | None = None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        return conn.getresponse()

    def get(self, path: str) -> bytes:
        response = self.request("GET", path)
        body = response.read()
        assert response.status == 200, (path, response.status, body)
        return body

    def stats(self) -> dict[str, Any]:
        return json.loads(self.get("/v1/engine/stats"))

    def load(self) -> dict[str, Any]:
        return json.loads(self.get("/v1/experts/load"))

    def complete(self, max_tokens: int) -> dict[str, Any]:
        """A greedy completion of PROMPT, streamed: its tokens (each one's text) and finish reason."""
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        response = self.request("POST", "/v1/completions", body | {"logprobs": 1, "stream": True})
        assert response.status == 200, response.read()
        tokens: list[str] = []
        finish = None
        for line in response:
            text = line.decode().strip()
            if text.startswith("data: {"):
                choice = json.loads(text[6:])["choices"][0]
                tokens += choice["logprobs"]["tokens"]
                finish = choice["finish_reason"] or finish
        return {"tokens": tokens, "finish_reason": finish}


def log(what: str) -> None:
    print(f"{time.monotonic() - START:.0f} s: {what}", flush=True)


def wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def gpu_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


def running_replicas() -> int:
    status = serve.status().applications["moe"].deployments["EngineServer"]
    return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))


def main(emitted: Path, port: int) -> None:
    launcher = yaml.safe_load((emitted / "cluster.yaml").read_text())
    gpu_type = launcher["available_node_types"]["gpu_workers"]
    node_type = {k: gpu_type[k] for k in ("resources", "min_workers", "max_workers")} | {"node_config": {}}
    env = {
        "MOE_API_KEY": API_KEY,  # the emitted config reads the key from here (api_key_env)
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # AutoscalingCluster calls the `ray` CLI
        "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1",  # a node's idle proxy keeps it up 30 s by default
    }
    os.environ.update(env)
    cluster = FakeGpuCluster(
        head_resources={"CPU": 2},
        worker_node_types={"gpu_workers": node_type},
        idle_timeout_minutes=0.05,  # the emitted 5 minutes, shortened for a test
    )
    cluster.start(override_env=env)
    server = None
    try:
        ray.init("auto", logging_level="ERROR", log_to_driver=False)
        server = subprocess.Popen(["serve", "run", str(emitted / "serve_config.yaml")], stdout=subprocess.DEVNULL)
        args = yaml.safe_load((emitted / "serve_config.yaml").read_text())["applications"][0]["args"]
        client = Client(port, args["served_model_name"])
        wait_for("the app to serve", lambda: ready(client), 300)
        first = gpu_nodes()
        assert first == gpu_type["min_workers"] == 1, f"{first} GPU nodes at start, not the {gpu_type['min_workers']} asked"
        log(f"serving: one replica on {first} GPU node")
        reference = client.complete(LONG)["tokens"]  # the one-replica run

        burst = burst_until_two_replicas(client)
        assert gpu_nodes() == 2, f"{gpu_nodes()} GPU nodes with two replicas"
        # Another replica's series are as fresh as its last publish (every 2 s while it works).
        wait_for("/metrics to show both replicas' moe_ series", lambda: len(replicas_in_metrics(client)) == 2, 15)
        log(f"{len(burst)} requests, two replicas on 2 GPU nodes")

        long_runs = drain_one_replica(client)
        for r in long_runs:
            assert r["finish_reason"] == "length" and r["tokens"] == reference, "a drained request was cut or changed"
        for r in burst:
            assert r["finish_reason"] == "length" and r["tokens"] == reference[:SHORT], "a burst request changed"
        log("one replica; the drained replica's long request finished")

        check_load_over_both_replicas(client, requests=[LONG] + [SHORT] * len(burst) + [LONG] * len(long_runs))
        wait_for("the idle GPU node to go", lambda: gpu_nodes() == first, 120)
        log(f"back to one replica on {gpu_nodes()} GPU node")
    finally:
        if server is not None:
            server.kill()
            server.wait(30)
        ray.shutdown()
        log("stopping the cluster")
        cluster.shutdown()
        log("cluster stopped")


def replicas_in_metrics(client: Client) -> set[str]:
    scraped = client.get("/metrics").decode()
    return {line.split('replica="')[1].split('"')[0] for line in scraped.splitlines() if line.startswith("moe_")}


def ready(client: Client) -> bool:
    try:
        return client.stats()["num_replicas"] >= 1
    except (OSError, AssertionError):
        return False


def burst_until_two_replicas(client: Client) -> list[dict[str, Any]]:
    """Keep more requests in flight than one replica runs until a second replica has served; their results."""
    results: list[dict[str, Any]] = []
    in_flight = MAX_NUM_SEQS + 2  # a load of 1.5: two replicas' worth, and little contention

    def two_serving() -> bool:
        return len([r for r in client.stats()["replicas"] if r["serving"] and r["steps"] > 0]) == 2

    with ThreadPoolExecutor(in_flight) as pool:
        pending: list[Future] = [pool.submit(client.complete, SHORT) for _ in range(in_flight)]
        deadline = time.monotonic() + 300
        while not two_serving():
            assert time.monotonic() < deadline, "no second replica served within 300 s"
            for f in [f for f in pending if f.done()]:
                results.append(f.result())
                pending.remove(f)
                pending.append(pool.submit(client.complete, SHORT))
            time.sleep(0.5)
        results.extend(f.result() for f in pending)
    return results


def drain_one_replica(client: Client) -> list[dict[str, Any]]:
    """One long request on each replica; the load falls below target and Serve removes a replica.
    Asserts that the replica stopped while both still ran theirs; returns their results."""
    with ThreadPoolExecutor(2) as pool:
        runs = []
        for _ in range(2):
            runs.append(pool.submit(client.complete, LONG))
            time.sleep(0.3)  # the router counts the first before it places the second

        def one_each() -> bool:
            return sorted(r["running"] for r in client.stats()["replicas"] if r["serving"]) == [1, 1]

        wait_for("a long request on each replica", one_each, 60)
        wait_for("a replica to stop", lambda: running_replicas() == 1, 120)
        assert not any(f.done() for f in runs), "a long request ended before the replica stopped: nothing was drained"
        return [f.result() for f in runs]


def check_load_over_both_replicas(client: Client, requests: list[int]) -> None:
    """Every routed token counted once over the two replicas, and the sum equal to their own counts."""
    wait_for("the stopped replica's last snapshot", lambda: not all(r["serving"] for r in client.load()["replicas"]), 30)
    load, stats = client.load(), client.stats()
    assert stats["preemptions"] == 0 and stats["num_replicas"] == 1
    routed = sum(len(PROMPT) + n - 1 for n in requests)  # a request's last token is never fed back
    experts = load["experts"]
    assert experts == load["top_k"] == 2  # each token goes to both experts
    assert [sum(row) for row in load["tokens"]] == [2 * routed] * load["layers"]
    assert len(load["replicas"]) == 2 and all(sum(map(sum, r["tokens"])) > 0 for r in load["replicas"])
    for layer, row in enumerate(load["tokens"]):
        assert row == [sum(r["tokens"][layer][e] for r in load["replicas"]) for e in range(experts)]


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
