"""Replica autoscaling on the session's Ray: Serve adds a replica under load and drains one when the
load falls, every request finishes with the one-replica tokens, and every view covers all replicas."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from ray import serve

from cluster.serve.app import build_app
from cluster.serve.args import ServeArgs
from tests.test_parity import random_prompts
from tests.test_serve import free_port

PROMPT_LEN, SHORT, LONG = 12, 48, 1000
MAX_NUM_SEQS = 4


def complete(port: int, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """A greedy completion by token ids, streamed; its tokens (each token's text) and finish reason."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"model": "scaling", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body |= {"logprobs": 1, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    ids: list[str] = []
    finish = None
    for line in response:
        text = line.decode().strip()
        if not text.startswith("data: ") or text == "data: [DONE]":
            continue
        choice = json.loads(text[6:])["choices"][0]
        ids += choice["logprobs"]["tokens"]
        finish = choice["finish_reason"] or finish
    conn.close()
    return {"ids": ids, "finish_reason": finish}


def get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 200, body
    return body


def replica_states() -> dict[str, int]:
    status = serve.status().applications["scaling"].deployments["EngineServer"]
    return {str(state): n for state, n in status.replica_states.items()}


def wait_for(what: str, check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_burst_adds_a_replica_and_a_drained_replica_finishes_its_requests(ray_session, make_ckpt) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(tokenizer=True, vocab_size=32000, num_local_experts=2, max_position_embeddings=2048)
    [prompt] = random_prompts([PROMPT_LEN], 32000, seed=7)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ServeArgs(
        checkpoint=str(checkpoint),
        model_name="scaling",
        max_num_seqs=MAX_NUM_SEQS,
        min_replicas=1,
        max_replicas=2,
        upscale_delay_s=0,
        downscale_delay_s=5,
        prefix_caching=False,
    )
    serve.run(build_app(args), name="scaling", route_prefix="/")
    try:
        reference = complete(port, prompt, LONG)["ids"]  # the one-replica run
        assert len(reference) == LONG
        results: list[dict[str, Any]] = []
        burst_done = threading.Event()

        def burst() -> None:
            # Keep 3 requests per slot in flight until a second replica serves: a queue Serve must answer.
            with ThreadPoolExecutor(3 * MAX_NUM_SEQS) as pool:
                pending = [pool.submit(complete, port, prompt, SHORT) for _ in range(3 * MAX_NUM_SEQS)]
                while not burst_done.is_set():
                    done = [f for f in pending if f.done()]
                    for f in done:
                        results.append(f.result())
                        pending.remove(f)
                        pending.append(pool.submit(complete, port, prompt, SHORT))
                    time.sleep(0.2)
                results.extend(f.result() for f in pending)

        loader = threading.Thread(target=burst)
        loader.start()

        def second_replica_served() -> bool:
            stats = json.loads(get(port, "/v1/engine/stats"))
            return len([r for r in stats["replicas"] if r["serving"] and r["steps"] > 0]) == 2

        try:
            wait_for("a second replica to serve", second_replica_served, 240)
        finally:
            burst_done.set()
            loader.join()
        assert replica_states().get("RUNNING") == 2
        metrics = get(port, "/metrics").decode()
        replicas_in_metrics = {
            line.split('replica="')[1].split('"')[0] for line in metrics.splitlines() if line.startswith("moe_generation_tokens")
        }
        assert len(replicas_in_metrics) == 2, metrics

        # Two long requests, one per replica; the load falls below target and Serve removes a replica.
        with ThreadPoolExecutor(2) as pool:
            long_runs = []
            for _ in range(2):
                long_runs.append(pool.submit(complete, port, prompt, LONG))
                time.sleep(0.3)
            wait_for("both replicas running a long request", lambda: both_running(port), 60)
            wait_for("a replica to stop", lambda: replica_states().get("RUNNING") == 1, 120)
            assert not all(f.done() for f in long_runs), "the long requests ended before the replica stopped"
            long_results = [f.result() for f in long_runs]

        for r in long_results:
            assert r["finish_reason"] == "length" and r["ids"] == reference
        for r in results:
            assert r["finish_reason"] == "length" and r["ids"] == reference[:SHORT]

        # The views over both replicas, the stopped one included once its last snapshot is in.
        wait_for("the stopped replica's last snapshot", lambda: not all(r["serving"] for r in loads(port)["replicas"]), 30)
        load = loads(port)
        stats = json.loads(get(port, "/v1/engine/stats"))
        requests = 1 + len(results) + len(long_results)
        routed = (PROMPT_LEN - 1) * requests + SHORT * len(results) + LONG * (1 + len(long_results))
        assert stats["preemptions"] == 0
        assert [sum(row) for row in load["tokens"]] == [2 * routed] * len(load["tokens"])  # top-2 of 2 experts
        assert len(load["replicas"]) == 2 and [r["serving"] for r in load["replicas"]].count(False) == 1
        for layer, row in enumerate(load["tokens"]):
            assert row == [sum(r["tokens"][layer][e] for r in load["replicas"]) for e in range(2)]
        assert all(sum(map(sum, r["tokens"])) > 0 for r in load["replicas"])
    finally:
        serve.shutdown()


def loads(port: int) -> dict[str, Any]:
    return json.loads(get(port, "/v1/experts/load"))


def both_running(port: int) -> bool:
    stats = json.loads(get(port, "/v1/engine/stats"))
    return sorted(r["running"] for r in stats["replicas"] if r["serving"]) == [1, 1]


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
