"""The gRPC service `moe.MoEService` (protos/moe.proto) over a Frontend.

Serve's gRPC proxy calls the ingress's `Generate`, `GenerateStream` and `Moderate`, which hand over to a
MoEServicer; tests register the same servicer on a plain grpc.aio server. A bad request sets
its status code on the context and raises: both servers answer with that code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from cluster.engine.sampling import SamplingParams
from cluster.serve.frontend import Frontend, ServedModel
from cluster.serve.http import usage
from cluster.serve.moderation import ACCEPTABLE, CATEGORIES
from cluster.serve.openai_api import MAX_MODERATION_INPUTS, MAX_USER_CHARS, ApiError
from protos import moe_pb2

STATUS = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    500: grpc.StatusCode.INTERNAL,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    503: grpc.StatusCode.UNAVAILABLE,
}  # every other ApiError is the caller's mistake: INVALID_ARGUMENT


def set_status(context: Any, e: ApiError) -> None:
    context.set_code(STATUS.get(e.status, grpc.StatusCode.INVALID_ARGUMENT))
    context.set_details(e.message)


def sampling_params(p: moe_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take the OpenAI defaults."""
    return SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else -1,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )


def time_remaining(context: Any) -> float | None:
    """The call's gRPC deadline, where the server's context tells it (grpc.aio does; Serve's proxy
    enforces the deadline itself and cancels the call)."""
    remaining = getattr(context, "time_remaining", lambda: None)()
    return remaining if remaining is not None and remaining < 86400 else None


class MoEServicer:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def Generate(self, request: moe_pb2.GenerateRequest, context: Any) -> moe_pb2.GenerateResponse:
        model, prompt_ids, params = await self._request(request, context)
        try:
            merged = await self.frontend.complete(
                model, prompt_ids, params, timeout_s=time_remaining(context), user=request.user or None
            )
        except ApiError as e:
            set_status(context, e)
            raise
        return moe_pb2.GenerateResponse(
            text=merged.text,
            token_ids=merged.token_ids,
            logprobs=merged.logprobs,
            finish_reason=merged.finish_reason or "",
            usage=moe_pb2.Usage(**usage(len(prompt_ids), len(merged.token_ids))),
            model=model.name,
        )

    async def GenerateStream(self, request: moe_pb2.GenerateRequest, context: Any) -> AsyncIterator[moe_pb2.GenerateChunk]:
        model, prompt_ids, params = await self._request(request, context)
        generated = 0
        user = request.user or None
        try:
            async for delta in self.frontend.generate(model, prompt_ids, params, timeout_s=time_remaining(context), user=user):
                generated += len(delta.token_ids)
                last = delta.finish_reason is not None
                yield moe_pb2.GenerateChunk(
                    text=delta.text,
                    token_ids=delta.token_ids,
                    logprobs=delta.logprobs,
                    finish_reason=delta.finish_reason or "",
                    usage=moe_pb2.Usage(**usage(len(prompt_ids), generated)) if last else None,
                    model=model.name,
                )
        except ApiError as e:
            set_status(context, e)
            raise

    async def _request(self, request: moe_pb2.GenerateRequest, context: Any) -> tuple[ServedModel, list[int], SamplingParams]:
        try:
            self.frontend.authorize(dict(context.invocation_metadata() or ()).get("authorization"))
            model = self._model(request)
            which = request.WhichOneof("prompt")
            if which is None:
                raise ApiError(400, "set the prompt: text or token_ids", param="prompt")
            prompt_ids = list(request.token_ids.ids) if which == "token_ids" else await model.encode(request.text)
            params = sampling_params(request.params)
            await model.check(prompt_ids, params, param="prompt")
            await self.frontend.check_input(model, request.text if which == "text" else prompt_ids, param="prompt")
        except ApiError as e:
            set_status(context, e)
            raise
        return model, prompt_ids, params

    async def Moderate(self, request: moe_pb2.ModerateRequest, context: Any) -> moe_pb2.ModerateResponse:
        try:
            self.frontend.authorize(dict(context.invocation_metadata() or ()).get("authorization"))
            if not 1 <= len(request.input) <= MAX_MODERATION_INPUTS:
                raise ApiError(400, f"give 1 to {MAX_MODERATION_INPUTS} texts in input; got {len(request.input)}", param="input")
            judge = self.frontend.judge_of(request.model or None)
            verdicts = await self.frontend.judge(judge, list(request.input))
        except ApiError as e:
            set_status(context, e)
            raise
        results = [
            moe_pb2.ModerationResult(
                flagged=v.flagged,
                categories=v.categories,
                category_scores={c: v.scores[c] for c in CATEGORIES},
                acceptable_score=v.scores[ACCEPTABLE],
            )
            for v in verdicts
        ]
        return moe_pb2.ModerateResponse(model=judge.name, results=results)

    def _model(self, request: moe_pb2.GenerateRequest) -> ServedModel:
        """The model `model` names (a route's alias picks one, sticky per `user`); unset: the only served one."""
        if len(request.user) > MAX_USER_CHARS:
            raise ApiError(400, f"user is {len(request.user)} characters; at most {MAX_USER_CHARS}", param="user")
        if request.model:
            return self.frontend.model(request.model, user=request.user or None)
        if len(self.frontend.served) == 1:
            return self.frontend.served[0]
        raise ApiError(400, f"set model: this server serves {self.frontend.names()}", param="model")
