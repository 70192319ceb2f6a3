"""The HTTP and gRPC edges over a fake engine, without Ray: what users send and what they get back.

Real bytes over real sockets (uvicorn, grpc.aio, the openai client, http.client); only the engine
is a fake with the same contract (cluster.engine.protocol), so every bad-input case runs in seconds.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.serve.chat import ChatRenderer
from cluster.serve.frontend import Delta, Frontend, ServedModel
from cluster.serve.http import completion_logprobs
from mixtral.tokenizer import load_tokenizer
from protos import moe_pb2, moe_pb2_grpc
from tests.fake_engine import FakeEngine, fake_tokens, grpc_server, http_server

MODEL = "moe-small"
CONTEXT = 256
VOCAB = 32000


@pytest.fixture(scope="module")
def checkpoint(make_ckpt) -> Path:  # type: ignore[no-untyped-def]
    return make_ckpt(tokenizer=True, vocab_size=VOCAB)  # the real Mixtral tokenizer; the weights are not read


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=CONTEXT, vocab_size=VOCAB)


def one_model(engine: FakeEngine, checkpoint: Path, *, chat: bool = True, api_key: str | None = None) -> Frontend:
    """The endpoint over one model, MODEL, served by `engine`."""
    model = ServedModel((MODEL,), engine, load_tokenizer(checkpoint), ChatRenderer(checkpoint) if chat else None)
    return Frontend([model], api_key=api_key)


@pytest.fixture(scope="module")
def frontend(engine: FakeEngine, checkpoint: Path) -> Frontend:
    return one_model(engine, checkpoint)


@pytest.fixture(scope="module")
def http_port(frontend: Frontend) -> Iterator[int]:
    with http_server(frontend) as port:
        yield port


@pytest.fixture(scope="module")
def grpc_port(frontend: Frontend) -> Iterator[int]:
    with grpc_server(frontend) as port:
        yield port


def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)


def post(port: int, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4} | fields).encode()


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]} | fields).encode()


BAD_REQUESTS = {
    "malformed JSON": ("/v1/completions", b'{"model": "moe-small", "prompt": '),
    "not an object": ("/v1/completions", b"[1, 2]"),
    "wrong type": ("/v1/completions", completion(max_tokens="many")),
    "prompt of wrong type": ("/v1/completions", completion(prompt={"text": "hi"})),
    "unknown model": ("/v1/completions", completion(model="gpt-4")),
    "missing messages": ("/v1/chat/completions", json.dumps({"model": MODEL}).encode()),
    "empty messages": ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode()),
    "assistant first": ("/v1/chat/completions", chat(messages=[{"role": "assistant", "content": "x"}])),
    "image content part": ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
    "max_tokens 0": ("/v1/completions", completion(max_tokens=0)),
    "max_tokens negative": ("/v1/completions", completion(max_tokens=-3)),
    "max_tokens above context": ("/v1/completions", completion(max_tokens=CONTEXT + 1)),
    "prompt longer than context": ("/v1/completions", completion(prompt=[5] * (CONTEXT + 10))),
    "empty token prompt": ("/v1/completions", completion(prompt=[])),
    "token id outside vocabulary": ("/v1/completions", completion(prompt=[1, 10**6])),
    "temperature negative": ("/v1/completions", completion(temperature=-0.5)),
    "top_p zero": ("/v1/completions", completion(top_p=0)),
    "top_p above one": ("/v1/completions", completion(top_p=1.5)),
    "top_k zero": ("/v1/completions", completion(top_k=0)),
    "n above one": ("/v1/completions", completion(n=2)),
    "five stop strings": ("/v1/completions", completion(stop=["a", "b", "c", "d", "e"])),
    "logprobs above 20": ("/v1/completions", completion(logprobs=21)),
    "echo": ("/v1/completions", completion(echo=True)),
    "non-UTF-8 bytes": ("/v1/completions", b'{"model": "moe-small", "prompt": "\xff\xfe"}'),
    "body over the size limit": ("/v1/completions", completion(prompt="x" * (2 << 20))),
    "chat max_tokens above context": ("/v1/chat/completions", chat(max_tokens=CONTEXT)),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_gets_openai_error_never_reaches_the_engine_and_server_keeps_serving(
    http_port: int, engine: FakeEngine, case: str
) -> None:
    path, body = BAD_REQUESTS[case]
    reached = len(engine.requests)
    status, payload = post(http_port, path, body)
    assert 400 <= status < 500, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["message"]
    assert len(engine.requests) == reached
    status, ok = post(http_port, "/v1/completions", completion(max_tokens=1))
    assert status == 200 and ok["usage"]["completion_tokens"] == 1


def test_errors_have_their_status_and_name_the_param(http_port: int) -> None:
    assert post(http_port, *BAD_REQUESTS["unknown model"])[0] == 404
    assert post(http_port, *BAD_REQUESTS["body over the size limit"])[0] == 413
    assert post(http_port, *BAD_REQUESTS["max_tokens above context"])[1]["error"]["param"] == "max_tokens"
    assert post(http_port, *BAD_REQUESTS["temperature negative"])[1]["error"]["param"] == "temperature"
    assert post(http_port, *BAD_REQUESTS["prompt longer than context"])[1]["error"]["code"] == "context_length_exceeded"
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    conn.request("GET", "/v1/nowhere")
    response = conn.getresponse()
    assert response.status == 404 and "message" in json.loads(response.read())["error"]


def test_completion_text_logprobs_usage_and_stream(http_port: int, checkpoint: Path) -> None:
    tokenizer = load_tokenizer(checkpoint)
    prompt = [1, 415, 2936, 9060, 285]
    expected = fake_tokens(prompt, 7, VOCAB)
    done = client(http_port).completions.create(model=MODEL, prompt=prompt, max_tokens=7, logprobs=2)
    assert done.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (5, 7, 12)
    assert done.choices[0].logprobs.token_logprobs == [-0.5] * 7
    assert len(done.choices[0].logprobs.top_logprobs[0]) == 2
    chunks = list(
        client(http_port).completions.create(
            model=MODEL, prompt=prompt, max_tokens=7, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    text_prompt = client(http_port).completions.create(model=MODEL, prompt="The experts", max_tokens=3)
    assert text_prompt.usage.prompt_tokens == len(tokenizer("The experts").input_ids)


def test_a_stop_string_ends_the_text_and_closes_the_engine_stream(http_port: int, engine: FakeEngine) -> None:
    full = client(http_port).completions.create(model=MODEL, prompt=[1, 500], max_tokens=12).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    aborted = len(engine.aborted)
    stopped = client(http_port).completions.create(model=MODEL, prompt=[1, 500], max_tokens=12, stop=[stop])
    assert stopped.choices[0].text == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens < 12
    assert len(engine.aborted) == aborted + 1  # the engine was told to stop, not left to run to max_tokens


def test_chat_renders_the_mixtral_format_streaming_and_not(http_port: int, engine: FakeEngine, checkpoint: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    prompt_ids = ChatRenderer(checkpoint).render(messages)
    done = client(http_port).chat.completions.create(model=MODEL, messages=messages, max_tokens=6)  # type: ignore[arg-type]
    assert engine.requests[-1][0] == prompt_ids
    assert done.choices[0].message.role == "assistant"
    text = load_tokenizer(checkpoint).decode(fake_tokens(prompt_ids, 6, VOCAB), skip_special_tokens=True)
    assert done.choices[0].message.content == text
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(prompt_ids), 6)
    chunks = list(
        client(http_port).chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.total_tokens == len(prompt_ids) + 6


def test_models_load_and_health(http_port: int, engine: FakeEngine) -> None:
    assert [m.id for m in client(http_port).models.list()] == [MODEL]
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    conn.request("GET", "/v1/experts/load")
    assert json.loads(conn.getresponse().read()) == {"model": MODEL} | {"layers": 1, "experts": 2, "top_k": 1, "tokens": [[3, 1]]}
    conn.request("GET", "/v1/engine/stats")
    stats = json.loads(conn.getresponse().read())
    usage, moderation = stats.pop("usage"), stats.pop("moderation")
    assert stats == {"model": MODEL, "moe": True} | asyncio.run(engine.stats())
    assert moderation == {"calls": 0, "flagged": 0, "refused_prompts": 0, "filtered_answers": 0}  # --moderate is off
    # Every request that reached the engine is counted, with its prompt's tokens.
    assert usage["models"][MODEL]["requests"] == len(engine.requests)
    assert usage["models"][MODEL]["prompt_tokens"] == sum(len(prompt) for prompt, _ in engine.requests)
    conn.request("GET", "/health")
    health = conn.getresponse()
    assert health.status == 200 and health.read() == b""
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type", "").startswith("text/plain; version=0.0.4")
    assert response.read() == asyncio.run(engine.metrics())
    conn.close()


def test_a_client_that_leaves_mid_stream_aborts_its_request(checkpoint: Path) -> None:
    slow = FakeEngine(max_model_len=CONTEXT, vocab_size=VOCAB, delay_s=0.05)
    with http_server(one_model(slow, checkpoint, chat=False)) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request(
            "POST", "/v1/completions", body=completion(max_tokens=200, stream=True), headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        assert response.status == 200
        response.readline()  # the first SSE event: the request is running
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 10
        while not slow.aborted and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(slow.aborted) == 1


def grpc_request(prompt: list[int] | str, **params: Any) -> moe_pb2.GenerateRequest:
    sampling = moe_pb2.SamplingParams(ignore_eos=True, **params)
    if isinstance(prompt, str):
        return moe_pb2.GenerateRequest(text=prompt, params=sampling)
    return moe_pb2.GenerateRequest(token_ids=moe_pb2.TokenIds(ids=prompt), params=sampling)


def test_grpc_unary_and_streaming(grpc_port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = moe_pb2_grpc.MoEServiceStub(channel)
        reply = stub.Generate(grpc_request([1, 2, 3], max_tokens=6, temperature=0.0))
        chunks = list(stub.GenerateStream(grpc_request([1, 2, 3], max_tokens=6, temperature=0.0)))
    assert list(reply.token_ids) == fake_tokens([1, 2, 3], 6, VOCAB) and reply.finish_reason == "length"
    assert reply.usage.completion_tokens == 6 and reply.usage.total_tokens == 3 + 6
    assert [t for c in chunks for t in c.token_ids] == list(reply.token_ids)
    assert "".join(c.text for c in chunks) == reply.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6


GRPC_BAD = {
    "max_tokens 0": ([1, 2, 3], dict(max_tokens=0)),
    "top_p above one": ([1, 2, 3], dict(max_tokens=4, top_p=2.0)),
    "temperature negative": ([1, 2, 3], dict(max_tokens=4, temperature=-1.0)),
    "top_k zero": ([1, 2, 3], dict(max_tokens=4, top_k=0)),
    "token id outside vocabulary": ([1, 10**6], dict(max_tokens=4)),
    "max_tokens above context": ([1, 2, 3], dict(max_tokens=CONTEXT)),
    "no prompt": (None, dict(max_tokens=4)),
}


@pytest.mark.parametrize("case", GRPC_BAD)
def test_grpc_invalid_request_is_invalid_argument_and_never_reaches_the_engine(
    grpc_port: int, engine: FakeEngine, case: str
) -> None:
    prompt, params = GRPC_BAD[case]
    request = (
        moe_pb2.GenerateRequest(params=moe_pb2.SamplingParams(**params)) if prompt is None else grpc_request(prompt, **params)
    )
    reached = len(engine.requests)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = moe_pb2_grpc.MoEServiceStub(channel)
        with pytest.raises(grpc.RpcError) as unary:
            stub.Generate(request)
        with pytest.raises(grpc.RpcError) as streaming:
            list(stub.GenerateStream(request))
        assert len(stub.Generate(grpc_request([1, 2], max_tokens=1)).token_ids) == 1  # still serving
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT and unary.value.details()
    assert streaming.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(engine.requests) == reached + 1


ODD_BUT_VALID = {
    "temperature below the greedy floor": dict(temperature=1e-300),
    "smallest positive temperature": dict(temperature=5e-324),
    "top_p near zero": dict(top_p=1e-300),
    "largest uint64 seed": dict(seed=2**64 - 1),
    "most negative int64 seed": dict(seed=-(2**63)),
    "top_k above the vocabulary": dict(top_k=10**6),
}

HOSTILE_BODIES = {
    "seed of 2^64": completion(seed=2**64),
    "seed below -2^63": completion(seed=-(2**63) - 1),
    "NaN temperature": completion().replace(b'"max_tokens": 4', b'"max_tokens": 4, "temperature": NaN'),
    "Infinity top_p": completion().replace(b'"max_tokens": 4', b'"max_tokens": 4, "top_p": Infinity'),
    "lone surrogate in the prompt": completion().replace(b'"Hello"', b'"Hi \\ud800 there"'),
    "lone surrogate in a chat message": chat().replace(b'"Hi"', b'"\\udfff"'),
    "integer of 5000 digits": completion().replace(b'"max_tokens": 4', b'"max_tokens": ' + b"9" * 5000),
    "JSON nested 50,000 deep": b'{"model": "moe-small", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "stop string of 10,000 characters": completion(stop=["x" * 10_000]),
    "stop_token_ids outside the vocabulary": completion(stop_token_ids=[VOCAB]),
    "65 stop_token_ids": completion(stop_token_ids=list(range(65))),
    "temperature above 2": completion(temperature=1e308),
}


@pytest.mark.parametrize("case", HOSTILE_BODIES)
def test_hostile_bodies_are_a_400_with_an_openai_error(http_port: int, engine: FakeEngine, case: str) -> None:
    reached = len(engine.requests)
    status, payload = post(
        http_port, "/v1/chat/completions" if b"messages" in HOSTILE_BODIES[case] else "/v1/completions", HOSTILE_BODIES[case]
    )
    assert status == 400, payload
    assert payload["error"]["message"] and payload["error"]["type"] == "invalid_request_error"
    assert len(engine.requests) == reached


@pytest.mark.parametrize("case", ODD_BUT_VALID)
def test_odd_but_valid_sampling_fields_are_served(http_port: int, engine: FakeEngine, case: str) -> None:
    status, payload = post(http_port, "/v1/completions", completion(**ODD_BUT_VALID[case]))
    assert status == 200, payload
    assert payload["usage"]["completion_tokens"] == 4


def test_a_full_queue_is_a_503_with_retry_after_and_grpc_unavailable(checkpoint: Path) -> None:
    full = FakeEngine(max_model_len=CONTEXT, vocab_size=VOCAB, overloaded=True)
    frontend = one_model(full, checkpoint)
    with http_server(frontend) as port:
        for stream in (False, True):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/completions", body=completion(stream=stream), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 503 and response.getheader("Retry-After") == "1"
            assert json.loads(response.read())["error"]["type"] == "server_overloaded"
            conn.close()
    with grpc_server(frontend) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            moe_pb2_grpc.MoEServiceStub(channel).Generate(grpc_request([1, 2], max_tokens=2))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_request_the_engine_fails_is_an_error_never_a_success(checkpoint: Path) -> None:
    failing = FakeEngine(max_model_len=CONTEXT, vocab_size=VOCAB, fail_after=2)
    frontend = one_model(failing, checkpoint)
    with http_server(frontend) as port:
        status, payload = post(port, "/v1/completions", completion(max_tokens=5))
        assert status == 500 and payload["error"]["type"] == "server_error"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request(
            "POST", "/v1/chat/completions", body=chat(max_tokens=5, stream=True), headers={"Content-Type": "application/json"}
        )
        events = [line for line in conn.getresponse().read().decode().splitlines() if line.startswith("data: ")]
        conn.close()
        assert json.loads(events[-1][6:])["error"]["type"] == "server_error"  # the last event: no [DONE]
        with pytest.raises(openai.APIError):
            list(client(port).completions.create(model=MODEL, prompt=[1, 2], max_tokens=5, stream=True))
    with grpc_server(frontend) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = moe_pb2_grpc.MoEServiceStub(channel)
        with pytest.raises(grpc.RpcError) as unary:
            stub.Generate(grpc_request([1, 2], max_tokens=5))
        with pytest.raises(grpc.RpcError) as streaming:
            list(stub.GenerateStream(grpc_request([1, 2], max_tokens=5)))
    assert unary.value.code() == streaming.value.code() == grpc.StatusCode.INTERNAL


def test_health_is_a_503_when_the_engine_is_not_healthy(checkpoint: Path) -> None:
    down = FakeEngine(max_model_len=CONTEXT, vocab_size=VOCAB, healthy=False)
    with http_server(one_model(down, checkpoint, chat=False)) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 503 and "not healthy" in json.loads(response.read())["error"]["message"]


def test_health_tells_why_only_to_a_caller_with_the_key(checkpoint: Path) -> None:
    down = FakeEngine(max_model_len=CONTEXT, vocab_size=VOCAB, healthy=False)
    frontend = one_model(down, checkpoint, chat=False, api_key="sesame")
    with http_server(frontend) as port:
        messages = {}
        for key in (None, "wrong", "sesame"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/health", headers={"Authorization": f"Bearer {key}"} if key else {})
            response = conn.getresponse()
            assert response.status == 503
            messages[key] = json.loads(response.read())["error"]["message"]
            conn.close()
    assert "fake engine is down" in messages["sesame"]
    assert not any("fake engine" in messages[key] for key in (None, "wrong"))


# Values a client can send for any field: right and wrong types, edges, junk.
ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
FIELDS = {
    "model": st.just(MODEL) | ANY_JSON,
    "prompt": st.text(max_size=30) | st.lists(st.integers(min_value=-5, max_value=VOCAB + 5), max_size=20) | ANY_JSON,
    "max_tokens": st.integers(min_value=-2, max_value=CONTEXT + 2) | ANY_JSON,
    "temperature": st.floats(min_value=0, max_value=3) | st.sampled_from([1e-300, 5e-324, -0.0]) | ANY_JSON,
    "top_p": st.floats(min_value=0, max_value=1.5) | st.sampled_from([1e-300, 5e-324]) | ANY_JSON,
    "top_k": st.integers(min_value=-3, max_value=10**9) | ANY_JSON,
    "seed": st.integers(min_value=-(2**65), max_value=2**65) | ANY_JSON,
    "stop": st.lists(st.text(max_size=300), max_size=6) | st.text(max_size=5) | ANY_JSON,
    "stop_token_ids": st.lists(st.integers(min_value=-3, max_value=VOCAB + 3), max_size=70) | ANY_JSON,
    "logprobs": st.integers(min_value=-2, max_value=25) | ANY_JSON,
    "stream": st.booleans() | ANY_JSON,
    "n": st.integers(min_value=0, max_value=3) | ANY_JSON,
    "ignore_eos": st.booleans() | ANY_JSON,
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({}, optional=FIELDS))
def test_any_completion_request_is_answered_without_a_5xx(http_port: int, body: dict[str, Any]) -> None:
    send = post_stream if body.get("stream") is True else post
    status, payload = send(http_port, "/v1/completions", json.dumps(body).encode())
    assert status < 500, payload
    if status >= 400:
        assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]


def post_stream(port: int, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """A streaming request: its status, and the error body or the last data event before [DONE]."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    if response.status != 200:
        return response.status, json.loads(text)
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-1]
    return 200, json.loads(events[-2])


def test_an_api_key_is_required_over_http_and_grpc_when_set(checkpoint: Path) -> None:
    engine = FakeEngine(max_model_len=CONTEXT, vocab_size=VOCAB)
    frontend = one_model(engine, checkpoint, chat=False, api_key="sesame")
    with http_server(frontend) as port:
        for key in (None, "wrong", "sesame"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
            conn.request("POST", "/v1/completions", body=completion(max_tokens=2), headers=headers)
            response = conn.getresponse()
            payload = json.loads(response.read())
            conn.close()
            if key == "sesame":
                assert response.status == 200 and payload["usage"]["completion_tokens"] == 2
            else:
                assert response.status == 401 and payload["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(port).models.list()
        keyed = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in keyed.models.list()] == [MODEL]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/health")  # health needs no key
        assert conn.getresponse().status == 200
    assert len(engine.requests) == 1
    with grpc_server(frontend) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = moe_pb2_grpc.MoEServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(grpc_request([1, 2], max_tokens=2))
        reply = stub.Generate(grpc_request([1, 2], max_tokens=2), metadata=[("authorization", "Bearer sesame")])
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(reply.token_ids) == 2


def test_a_chunked_upload_over_the_limit_is_a_413(http_port: int) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "moe-small", "prompt": "'
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB in all, with no Content-Length
        yield b'"}'

    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    conn.request("POST", "/v1/completions", body=chunks(), headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]["message"]
    conn.close()


def test_a_request_past_its_deadline_is_a_504_and_is_aborted(checkpoint: Path) -> None:
    slow = FakeEngine(max_model_len=CONTEXT, vocab_size=VOCAB, delay_s=0.05)
    frontend = one_model(slow, checkpoint)
    with http_server(frontend) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        slow_body, deadline = completion(max_tokens=100), {"Content-Type": "application/json", "X-Request-Timeout": "0.4"}
        conn.request("POST", "/v1/completions", body=slow_body, headers=deadline)
        response = conn.getresponse()
        assert response.status == 504 and json.loads(response.read())["error"]["type"] == "timeout"
        conn.request("POST", "/v1/chat/completions", body=chat(max_tokens=100, stream=True), headers=deadline)
        events = [line for line in conn.getresponse().read().decode().splitlines() if line.startswith("data: ")]
        assert len(events) > 2 and json.loads(events[-1][6:])["error"]["type"] == "timeout"  # tokens, then the error
        conn.request("POST", "/v1/completions", body=completion(max_tokens=2), headers=deadline)  # a quick one finishes
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 2
        conn.request("POST", "/v1/completions", body=slow_body, headers={"X-Request-Timeout": "soon"})
        response = conn.getresponse()
        assert response.status == 400 and "X-Request-Timeout" in json.loads(response.read())["error"]["message"]
        conn.close()
    with grpc_server(frontend) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as late:
            moe_pb2_grpc.MoEServiceStub(channel).Generate(grpc_request([1, 2], max_tokens=100), timeout=0.4)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline_end = time.monotonic() + 10
    while len(slow.aborted) < 3 and time.monotonic() < deadline_end:
        time.sleep(0.05)
    assert len(slow.aborted) == 3  # the engine stopped working on all three late requests


def test_rebalance_takes_no_settings_and_says_what_is_wrong(http_port: int, engine: FakeEngine) -> None:
    for body, says in [
        (b'{"copies": 64}', "copies"),  # a client cannot make workers hold more than they were sized for
        (b'{"max_experts_per_worker": 8}', "max_experts_per_worker"),
        (b"[1]", "must be a JSON object"),
        (b"{", "not valid JSON"),
    ]:
        code, payload = post(http_port, "/v1/experts/rebalance", body)
        assert code == 400 and says in payload["error"]["message"], payload
    assert engine.rebalances == 0  # none of those reached the engine
    code, payload = post(http_port, "/v1/experts/rebalance", b"")  # the engine's refusal: no load yet
    assert code == 400 and payload["error"]["message"].startswith("no tokens were routed"), payload
    for body in (b"", b"{}"):
        code, payload = post(http_port, "/v1/experts/rebalance", body)
        assert code == 200 and payload["model"] == MODEL and payload["balancedness_predicted"] == 1.0


def test_completion_logprobs_text_offsets_take_time_linear_in_the_answer(frontend: Frontend) -> None:
    """An answer's offsets are a running sum: quadratic work here would stall every stream on the ingress."""

    class Piece(str):
        lengths_taken = 0

        def __len__(self) -> int:
            Piece.lengths_taken += 1
            return super().__len__()

    n = 3000
    delta = Delta(text="", token_ids=list(range(n)), logprobs=[0.0] * n, top_logprobs=[], finish_reason="length")
    with pytest.MonkeyPatch.context() as patch:
        model = frontend.served[0]
        patch.setattr(model, "token_text", lambda token_id: Piece("ab"))
        offsets = completion_logprobs(model, delta, 5)["text_offset"]
    assert offsets == [5 + 2 * i for i in range(n)]
    assert Piece.lengths_taken <= 2 * n
