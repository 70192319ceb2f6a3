"""The Ray Serve application, reached as users reach it: the openai client, raw HTTP, grpcio."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from cluster.engine.build import local_engine
from cluster.engine.sampling import SamplingParams
from cluster.planning.request_trace import read_request_trace
from cluster.serve.app import GRPC_SERVICER, build_app
from cluster.serve.args import ServeArgs
from cluster.serve.chat import GUARDRAIL_PROMPT, ChatRenderer
from mixtral.checkpoint import Checkpoint
from mixtral.tokenizer import load_tokenizer
from protos import moe_pb2_grpc
from tests.reference import hf_greedy, hf_model
from tests.test_cli import assert_one_line_error, run_cli, run_cli_here
from tests.test_edge import completion, grpc_request, post
from tests.test_parity import random_prompts

MODEL = "moe-small"
MAX_WAITING = 64
CONTEXT = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    checkpoint: Path
    http_port: int
    grpc_port: int
    requests_log: Path  # serve --record-requests: every request this module sends

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.http_port}/v1", api_key="unused", max_retries=0)

    def stats(self) -> dict[str, Any]:
        return serve.get_deployment_handle("EngineServer", app_name="moe").stats.remote().result()


@pytest.fixture(scope="module")
def server(ray_session, make_ckpt, tmp_path_factory) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(tokenizer=True, vocab_size=32000)
    requests_log = tmp_path_factory.mktemp("requests") / "requests.jsonl"
    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
    )
    serve.run(
        # 4 hot copies over the 8 workers: every test here runs with copies, and rebalancing has room.
        build_app(
            ServeArgs(
                checkpoint=str(checkpoint),
                served_model_name=MODEL,
                max_num_seqs=32,
                max_waiting=MAX_WAITING,
                replicate_hot=4,
                record_requests=str(requests_log),
            )
        ),
        name="moe",
        route_prefix="/",
    )
    yield Server(checkpoint, http_port, grpc_port, requests_log)
    serve.shutdown()


def solo_greedy(checkpoint: Path, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """Each prompt run alone, greedy, in a fresh in-process engine."""
    out = []
    for prompt, n in zip(prompts, max_tokens):
        [seq] = local_engine(Checkpoint.open(checkpoint)).generate(
            [prompt], [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)]
        )
        out.append(seq.output_ids)
    return out


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@contextmanager
def serve_command(cli_env: dict[str, str], *options: str, key: str | None = None) -> Iterator[tuple[str, str]]:
    """`moe-cluster serve --port P OPTIONS` from nothing (tiny by default, as `./dev serve` runs it), with
    MOE_API_KEY set to `key` or unset: yields (its URL, the line it printed); ends with Ctrl-C, which
    must stop it cleanly."""
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MOE_API_KEY")} | cli_env
    command = [sys.executable, "-m", "cluster", "serve", "--port", str(http_port), *options]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env | ({"MOE_API_KEY": key} if key else {})
    )
    try:
        yield f"http://127.0.0.1:{http_port}", proc.stdout.readline()  # type: ignore[union-attr]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.quiet_machine
def test_serve_command_serves_tiny_by_default_with_vllms_options_and_the_key_from_the_environment(cli_env) -> None:  # type: ignore[no-untyped-def]
    """`moe-cluster serve` from nothing, as `./dev serve` runs it (no checkpoint: the tiny preset, made on
    first use), with vLLM's option names and MOE_API_KEY set; Ctrl-C stops it cleanly (serve_command)."""
    key = "key-from-the-environment"  # MOE_API_KEY's, as `stats` reads it too
    options = ["--served-model-name", "tiny-chat", "--no-enable-prefix-caching", "--dtype", "auto"]
    with serve_command(cli_env, *options, key=key) as (url, line):
        assert line == f"serving tiny-chat at {url}/v1; Ctrl-C stops\n"  # gRPC is off by default
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        [card] = client.models.list().data
        assert (card.id, card.max_model_len) == ("tiny-chat", 4096)  # type: ignore[attr-defined]  # the tiny preset's context
        assert client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        prompt = list(range(100, 140))  # longer than a KV block: a prefix cache would hit on the second request
        for _ in range(2):
            assert client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=2).usage.completion_tokens == 2
        stats = run_cli("stats", "--url", url, "--json", env=cli_env | {"MOE_API_KEY": key})
        assert stats.returncode == 0, stats.stderr
        engine = json.loads(stats.stdout.strip().splitlines()[-1])["engine"]
        assert (engine["prefix_cache_queried_tokens"], engine["prefix_cache_hit_tokens"]) == (80 + 2, 0)  # caching is off


def test_models_list_names_the_model(server: Server) -> None:
    assert [m.id for m in server.client.models.list()] == [MODEL]


def test_completion_text_usage_and_stream(server: Server) -> None:
    tokenizer = load_tokenizer(server.checkpoint)
    prompt = [1, 415, 2936, 9060, 285]
    [expected] = solo_greedy(server.checkpoint, [prompt], [7])
    done = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, **GREEDY)
    assert done.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (5, 7, 12)
    chunks = list(
        server.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=7, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    text_prompt = server.client.completions.create(model=MODEL, prompt="The experts", max_tokens=3, **GREEDY)
    assert text_prompt.usage.prompt_tokens == len(tokenizer("The experts").input_ids)


def test_max_tokens_and_stop_strings(server: Server) -> None:
    full = server.client.completions.create(model=MODEL, prompt="Once upon", max_tokens=12, **GREEDY).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    stopped = server.client.completions.create(model=MODEL, prompt="Once upon", max_tokens=12, stop=[stop], **GREEDY)
    assert stopped.choices[0].text == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 12
    short = server.client.completions.create(model=MODEL, prompt="Once upon", max_tokens=2, **GREEDY)
    assert short.usage.completion_tokens == 2 and full.startswith(short.choices[0].text)


def test_same_seed_same_text(server: Server) -> None:
    def sample(seed: int) -> str:
        r = server.client.completions.create(
            model=MODEL, prompt="Tell me", max_tokens=10, temperature=1.0, seed=seed, extra_body={"ignore_eos": True}
        )
        return r.choices[0].text

    assert sample(42) == sample(42)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_chat_in_mixtral_format_streaming_and_not(server: Server) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    prompt_ids = ChatRenderer(server.checkpoint).render(messages)
    [expected] = solo_greedy(server.checkpoint, [prompt_ids], [6])
    tokenizer = load_tokenizer(server.checkpoint)
    done = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, **GREEDY)  # type: ignore[arg-type]
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(prompt_ids), 6)
    chunks = list(
        server.client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,  # type: ignore[arg-type]
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done.choices[0].message.content
    assert chunks[-1].usage.total_tokens == len(prompt_ids) + 6


def test_guardrail_prompt_is_rendered_first(server: Server) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    plain = ChatRenderer(server.checkpoint).tokenizer.decode(ChatRenderer(server.checkpoint).render(messages))
    guarded_ids = ChatRenderer(server.checkpoint, guardrail=True).render(messages)
    guarded = ChatRenderer(server.checkpoint).tokenizer.decode(guarded_ids)
    assert GUARDRAIL_PROMPT in guarded and GUARDRAIL_PROMPT not in plain
    assert guarded.index(GUARDRAIL_PROMPT) < guarded.index("Hi")


def test_greedy_over_http_and_grpc_equals_transformers(server: Server) -> None:
    prompt = [1, 99, 1042, 7, 311, 20]
    ref_ids, ref_logprobs = hf_greedy(hf_model(server.checkpoint), prompt, 8)
    reply = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=0, **GREEDY)
    assert reply.choices[0].text == load_tokenizer(server.checkpoint).decode(ref_ids, skip_special_tokens=True)
    torch.testing.assert_close(
        torch.tensor(reply.choices[0].logprobs.token_logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4
    )
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        grpc_reply = moe_pb2_grpc.MoEServiceStub(channel).Generate(grpc_request(prompt, max_tokens=8, temperature=0.0))
    assert list(grpc_reply.token_ids) == ref_ids


def test_continuous_batching_16_concurrent_requests(server: Server) -> None:
    prompts = random_prompts([3 + 2 * i for i in range(16)], 32000, seed=5)
    lengths = [4 + i for i in range(16)]
    steps_before = server.stats()["steps"]

    async def run_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)
        replies = await asyncio.gather(
            *[client.completions.create(model=MODEL, prompt=p, max_tokens=n, **GREEDY) for p, n in zip(prompts, lengths)]
        )
        return [r.choices[0].text for r in replies]

    texts = asyncio.run(run_all())
    steps = server.stats()["steps"] - steps_before
    assert steps < sum(lengths) / 4, f"{steps} engine steps for {sum(lengths)} generated tokens"
    tokenizer = load_tokenizer(server.checkpoint)
    assert texts == [tokenizer.decode(ids, skip_special_tokens=True) for ids in solo_greedy(server.checkpoint, prompts, lengths)]


def test_a_bad_request_is_a_4xx_from_the_real_app_and_it_keeps_serving(server: Server) -> None:
    # Every kind of bad input is covered over a fake engine (test_edge.py); this is the real app's wiring.
    status, payload = post(server.http_port, "/v1/completions", completion(max_tokens=CONTEXT + 1))
    assert status == 400 and payload["error"]["param"] == "max_tokens"
    assert post(server.http_port, "/v1/completions", completion(model="gpt-4"))[0] == 404
    status, ok = post(server.http_port, "/v1/completions", completion(max_tokens=1))
    assert status == 200 and ok["usage"]["completion_tokens"] == 1


def test_client_disconnect_mid_stream_frees_its_sequence(server: Server) -> None:
    before = server.stats()
    assert before["running"] == 0
    max_tokens = CONTEXT - 16
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        body=completion(max_tokens=max_tokens, stream=True, ignore_eos=True),
        headers={"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200
    response.readline()  # the first SSE event: the sequence is running now
    assert server.stats()["running"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while server.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = server.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    # Freed by the abort, not by running to max_tokens (one sequence: one token per step).
    assert stats["steps"] - before["steps"] < max_tokens // 2


def test_grpc_unary_and_streaming(server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = moe_pb2_grpc.MoEServiceStub(channel)
        reply = stub.Generate(grpc_request("Hello there", max_tokens=6, temperature=0.0))
        chunks = list(stub.GenerateStream(grpc_request("Hello there", max_tokens=6, temperature=0.0)))
    assert len(reply.token_ids) == 6 and reply.finish_reason == "length"
    assert reply.usage.completion_tokens == 6 and reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    assert [t for c in chunks for t in c.token_ids] == list(reply.token_ids)
    assert "".join(c.text for c in chunks) == reply.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6


def test_grpc_invalid_request_is_invalid_argument(server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = moe_pb2_grpc.MoEServiceStub(channel)
        with pytest.raises(grpc.RpcError) as unary:
            stub.Generate(grpc_request([1, 2, 3], max_tokens=4, top_p=2.0))
        with pytest.raises(grpc.RpcError) as streaming:
            list(stub.GenerateStream(grpc_request([1, 2, 3], max_tokens=0)))
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert streaming.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def get_json(server: Server, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request("GET", path)
    payload = json.loads(conn.getresponse().read())
    conn.close()
    return payload


def test_expert_counters_sum_to_routed_tokens_and_table_agrees(server: Server, cli_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    before = get_json(server, "/v1/experts/load")
    prompts, lengths = random_prompts([5, 9, 2], 32000, seed=8), [4, 6, 3]
    for prompt, n in zip(prompts, lengths):
        server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, **GREEDY)
    after = get_json(server, "/v1/experts/load")
    # Each request feeds its prompt and every generated token but the last; each picks top_k experts.
    fed = sum(len(p) + n - 1 for p, n in zip(prompts, lengths))
    routed = [sum(a) - sum(b) for a, b in zip(after["tokens"], before["tokens"])]
    assert routed == [fed * after["top_k"]] * after["layers"]
    assert after["model"] == MODEL and after["experts"] == 8
    assert all(0 < b <= 1 for b in after["balancedness"]) and all(e > 0 for e in after["router_entropy"])
    assert sum(w["calls"] for w in after["workers"]) > sum(w["calls"] for w in before["workers"])

    proc = run_cli("stats", f"http://127.0.0.1:{server.http_port}", "--plot", str(tmp_path / "load.png"), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[2 : 2 + after["layers"]]]
    assert [[int(c) for c in row[1 : 1 + after["experts"]]] for row in rows] == after["tokens"]
    assert [float(row[-3]) for row in rows] == [round(b, 3) for b in after["balancedness"]]
    assert (tmp_path / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    engine = get_json(server, "/v1/engine/stats")
    per_token = 2 * 2 * 2 * 16 * 4  # keys and values, 2 layers, 2 kv heads of 16, float32
    assert engine["kv_blocks"] * 16 * per_token == engine["kv_cache_bytes"] == server.stats()["kv_cache_bytes"]
    assert engine["prefix_cache_queried_tokens"] >= sum(map(len, prompts)) and 0 <= engine["kv_cache_usage"] <= 1
    assert f"of {engine['kv_blocks']} blocks used" in proc.stdout


def test_rebalance_moves_hot_copies_live_within_the_workers_slots_and_changes_no_token(server: Server, cli_env) -> None:  # type: ignore[no-untyped-def]
    prompt = random_prompts([7], 32000, seed=12)[0]
    first = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **GREEDY)
    before = get_json(server, "/v1/engine/stats")["replicas"][0]["expert_map"]["workers"]
    url = f"http://127.0.0.1:{server.http_port}"
    proc = run_cli_here("experts", "rebalance", url, "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    held = [w["experts"] for w in result["expert_map"]["workers"]]
    assert result["changed"] and result["window_tokens"] > 0
    # Each worker holds as many experts as it was sized for (12 copies on 8 workers), every expert somewhere.
    assert [len(h) for h in held] == [len(w["experts"]) for w in before] and sum(map(len, held)) == 12
    assert sorted({e for h in held for e in h}) == list(range(8))
    assert result["balancedness_predicted"] > 0
    # The workers read their new experts while serving; they now hold what the map says.
    assert [w["experts"] for w in get_json(server, "/v1/experts/load")["workers"]] == held
    again = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **GREEDY)
    assert again.choices[0].text == first.choices[0].text
    assert get_json(server, "/v1/engine/stats")["replicas"][0]["expert_map"]["workers"] == result["expert_map"]["workers"]
    summary = run_cli_here("experts", "rebalance", url, env=cli_env)
    assert summary.returncode == 0 and "balancedness" in summary.stdout


def test_prometheus_exposes_moe_series(server: Server, metrics_port: int) -> None:
    server.client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, **GREEDY)
    wanted = [
        "ray_moe_expert_tokens_total",
        "ray_moe_dispatch_round_trip_seconds",
        "ray_moe_worker_forward_seconds",
        "ray_moe_time_to_first_token_seconds",
        "ray_moe_generation_tokens_total",
        "ray_moe_num_requests_running",
        "ray_moe_kv_cache_usage_perc",
        "ray_moe_kv_cache_free_blocks",
        "ray_moe_prefix_cache_queries_total",
    ]
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        if all(name in text for name in wanted):
            break
        time.sleep(1)
    missing = [name for name in wanted if name not in text]
    assert not missing
    expert_lines = [line for line in text.splitlines() if line.startswith("ray_moe_expert_tokens_total{")]
    assert any(f'model="{server.checkpoint.name}"' in line and 'layer="0"' in line for line in expert_lines)

    # The same series on the serving port, without Ray's prefix, labelled by replica; no key needed.
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    served = response.read().decode()
    conn.close()
    assert response.status == 200 and response.getheader("content-type", "").startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(served)}
    generated = [s for s in families["moe_generation_tokens"].samples if s.name == "moe_generation_tokens_total"]
    assert len(generated) == 1 and generated[0].value >= 3 and generated[0].labels["replica"]
    replica_series = [name.removeprefix("ray_").removesuffix("_total") for name in wanted if "worker" not in name]
    assert all(name in families for name in replica_series)  # worker series are the workers' processes', in Ray's export


def test_200_requests_against_a_bounded_queue_lose_none_and_memory_comes_back(server: Server) -> None:
    prompts = random_prompts([4 + i % 9 for i in range(200)], 32000, seed=40)

    async def burst() -> list[int | str]:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)

        async def one(prompt: list[int]) -> int | str:
            try:
                reply = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **GREEDY)
                return reply.usage.completion_tokens  # type: ignore[union-attr]
            except openai.APIStatusError as e:
                return f"{e.status_code} {e.response.headers.get('retry-after')}"

        return await asyncio.gather(*(one(p) for p in prompts))

    asyncio.run(burst())  # warm-up: the allocator's high-water mark for this load
    before = server.stats()["resident_bytes"]
    outcomes = asyncio.run(burst())
    finished, refused = outcomes.count(8), outcomes.count("503 1")
    assert finished + refused == 200, sorted({str(o) for o in outcomes})  # none lost: each finished or was refused
    assert finished >= 32 + MAX_WAITING  # what the replica could hold was served
    stats = server.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert abs(stats["resident_bytes"] - before) <= 0.1 * before


def test_hostile_requests_beside_ordinary_streams_fail_alone(server: Server) -> None:
    from tests.test_edge import BAD_REQUESTS, HOSTILE_BODIES

    bad = [(path.replace("moe-small", MODEL), body) for path, body in BAD_REQUESTS.values()]
    bad += [("/v1/chat/completions" if b"messages" in body else "/v1/completions", body) for body in HOSTILE_BODIES.values()]
    prompts, lengths = random_prompts([6, 11, 4, 9], 32000, seed=44), [24, 20, 28, 16]

    async def run_all() -> tuple[list[str], list[int]]:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)

        async def ordinary(prompt: list[int], n: int) -> str:
            chunks = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, stream=True, **GREEDY)
            return "".join([c.choices[0].text async for c in chunks if c.choices])

        async def hostile(path: str, body: bytes) -> int:
            return (await asyncio.to_thread(post, server.http_port, path, body))[0]

        streams = [asyncio.create_task(ordinary(p, n)) for p, n in zip(prompts, lengths)]
        statuses = await asyncio.gather(*(hostile(path, body) for path, body in bad))
        return await asyncio.gather(*streams), list(statuses)

    texts, statuses = asyncio.run(run_all())
    assert all(400 <= s < 500 for s in statuses), statuses
    tokenizer = load_tokenizer(server.checkpoint)
    assert texts == [tokenizer.decode(ids, skip_special_tokens=True) for ids in solo_greedy(server.checkpoint, prompts, lengths)]


def test_replay_sends_a_trace_open_loop_and_reports_what_each_request_got(server: Server, cli_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = f"http://127.0.0.1:{server.http_port}"
    outputs = [3, 8, 5, 6, 4, 7]
    jsonl = tmp_path / "trace.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"timestamp": 0.1 * i, "prompt_tokens": 5 + 5 * i, "output_tokens": n}) + "\n"
            for i, n in enumerate(outputs)
        )
    )
    proc = run_cli_here("replay", str(jsonl), "--url", url, "--model", MODEL, "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["requests"], report["completed"], report["failed"]) == (6, 6, 0)
    assert report["output_tokens"] == sum(outputs)  # every request got exactly its output tokens
    assert report["duration_s"] >= 0.5  # the last request is sent at its trace time, 0.5 s in
    for name in ("ttft_ms", "tpot_ms", "latency_ms"):
        p = report[name]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], (name, p)
    assert report["latency_ms"]["p99"] >= report["ttft_ms"]["p99"]
    assert report["output_tok_s"] == pytest.approx(sum(outputs) / report["duration_s"])
    assert 0 <= report["goodput_fraction"] <= 1 and report["targets"] == {"ttft_ms": 2000.0, "tpot_ms": 100.0}
    # serve --record-requests wrote each of them, as it arrived and with what it got; the recorded lines replay.
    sent = [(5 + 5 * i, n) for i, n in enumerate(outputs)]
    logged = [r for r in read_request_trace(server.requests_log) if (r.prompt_tokens, r.output_tokens) in sent]
    mine = logged[-6:]  # the replay's, the last requests of that shape the module sent
    assert [(r.prompt_tokens, r.output_tokens) for r in mine] == sent  # in arrival order: the trace's
    assert 0.3 <= mine[-1].timestamp - mine[0].timestamp <= 3.0  # sent 0.5 s apart, open loop
    recorded = tmp_path / "recorded.jsonl"
    recorded.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in mine))
    again = run_cli_here("replay", str(recorded), "--url", url, "--json", env=cli_env)
    replayed = json.loads(again.stdout.strip().splitlines()[-1])
    assert (replayed["completed"], replayed["output_tokens"]) == (6, sum(outputs))

    # A target nobody meets: no goodput.
    strict = run_cli_here("replay", str(jsonl), "--url", url, "--ttft-ms", "0.001", "--json", env=cli_env)
    missed = json.loads(strict.stdout.strip().splitlines()[-1])
    assert missed["completed"] == 6 and missed["goodput_requests_per_s"] == missed["goodput_fraction"] == 0

    # The Azure LLM inference trace's CSV, its times relative to the first row; the text report.
    azure = tmp_path / "azure.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,12,4\n2023-11-16 18:15:46.9805900,20,2\n"
    )
    text = run_cli_here("replay", str(azure), "--url", url, env=cli_env)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("2 requests, 2 completed, 0 failed") and "goodput:" in text.stdout

    assert_one_line_error(run_cli_here("replay", str(jsonl), "--url", url, "--model", "gpt-4", env=cli_env), "not 'gpt-4'")
    assert_one_line_error(
        run_cli_here("replay", str(jsonl), "--url", f"http://127.0.0.1:{free_port()}", env=cli_env),
        "is `moe-cluster serve` running",
    )
