"""A fake engine with the EngineClient contract, and the HTTP and gRPC edges served over it without Ray."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvicorn

from cluster.engine.protocol import EngineOverloaded, ModelInfo, TokenEvent
from cluster.engine.sampling import SamplingParams
from cluster.errors import UserError
from cluster.serve.frontend import Frontend
from cluster.serve.grpc_service import MoEServicer
from cluster.serve.http import make_api
from protos import moe_pb2_grpc


def fake_tokens(prompt_ids: list[int], count: int, vocab_size: int) -> list[int]:
    """What the fake engine generates: a deterministic walk from the prompt's last id, away from the special ids."""
    return [3 + (prompt_ids[-1] + 7 * (i + 1)) % (vocab_size - 3) for i in range(count)]


@dataclass
class FakeEngine:
    """Deterministic tokens, no model; records what reached it and which streams were closed early."""

    max_model_len: int
    vocab_size: int
    delay_s: float = 0.0  # between tokens, so a stream can be left mid-way
    requests: list[tuple[list[int], SamplingParams]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    healthy: bool = True
    overloaded: bool = False  # refuse every request as a full waiting queue does
    fail_after: int | None = None  # end every request with an "error" event after this many tokens
    rebalances: int = 0  # calls of rebalance; the first is refused, as an engine with no load yet refuses

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        if self.overloaded:
            raise EngineOverloaded("64 requests are waiting, the most this replica queues; retry shortly")
        self.requests.append((prompt_ids, params))
        tokens = fake_tokens(prompt_ids, params.max_tokens, self.vocab_size)
        finished = False
        try:
            for i, token in enumerate(tokens):
                if i == self.fail_after:
                    finished = True
                    yield TokenEvent(-1, 0.0, [], "error")
                    return
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                last = i == len(tokens) - 1
                top = [(token, -0.5), (token + 1, -1.5)][: params.logprobs or 0]
                finished = last
                yield TokenEvent(token, -0.5, top, "length" if last else None)
        finally:
            if not finished:
                self.aborted.append(request_id)

    async def model_info(self) -> ModelInfo:
        return ModelInfo(self.max_model_len, self.vocab_size)

    async def expert_load(self) -> dict[str, Any]:
        return {"layers": 1, "experts": 2, "top_k": 1, "tokens": [[3, 1]]}

    async def stats(self) -> dict[str, Any]:
        return {"running": 0, "waiting": 0, "steps": len(self.requests), "kv_cache_usage": 0.25}

    async def rebalance(self) -> dict[str, Any]:
        self.rebalances += 1
        if self.rebalances == 1:
            raise UserError("no tokens were routed since the last rebalance; send traffic first, then rebalance")
        return {"balancedness_before": 0.5, "balancedness_predicted": 1.0}

    async def metrics(self) -> bytes:
        return b"# TYPE moe_fake_steps counter\nmoe_fake_steps_total %d\n" % len(self.requests)

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("the fake engine is down")

    async def shutdown(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def http_server(frontend: Frontend) -> Iterator[int]:
    """The HTTP edge under uvicorn on 127.0.0.1, on a thread of this process; yields its port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_api(frontend), host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True, name="test-http")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def grpc_server(frontend: Frontend) -> Iterator[int]:
    """The gRPC servicer on a plain grpc.aio server on 127.0.0.1, its loop on a thread; yields its port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="test-grpc")
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:  # the server belongs to the loop it is made on
        server = grpc.aio.server()
        moe_pb2_grpc.add_MoEServiceServicer_to_server(MoEServicer(frontend), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
