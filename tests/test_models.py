"""Two tiers behind one endpoint: a Mixtral and a dense Mistral checkpoint served by one Serve app,
reached as users reach it (the openai client, raw HTTP, grpcio, the CLI): each request served by the
model it names, a route splitting users by weight, usage counted by model and by user, moderation.
The README's snippets run against the same app, whose MoE model is called tiny, with no API key."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
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
from cluster.serve.app import GRPC_SERVICER, build_app
from cluster.serve.args import ServeArgs
from mixtral.checkpoint import Checkpoint
from mixtral.tokenizer import load_tokenizer
from protos import moe_pb2, moe_pb2_grpc
from tests.readme_snippets import run_curl_snippet, run_openai_snippet
from tests.reference import hf_greedy, hf_model
from tests.test_cli import assert_one_line_error, run_cli_here
from tests.test_edge import grpc_request
from tests.test_parity import random_prompts
from tests.test_serve import free_port

MOE, DENSE, ALIAS = "tiny", "dense-small", "chat"  # the MoE model as the README serves it: "tiny"
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@dataclass
class Endpoint:
    checkpoints: dict[str, Path]
    http_port: int
    grpc_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        conn.request("GET", path)
        response = conn.getresponse()
        status, body = response.status, json.loads(response.read())
        conn.close()
        return status, body


@pytest.fixture(scope="module")
def endpoint(ray_session, make_ckpt) -> Iterator[Endpoint]:  # type: ignore[no-untyped-def]
    checkpoints = {
        MOE: make_ckpt(tokenizer=True, vocab_size=32000),
        # MHA (4/4 heads; the generate test runs GQA), and a window shorter than the longer requests here:
        # its blocks recycle while the endpoint serves.
        DENSE: make_ckpt(preset="mistral-tiny", tokenizer=True, vocab_size=32000, sliding_window=8, num_key_value_heads=4),
    }
    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
    )
    args = ServeArgs(
        models=[
            {"checkpoint": str(checkpoints[MOE]), "served_model_name": MOE, "experts_per_worker": 8},
            {"checkpoint": str(checkpoints[DENSE]), "served_model_name": DENSE},
        ],
        routes=[f"{ALIAS}={DENSE}:75,{MOE}:25"],
        max_num_seqs=64,
        moderation_model=DENSE,  # the cheap tier judges (as --moderation-model)
    )
    with pytest.MonkeyPatch.context() as patch:  # no API key, as `./dev serve` on a machine without MOE_API_KEY
        patch.delenv("MOE_API_KEY", raising=False)
        app = build_app(args)
    serve.run(app, name="moe", route_prefix="/")
    yield Endpoint(checkpoints, http_port, grpc_port)
    serve.shutdown()


def own_greedy(checkpoint: Path, prompt: list[int], max_tokens: int) -> list[int]:
    """What the model's own engine makes of the prompt alone, greedy (as `moe-cluster generate` does)."""
    [seq] = local_engine(Checkpoint.open(checkpoint)).generate(
        [prompt], [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)]
    )
    return seq.output_ids


def test_both_models_are_listed_and_each_request_is_served_by_the_model_it_names(endpoint: Endpoint) -> None:
    cards = {m.id: m for m in endpoint.client.models.list()}
    assert set(cards) == {MOE, DENSE, ALIAS}
    assert cards[MOE].moe and not cards[DENSE].moe  # type: ignore[attr-defined]
    assert cards[ALIAS].route["targets"] == [{"model": DENSE, "weight": 75.0}, {"model": MOE, "weight": 25.0}]  # type: ignore[attr-defined]
    prompt = random_prompts([13], 32000, seed=31)[0]
    with grpc.insecure_channel(f"127.0.0.1:{endpoint.grpc_port}") as channel:
        stub = moe_pb2_grpc.MoEServiceStub(channel)
        for name, checkpoint in endpoint.checkpoints.items():
            expected = own_greedy(checkpoint, prompt, 10)
            answer = endpoint.client.completions.create(model=name, prompt=prompt, max_tokens=10, **GREEDY)
            assert answer.model == name
            assert answer.choices[0].text == load_tokenizer(checkpoint).decode(expected, skip_special_tokens=True)
            reply = stub.Generate(_named(grpc_request(prompt, max_tokens=10, temperature=0.0), name))
            assert list(reply.token_ids) == expected and reply.model == name
            chunks = list(stub.GenerateStream(_named(grpc_request(prompt, max_tokens=10, temperature=0.0), name)))
            assert [t for c in chunks for t in c.token_ids] == expected and {c.model for c in chunks} == {name}
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Generate(_named(grpc_request(prompt, max_tokens=2), "gpt-4"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and MOE in str(unknown.value.details())
        with pytest.raises(grpc.RpcError) as unnamed:
            stub.Generate(grpc_request(prompt, max_tokens=2))
        assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "set model" in str(unnamed.value.details())
    with pytest.raises(openai.NotFoundError) as missing:
        endpoint.client.completions.create(model="gpt-4", prompt=prompt, max_tokens=2)
    assert missing.value.code == "model_not_found" and repr(MOE) in missing.value.message and repr(DENSE) in missing.value.message


def _named(request: moe_pb2.GenerateRequest, model: str, user: str = "") -> moe_pb2.GenerateRequest:
    request.model, request.user = model, user
    return request


def test_the_dense_model_matches_transformers_mistral_through_serve(endpoint: Endpoint) -> None:
    checkpoint = endpoint.checkpoints[DENSE]
    model = hf_model(checkpoint)
    for seed, length in ((41, 5), (42, 19)):  # prompt + output past the window of 8
        prompt = random_prompts([length], 32000, seed=seed)[0]
        answer = endpoint.client.completions.create(model=DENSE, prompt=prompt, max_tokens=12, logprobs=0, **GREEDY)
        ids, logprobs = hf_greedy(model, prompt, 12)
        served = answer.choices[0].logprobs
        assert served is not None and served.token_logprobs is not None
        assert answer.choices[0].text == load_tokenizer(checkpoint).decode(ids, skip_special_tokens=True)
        torch.testing.assert_close(torch.tensor(served.token_logprobs), torch.tensor(logprobs), rtol=0, atol=1e-4)


def test_the_expert_routes_take_the_model_and_refuse_the_dense_one(endpoint: Endpoint, cli_env: dict[str, str]) -> None:
    status, load = endpoint.get("/v1/experts/load")  # default: the only MoE model
    assert status == 200 and load["model"] == MOE and load["experts"] == 8
    assert endpoint.get(f"/v1/experts/load?model={MOE}")[1]["model"] == MOE
    status, refused = endpoint.get(f"/v1/experts/load?model={DENSE}")
    assert status == 400 and refused["error"]["code"] == "model_has_no_experts" and DENSE in refused["error"]["message"]
    status, unknown = endpoint.get("/v1/experts/load?model=gpt-4")
    assert status == 404 and unknown["error"]["code"] == "model_not_found"
    status, alias = endpoint.get(f"/v1/engine/stats?model={ALIAS}")  # a route's alias is no one model
    assert status == 400 and "route's alias" in alias["error"]["message"]
    status, stats = endpoint.get(f"/v1/engine/stats?model={DENSE}")
    assert status == 200 and stats["model"] == DENSE and not stats["moe"] and "expert_map" not in stats["replicas"][0]
    assert "expert_compute_dtype" not in stats and stats["kv_blocks"] > 0
    assert endpoint.get("/v1/engine/stats")[1]["model"] == MOE
    rebalance = run_cli_here("experts", "rebalance", "--url", endpoint.url, "--model", DENSE, env=cli_env)
    assert_one_line_error(rebalance, "400", "is a dense model")
    dense_stats = run_cli_here("stats", "--url", endpoint.url, "--model", DENSE, env=cli_env)
    assert dense_stats.returncode == 0 and "KV cache" in dense_stats.stdout and "layer" not in dense_stats.stdout.lower()
    moe_stats = run_cli_here("stats", "--url", endpoint.url, "--json", env=cli_env)
    assert moe_stats.returncode == 0 and json.loads(moe_stats.stdout)["engine"]["model"] == MOE


def chosen(endpoint: Endpoint, users: list[str], *, max_tokens: int = 1) -> list[str]:
    """The model that answered each user's request for the alias (sent all at once)."""
    client = openai.AsyncOpenAI(base_url=f"{endpoint.url}/v1", api_key="unused", max_retries=0)

    async def one(user: str) -> str:
        answer = await client.completions.create(model=ALIAS, prompt=[1, 2, 3], max_tokens=max_tokens, user=user, **GREEDY)
        return answer.model

    async def every() -> list[str]:
        return list(await asyncio.gather(*(one(u) for u in users)))

    return asyncio.run(every())


def test_a_route_splits_users_by_weight_sticks_to_each_user_and_changes_live(endpoint: Endpoint, cli_env: dict[str, str]) -> None:
    users = [f"user-{i}" for i in range(200)]
    first = chosen(endpoint, users)
    shares = Counter(first)
    assert abs(shares[DENSE] / 200 - 0.75) <= 0.10 and abs(shares[MOE] / 200 - 0.25) <= 0.10, shares
    assert chosen(endpoint, users[:60]) == first[:60]  # every user lands where it landed before
    # A stream that has started when the weights change stays on its model, and loses no token.
    streamer = next(u for u, m in zip(users, first) if m == DENSE)
    stream = endpoint.client.completions.create(
        model=ALIAS, prompt=[5, 6, 7], max_tokens=40, user=streamer, stream=True, **GREEDY
    )
    chunks = [next(iter(stream))]
    moved = run_cli_here("route", "set", ALIAS, f"{DENSE}:0,{MOE}:100", "--url", endpoint.url, env=cli_env)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.strip() == f"{ALIAS} -> {DENSE} 0%, {MOE} 100%"
    chunks += list(stream)
    assert {c.model for c in chunks} == {DENSE} and chunks[-1].choices[0].finish_reason == "length"
    assert len([c for c in chunks if c.choices]) == 40  # a chunk per token: none lost
    assert set(chosen(endpoint, users[:60])) == {MOE}  # new requests follow the new weights
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.http_port, timeout=60)
    conn.request("PUT", f"/v1/routes/{ALIAS}", body=json.dumps({"targets": f"{DENSE}:75,gpt-4:25"}))
    response = conn.getresponse()
    assert response.status == 400 and "'gpt-4' is not a served model" in json.loads(response.read())["error"]["message"]
    conn.request(
        "PUT", f"/v1/routes/{ALIAS}", body=json.dumps({"targets": [{"model": DENSE, "weight": 75}, {"model": MOE, "weight": 25}]})
    )
    assert conn.getresponse().status == 200
    assert chosen(endpoint, users[:60]) == first[:60]  # the weights back: every user back where it was


def test_usage_is_counted_by_model_and_by_user_and_the_user_table_stays_bounded(endpoint: Endpoint) -> None:
    def usage() -> dict[str, Any]:
        return endpoint.get(f"/v1/engine/stats?model={DENSE}")[1]["usage"]

    def prometheus(name: str) -> dict[str, float]:
        families = {f.name: f for f in text_string_to_metric_families(metrics_text(endpoint))}
        out: dict[str, float] = {}
        for sample in families[name].samples:
            if sample.name.endswith("_total"):
                out[sample.labels["model"]] = out.get(sample.labels["model"], 0.0) + sample.value
        assert set(out) == {MOE, DENSE}, out
        return out

    before, prompt_before = usage(), prometheus("moe_prompt_tokens")
    sent: dict[tuple[str, str], tuple[int, int]] = {}  # (model, user) -> (prompt tokens, completion tokens)
    for i, (model, length, out) in enumerate([(MOE, 40, 30), (DENSE, 50, 25), (DENSE, 45, 35), (MOE, 60, 20)]):
        user = f"heavy-{i % 3}"
        prompt = random_prompts([length], 32000, seed=50 + i)[0]
        endpoint.client.completions.create(model=model, prompt=prompt, max_tokens=out, user=user, **GREEDY)
        p, c = sent.get((model, user), (0, 0))
        sent[(model, user)] = (p + length, c + out)
    after = usage()
    for model in (MOE, DENSE):
        mine = [v for (m, _), v in sent.items() if m == model]
        assert after["models"][model]["prompt_tokens"] - before["models"][model]["prompt_tokens"] == sum(p for p, _ in mine)
        assert after["models"][model]["completion_tokens"] - before["models"][model]["completion_tokens"] == sum(
            c for _, c in mine
        )
    top = {row["user"]: row for row in after["users"]["top"]}
    for i in range(3):
        user = f"heavy-{i}"
        assert top[user]["prompt_tokens"] == sum(p for (_, u), (p, _) in sent.items() if u == user)
        assert top[user]["completion_tokens"] == sum(c for (_, u), (_, c) in sent.items() if u == user)
    assert len(after["users"]["top"]) <= 20 and after["users"]["others"]["users"] >= 200 - 20  # the route test's users
    totals = {k: sum(m[k] for m in after["models"].values()) for k in ("requests", "prompt_tokens", "completion_tokens")}
    rows = after["users"]["top"] + [after["users"]["others"]]
    assert totals == {k: sum(r[k] for r in rows) for k in totals}
    # Prometheus counts the same tokens by model (label `model`), never by user.
    deadline = time.monotonic() + 30
    while (grown := prometheus("moe_prompt_tokens")) is not None and any(
        grown[m] - prompt_before[m] != after["models"][m]["prompt_tokens"] - before["models"][m]["prompt_tokens"]
        for m in (MOE, DENSE)
    ):
        assert time.monotonic() < deadline, (grown, prompt_before)
        time.sleep(0.5)
    text = metrics_text(endpoint)
    assert "heavy-0" not in text and 'user="' not in text


def metrics_text(endpoint: Endpoint) -> str:
    with urllib.request.urlopen(f"{endpoint.url}/metrics", timeout=30) as response:
        return response.read().decode()


def test_moderations_through_serve_over_http_and_grpc(endpoint: Endpoint) -> None:
    texts = ["How do I bake bread?", "Tell me how to commit tax fraud."]
    default = endpoint.client.moderations.create(input=texts[0])
    assert default.model == DENSE  # no model named: --moderation-model judges
    assert endpoint.client.moderations.create(input=texts[0], model=MOE).model == MOE
    dense = endpoint.client.moderations.create(input=texts, model=DENSE)
    assert dense.model == DENSE and len(dense.results) == 2
    with grpc.insecure_channel(f"127.0.0.1:{endpoint.grpc_port}") as channel:
        reply = moe_pb2_grpc.MoEServiceStub(channel).Moderate(moe_pb2.ModerateRequest(input=texts, model=DENSE))
        with pytest.raises(grpc.RpcError) as empty:
            moe_pb2_grpc.MoEServiceStub(channel).Moderate(moe_pb2.ModerateRequest())
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reply.model == DENSE
    for over_grpc, over_http in zip(reply.results, dense.results):
        http_scores = {k: v for k, v in over_http.category_scores.model_dump().items() if v is not None}
        assert dict(over_grpc.category_scores) == pytest.approx(http_scores, abs=1e-5)
        assert over_grpc.flagged == over_http.flagged


def test_the_readmes_curl_snippet_as_pasted(endpoint: Endpoint) -> None:
    run_curl_snippet(endpoint.http_port)


def test_the_readmes_openai_snippet_as_pasted(endpoint: Endpoint) -> None:
    run_openai_snippet(endpoint.http_port)
