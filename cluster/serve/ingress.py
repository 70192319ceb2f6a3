"""The Serve ingress: a thin shim that runs the HTTP app and the gRPC servicer over the engine deployments.

client ─HTTP/gRPC─► Serve proxy ─► OpenAIIngress ─► Frontend (http.py, grpc_service.py)
                                      └─ per served model: HandleEngine ─DeploymentHandle─► its EngineServer deployment
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from cluster.engine.protocol import EngineUnavailable, ModelInfo, TokenEvent
from cluster.engine.sampling import SamplingParams
from cluster.errors import UserError
from cluster.serve.chat import ChatRenderer
from cluster.serve.frontend import Frontend, ServedModel
from cluster.serve.grpc_service import MoEServicer
from cluster.serve.http import make_api
from cluster.serve.moderation import ModerationSettings
from cluster.serve.request_log import RequestLog
from cluster.serve.routes import RouteTable, Split
from mixtral.checkpoint import Checkpoint
from mixtral.tokenizer import load_tokenizer
from protos import moe_pb2

log = logging.getLogger("ray.serve")
REPLICA_WAIT_S = 120.0  # how long a request whose replica died waits for another to take it over


class HandleEngine:
    """The EngineClient contract over a DeploymentHandle to the engine deployment (EngineServer).

    A stream whose replica dies goes on elsewhere: the request is sent again as a continuation (its
    prompt and the tokens already streamed, with the budget left), to a live replica, or to the one
    Serve brings back, for up to `replica_wait_s`. Sampling draws depend on (seed, position) only
    (cluster.engine.sampling), so a seeded or greedy continuation makes the tokens the original would have.
    """

    def __init__(self, handle: DeploymentHandle, *, replica_wait_s: float = REPLICA_WAIT_S) -> None:
        self.handle = handle
        self.replica_wait_s = replica_wait_s

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        sent: list[int] = []  # token ids already streamed to the client
        lost_at: float | None = None  # when the replica serving it was lost, while none has taken it since
        while True:
            stream = self._continuation(prompt_ids, sent, params, request_id)
            try:
                async for event in stream:
                    lost_at = None
                    if event.token_id >= 0:
                        sent.append(event.token_id)
                    yield event
                return
            except RayActorError as e:  # ActorDiedError, ActorUnavailableError: the engine replica went away
                lost_at = lost_at or time.monotonic()
                waited = time.monotonic() - lost_at
                if waited > self.replica_wait_s:
                    raise EngineUnavailable(
                        f"the engine replica is unavailable ({type(e).__name__}) and none took the request over "
                        f"within {self.replica_wait_s:g} s; retry the request"
                    ) from None
                log.warning("request %s lost its replica after %d tokens; continuing on another", request_id, len(sent))
                await asyncio.sleep(min(1.0, 0.1 + waited / 10))
            finally:
                stream.cancel()  # a client that left: the engine aborts the request and frees its sequence

    def _continuation(
        self, prompt_ids: list[int], sent: list[int], params: SamplingParams, request_id: str
    ) -> DeploymentResponseGenerator:
        """The request from where its stream stands: the prompt with the streamed tokens, the budget left."""
        rest = replace(params, max_tokens=params.max_tokens - len(sent)) if sent else params
        handle = self.handle.options(stream=True)
        return cast(DeploymentResponseGenerator, handle.generate.remote(prompt_ids + sent, rest, request_id))

    async def model_info(self) -> ModelInfo:
        return await self.handle.model_info.remote()

    async def expert_load(self) -> dict[str, Any]:
        return await self.handle.expert_load.remote()

    async def stats(self) -> dict[str, Any]:
        return await self.handle.stats.remote()

    async def metrics(self) -> bytes:
        return await self.handle.metrics.remote()

    async def rebalance(self) -> dict[str, Any]:
        return await self.handle.rebalance.remote()

    async def check_health(self) -> None:
        await self.handle.health.remote()  # the engine's view for /health (EngineServer.health)

    async def shutdown(self) -> None:
        pass  # Serve owns the engine replica's life


def chat_renderer(checkpoint: str | Path, *, guardrail: bool) -> ChatRenderer | None:
    try:
        return ChatRenderer(checkpoint, guardrail=guardrail)
    except UserError:
        return None  # chat answers 400 for a checkpoint without tokenizer.model


# Ray's own resource of the head node (as Serve's controller asks it): the ingress and the replica
# registry take no CPU, and an actor without resources on a GPU node would keep the autoscaler from
# ever finding the node idle once its replicas are gone.
ON_HEAD = {"node:__internal_head__": 0.001}


@dataclass(frozen=True)
class ModelEntry:
    """What the ingress needs of one served model besides its engine's handle: its names (the first
    the one answers carry), the checkpoint (its tokenizer), and whether chats get the guardrail."""

    names: tuple[str, ...]
    checkpoint: Checkpoint
    guardrail: bool


@serve.deployment(ray_actor_options={"num_cpus": 0, "resources": ON_HEAD}, max_ongoing_requests=1024)
@serve.ingress()
class OpenAIIngress:
    def __init__(
        self,
        engines: dict[str, DeploymentHandle],
        models: list[ModelEntry],
        api_key: str | None = None,
        *,
        routes: tuple[str, ...] = (),
        replica_wait_s: float = REPLICA_WAIT_S,
        moderation: ModerationSettings = ModerationSettings(),
        record_requests: str | None = None,
    ) -> None:
        """`engines`: each model's engine deployment, by its first name."""
        served = []
        for entry in models:
            path = entry.checkpoint.local_path()  # the tokenizer's files, on the node the ingress runs on
            served.append(
                ServedModel(
                    entry.names,
                    HandleEngine(engines[entry.names[0]], replica_wait_s=replica_wait_s),
                    tokenizer=load_tokenizer(path),
                    chat=chat_renderer(path, guardrail=entry.guardrail),
                )
            )
        names = [n for m in served for n in m.names]
        self.frontend = Frontend(
            served,
            api_key=api_key,
            routes=RouteTable(map(Split.parse, routes), names),
            moderation=moderation,
            request_log=RequestLog(record_requests) if record_requests else None,
        )
        self.servicer = MoEServicer(self.frontend)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.frontend)

    # Serve's gRPC proxy calls these by method name.
    async def Generate(self, request: moe_pb2.GenerateRequest, grpc_context: Any) -> moe_pb2.GenerateResponse:
        return await self.servicer.Generate(request, grpc_context)

    async def GenerateStream(self, request: moe_pb2.GenerateRequest, grpc_context: Any) -> AsyncIterator[moe_pb2.GenerateChunk]:
        async for chunk in self.servicer.GenerateStream(request, grpc_context):
            yield chunk

    async def Moderate(self, request: moe_pb2.ModerateRequest, grpc_context: Any) -> moe_pb2.ModerateResponse:
        return await self.servicer.Moderate(request, grpc_context)
