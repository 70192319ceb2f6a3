"""The ingress deployment: OpenAI-compatible HTTP (FastAPI) and the gRPC service, over the engine.

    client ─HTTP/gRPC─► Serve proxy ─► OpenAIServer (validate, tokenize, render chat, format)
                                          └─ DeploymentHandle ─► EngineServer.generate (streamed Deltas)

Every user mistake becomes a 4xx with an OpenAI error body (or INVALID_ARGUMENT over gRPC) before
the engine sees the request; the server keeps serving.
"""

# No `from __future__ import annotations` here: FastAPI must see real types on the routes
# that Serve's ingress wraps, or it takes `request: Request` for a query parameter.
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.chat import ChatRenderer
from cluster.engine import check_request
from cluster.engine_server import Delta
from cluster.openai_api import MAX_BODY_BYTES, ApiError, ChatCompletionRequest, CompletionRequest, parse_body
from cluster.sampling import SamplingParams
from mixtral.errors import UserError
from mixtral.tokenizer import load_tokenizer
from protos import moe_pb2

api = FastAPI(title="moe-cluster", docs_url=None, redoc_url=None)


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def collect(stream: AsyncIterator[Delta]) -> Delta:
    """All of a stream's deltas as one."""
    parts = [d async for d in stream]
    return Delta(
        text="".join(d.text for d in parts), token_ids=[t for d in parts for t in d.token_ids],
        logprobs=[lp for d in parts for lp in d.logprobs], top_logprobs=[a for d in parts for a in d.top_logprobs],
        finish_reason=parts[-1].finish_reason if parts else "error",
    )


# Helpers above this line: Serve's ingress serialises the class as it is decorated, so a module
# function the routes call must exist by then.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, engine: DeploymentHandle, checkpoint: str, model_name: str, guardrail: bool) -> None:
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = load_tokenizer(checkpoint)
        try:
            self.chat_renderer: ChatRenderer | None = ChatRenderer(checkpoint, guardrail=guardrail)
        except UserError:
            self.chat_renderer = None  # chat answers 400 for a checkpoint without tokenizer.model
        self.info: dict[str, Any] | None = None

    async def _model_info(self) -> dict[str, Any]:
        if self.info is None:
            self.info = await self.engine.model_info.remote()
        return self.info

    # ---- HTTP ----

    @api.get("/health")
    async def health(self) -> Response:
        await self.engine.check_health.remote()
        return Response(status_code=200)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        info = await self._model_info()
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "moe-cluster",
                "max_model_len": info["max_model_len"]}
        return {"object": "list", "data": [card]}

    @api.get("/v1/experts/load")
    async def experts_load(self) -> dict[str, Any]:
        """Tokens per expert per layer since start, with share, balancedness, entropy and worker stats."""
        return {"model": self.model_name} | await self.engine.expert_load.remote()

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = parse_body(await self._read(request), CompletionRequest)
        self._check_model(body.model)
        prompt_ids = body.prompt if isinstance(body.prompt, list) else self.tokenizer(body.prompt).input_ids
        params = await self._params(body, prompt_ids, body.max_tokens, body.logprobs, param="prompt")
        stream = self._generate(prompt_ids, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}

        def choice(delta: Delta, offset: int) -> dict[str, Any]:
            logprobs = self._completion_logprobs(delta, offset) if body.logprobs is not None else None
            return {"index": 0, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                generated, offset = 0, 0
                async for delta in stream:
                    generated += len(delta.token_ids)
                    yield sse(head | {"choices": [choice(delta, offset)]} | ({"usage": None} if body.include_usage else {}))
                    offset += len(delta.text)
                if body.include_usage:
                    yield sse(head | {"choices": [], "usage": usage(len(prompt_ids), generated)})
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        merged = await collect(stream)
        return JSONResponse(head | {"choices": [choice(merged, 0)], "usage": usage(len(prompt_ids), len(merged.token_ids))})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        body: ChatCompletionRequest = parse_body(await self._read(request), ChatCompletionRequest)
        self._check_model(body.model)
        if self.chat_renderer is None:
            raise ApiError(400, "this model has no tokenizer.model, so it cannot render chat prompts", param="messages")
        try:
            prompt_ids = self.chat_renderer.render([{"role": m.role, "content": m.text()} for m in body.messages])
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None
        info = await self._model_info()
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, info["max_model_len"] - len(prompt_ids))
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = await self._params(body, prompt_ids, max_tokens, top, param="messages")
        stream = self._generate(prompt_ids, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": self.model_name}

        def logprobs(delta: Delta) -> dict[str, Any] | None:
            return {"content": self._chat_logprobs(delta)} if body.logprobs else None

        if body.stream:
            async def events() -> AsyncIterator[str]:
                chunk = head | {"object": "chat.completion.chunk"} | ({"usage": None} if body.include_usage else {})
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                yield sse(chunk | {"choices": [first]})
                generated = 0
                async for delta in stream:
                    generated += len(delta.token_ids)
                    content = {"content": delta.text} if delta.text else {}
                    part = {"index": 0, "delta": content, "logprobs": logprobs(delta), "finish_reason": delta.finish_reason}
                    yield sse(chunk | {"choices": [part]})
                if body.include_usage:
                    yield sse(chunk | {"choices": [], "usage": usage(len(prompt_ids), generated)})
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        merged = await collect(stream)
        message = {"role": "assistant", "content": merged.text}
        return JSONResponse(head | {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": logprobs(merged), "finish_reason": merged.finish_reason}],
            "usage": usage(len(prompt_ids), len(merged.token_ids)),
        })

    # ---- gRPC (Serve's gRPC proxy calls these by method name) ----

    async def Generate(self, request: moe_pb2.GenerateRequest, grpc_context: Any) -> moe_pb2.GenerateResponse:
        prompt_ids, params = await self._grpc_request(request, grpc_context)
        merged = await collect(self._generate(prompt_ids, params))
        return moe_pb2.GenerateResponse(
            text=merged.text, token_ids=merged.token_ids, logprobs=merged.logprobs, finish_reason=merged.finish_reason or "",
            usage=moe_pb2.Usage(**usage(len(prompt_ids), len(merged.token_ids))),
        )

    async def GenerateStream(self, request: moe_pb2.GenerateRequest, grpc_context: Any) -> AsyncIterator[moe_pb2.GenerateChunk]:
        prompt_ids, params = await self._grpc_request(request, grpc_context)
        generated = 0
        async for delta in self._generate(prompt_ids, params):
            generated += len(delta.token_ids)
            last = delta.finish_reason is not None
            yield moe_pb2.GenerateChunk(
                text=delta.text, token_ids=delta.token_ids, logprobs=delta.logprobs, finish_reason=delta.finish_reason or "",
                usage=moe_pb2.Usage(**usage(len(prompt_ids), generated)) if last else None,
            )

    async def _grpc_request(self, request: moe_pb2.GenerateRequest, grpc_context: Any) -> tuple[list[int], SamplingParams]:
        try:
            which = request.WhichOneof("prompt")
            if which is None:
                raise UserError("set the prompt: text or token_ids")
            prompt_ids = list(request.token_ids.ids) if which == "token_ids" else self.tokenizer(request.text).input_ids
            p = request.params
            params = SamplingParams(
                max_tokens=p.max_tokens, temperature=p.temperature if p.HasField("temperature") else 1.0,
                top_p=p.top_p if p.HasField("top_p") else 1.0, top_k=p.top_k if p.HasField("top_k") else -1,
                seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids),
                ignore_eos=p.ignore_eos,
            )
            info = await self._model_info()
            check_request(prompt_ids, params, max_model_len=info["max_model_len"], vocab_size=info["vocab_size"])
        except UserError as e:
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(e))
            raise
        return prompt_ids, params

    # ---- shared ----

    async def _read(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {MAX_BODY_BYTES}")
        return await request.body()

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def _params(self, body: Any, prompt_ids: list[int], max_tokens: int, logprobs: int | None, *, param: str) -> SamplingParams:
        info = await self._model_info()
        context = info["max_model_len"]
        if len(prompt_ids) >= context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has {len(prompt_ids)}",
                           param=param, code="context_length_exceeded")
        if len(prompt_ids) + max_tokens > context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt ({len(prompt_ids)}) "
                                f"plus max_tokens ({max_tokens}) exceeds it; lower max_tokens", param="max_tokens")
        params = body.sampling(max_tokens, logprobs)
        try:
            check_request(prompt_ids, params, max_model_len=context, vocab_size=info["vocab_size"])
        except UserError as e:
            raise ApiError(400, str(e), param=param) from None
        return params

    async def _generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        stream = self.engine.options(stream=True).generate.remote(prompt_ids, params, uuid.uuid4().hex)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.cancel()  # a client that left: the engine aborts the request and frees its KV slot

    def _token_text(self, token_id: int) -> str:
        # The piece itself, with SentencePiece's word marker as the space it stands for, so that
        # tokens concatenate to the text (decoding one id alone would drop a leading space).
        return self.tokenizer.convert_ids_to_tokens(token_id).replace("\u2581", " ")

    def _completion_logprobs(self, delta: Delta, offset: int) -> dict[str, Any]:
        tokens = [self._token_text(t) for t in delta.token_ids]
        offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        top = [{self._token_text(t): lp for t, lp in alts} for alts in delta.top_logprobs] or None
        return {"tokens": tokens, "token_logprobs": delta.logprobs, "top_logprobs": top, "text_offset": offsets}

    def _chat_logprobs(self, delta: Delta) -> list[dict[str, Any]]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        alternatives = delta.top_logprobs or [[] for _ in delta.token_ids]
        return [entry(t, lp) | {"top_logprobs": [entry(a, alp) for a, alp in alts]}
                for t, lp, alts in zip(delta.token_ids, delta.logprobs, alternatives)]
