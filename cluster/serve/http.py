"""OpenAI-compatible HTTP over a Frontend: routes, and small pure functions that format bodies and SSE.

GET  /health                 every served model's engine health (workers and loop), 200 or 5xx
GET  /metrics                Prometheus text: every model's and replica's moe_ series, by model and replica (no API key)
GET  /v1/models              the served models (each of their names) and the routes' aliases
GET  /v1/experts/load        tokens per expert per layer since start, with balancedness, worker stats, per replica (?model=)
POST /v1/experts/rebalance   a new expert map from the load since the last rebalance, applied live (one replica; ?model=)
GET  /v1/engine/stats        sequences running and waiting, KV blocks and usage, preemptions, prefix-cache hits, per
                             replica (?model=); tokens by model and by user
GET  /v1/routes              the traffic splits
PUT  /v1/routes/{alias}      a split's weights, live: new requests follow them, started ones stay on their model
POST /v1/moderations         OpenAI's moderations: a served model judges each text (self-reflection, cluster.serve.moderation)
POST /v1/completions         text or token-id prompts; SSE with `stream`
POST /v1/chat/completions    messages in the model's instruct format; SSE with `stream`

Management routes about experts refuse a dense model (400, code model_has_no_experts).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations as real types.
import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.errors import UserError
from cluster.serve.fleet import merged_metrics
from cluster.serve.frontend import Delta, Frontend, ServedModel
from cluster.serve.openai_api import (
    MAX_BODY_BYTES,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ModerationRequest,
    RebalanceRequest,
    RouteRequest,
    parse_body,
)
from cluster.serve.routes import Split

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(model: ServedModel, delta: Delta, offset: int) -> dict[str, Any]:
    """The legacy completions logprobs object for a delta whose text starts at `offset`."""
    tokens = [model.token_text(t) for t in delta.token_ids]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))[: len(tokens)]
    top = [{model.token_text(t): lp for t, lp in alts} for alts in delta.top_logprobs] or None
    return {"tokens": tokens, "token_logprobs": delta.logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(model: ServedModel, delta: Delta) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = model.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    alternatives = delta.top_logprobs or [[] for _ in delta.token_ids]
    return [
        entry(t, lp) | {"top_logprobs": [entry(a, alp) for a, alp in alts]}
        for t, lp, alts in zip(delta.token_ids, delta.logprobs, alternatives)
    ]


async def started(deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """The stream with its first delta already taken, so that an engine that refuses the request
    (a full queue, a replica going away) answers with its status before a 200 is sent."""
    try:
        first = await deltas.__anext__()
    except StopAsyncIteration:
        return deltas

    async def chained() -> AsyncIterator[Delta]:
        yield first
        async for delta in deltas:
            yield delta

    return chained()


async def ending_in_error_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE events; a request that fails after its stream began ends with an error event (the OpenAI
    error body) instead of [DONE], so a client can tell a failure from a finished answer."""
    try:
        async for event in events:
            yield event
    except ApiError as e:
        yield sse(e.body())


TIMEOUT_HEADER = "x-request-timeout"


def request_timeout(request: Request) -> float | None:
    """The request's deadline in seconds from now, from its X-Request-Timeout header, if it has one."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (0 < seconds < 86400):
        raise ApiError(400, f"X-Request-Timeout must be a number of seconds above 0 and below a day, got {value!r}")
    return seconds


async def read_body(request: Request) -> bytes:
    """The body, read no further than the limit: chunked uploads declare no length up front."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {MAX_BODY_BYTES}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
    return bytes(body)


async def completions(frontend: Frontend, request: Request) -> Response:
    body: CompletionRequest = parse_body(await read_body(request), CompletionRequest)
    model = frontend.model(body.model, user=body.user)  # a route's pick holds for the whole request
    prompt_ids = body.prompt if isinstance(body.prompt, list) else await model.encode(body.prompt)
    params = body.sampling(body.max_tokens, body.logprobs)
    await model.check(prompt_ids, params, param="prompt")
    await frontend.check_input(model, body.prompt, param="prompt")
    timeout_s = request_timeout(request)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model.name,
    }

    def choice(delta: Delta, offset: int) -> dict[str, Any]:
        logprobs = completion_logprobs(model, delta, offset) if body.logprobs is not None else None
        return {"index": 0, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

    if not body.stream:
        merged = await frontend.complete(model, prompt_ids, params, timeout_s=timeout_s, user=body.user)
        # A long answer's logprobs take a while to format: off the event loop, which serves every stream.
        whole = await asyncio.to_thread(choice, merged, 0)
        return JSONResponse(head | {"choices": [whole], "usage": usage(len(prompt_ids), len(merged.token_ids))})
    deltas = await started(frontend.generate(model, prompt_ids, params, timeout_s=timeout_s, user=body.user))

    async def events() -> AsyncIterator[str]:
        generated, offset = 0, 0
        async for delta in deltas:
            generated += len(delta.token_ids)
            yield sse(head | {"choices": [choice(delta, offset)]} | ({"usage": None} if body.include_usage else {}))
            offset += len(delta.text)
        if body.include_usage:
            yield sse(head | {"choices": [], "usage": usage(len(prompt_ids), generated)})
        yield sse("[DONE]")

    return StreamingResponse(ending_in_error_events(events()), media_type="text/event-stream")


async def chat_completions(frontend: Frontend, request: Request) -> Response:
    body: ChatCompletionRequest = parse_body(await read_body(request), ChatCompletionRequest)
    model = frontend.model(body.model, user=body.user)  # a route's pick holds for the whole request
    prompt_ids = await model.render_chat([{"role": m.role, "content": m.text()} for m in body.messages])
    info = await model.info()
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, info.max_model_len - len(prompt_ids))
    params = body.sampling(max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    await model.check(prompt_ids, params, param="messages")
    await frontend.check_input(model, "\n".join(m.text() for m in body.messages), param="messages")
    timeout_s = request_timeout(request)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.name}

    def logprobs(delta: Delta) -> dict[str, Any] | None:
        return {"content": chat_logprobs(model, delta)} if body.logprobs else None

    if not body.stream:
        merged = await frontend.complete(model, prompt_ids, params, timeout_s=timeout_s, user=body.user)
        message = {"role": "assistant", "content": merged.text}
        formatted = await asyncio.to_thread(logprobs, merged)  # off the event loop, as for completions
        choice = {"index": 0, "message": message, "logprobs": formatted, "finish_reason": merged.finish_reason}
        return JSONResponse(
            head | {"object": "chat.completion", "choices": [choice], "usage": usage(len(prompt_ids), len(merged.token_ids))}
        )

    deltas = await started(frontend.generate(model, prompt_ids, params, timeout_s=timeout_s, user=body.user))

    async def events() -> AsyncIterator[str]:
        chunk = head | {"object": "chat.completion.chunk"} | ({"usage": None} if body.include_usage else {})
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield sse(chunk | {"choices": [first]})
        generated = 0
        async for delta in deltas:
            generated += len(delta.token_ids)
            content = {"content": delta.text} if delta.text else {}
            part = {"index": 0, "delta": content, "logprobs": logprobs(delta), "finish_reason": delta.finish_reason}
            yield sse(chunk | {"choices": [part]})
        if body.include_usage:
            yield sse(chunk | {"choices": [], "usage": usage(len(prompt_ids), generated)})
        yield sse("[DONE]")

    return StreamingResponse(ending_in_error_events(events()), media_type="text/event-stream")


def make_api(frontend: Frontend) -> FastAPI:
    """The ASGI app: Serve's ingress runs it in its replica; tests run it under uvicorn."""

    def authorized(request: Request) -> None:
        frontend.authorize(request.headers.get("authorization"))

    # Every route but /health needs the API key when one is set.
    api = FastAPI(title="moe-cluster", docs_url=None, redoc_url=None, openapi_url=None)
    v1 = [Depends(authorized)]

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers())

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @api.get("/health")
    async def health(request: Request) -> Response:
        await frontend.check_health(authorization=request.headers.get("authorization"))
        return Response(status_code=200)

    @api.get("/metrics")
    async def metrics() -> Response:
        # A model whose engine cannot answer now is left out of this scrape, not the others with it.
        answers = await asyncio.gather(*(m.engine.metrics() for m in frontend.served), return_exceptions=True)
        texts = [a for a in answers if isinstance(a, bytes)]
        if not texts and answers:
            raise ApiError(503, f"no engine answered for its metrics ({type(answers[0]).__name__})", kind="service_unavailable")
        return Response(merged_metrics(texts), media_type=PROMETHEUS_TEXT)

    @api.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        cards = []
        for served in frontend.served:
            try:
                info = await served.info()
                known = {"max_model_len": info.max_model_len, "moe": info.moe}
            except ApiError:  # its engine is not up yet: the model is still served, its card says less
                known = {}
            cards += [
                {"id": name, "object": "model", "created": 0, "owned_by": "moe-cluster", "root": served.name} | known
                for name in served.names
            ]
        for split in frontend.routes.splits():
            cards.append(
                {"id": split.alias, "object": "model", "created": 0, "owned_by": "moe-cluster", "route": split.to_json()}
            )
        return {"object": "list", "data": cards}

    @api.get("/v1/experts/load", dependencies=v1)
    async def experts_load(model: str | None = None) -> dict[str, Any]:
        served = await frontend.model_of(model, moe=True)
        return {"model": served.name} | await served.engine.expert_load()

    @api.post("/v1/experts/rebalance", dependencies=v1)
    async def experts_rebalance(request: Request, model: str | None = None) -> dict[str, Any]:
        parse_body(await read_body(request) or b"{}", RebalanceRequest)  # an empty object, or nothing
        served = await frontend.model_of(model, moe=True)
        try:
            result = await served.engine.rebalance()
        except UserError as e:  # through Serve's handle, a RayTaskError that is also a UserError: its cause's text
            raise ApiError(400, str(getattr(e, "cause", None) or e)) from None
        return {"model": served.name} | result

    @api.get("/v1/engine/stats", dependencies=v1)
    async def engine_stats(model: str | None = None) -> dict[str, Any]:
        served = await frontend.model_of(model)
        info = await served.info()
        return (
            {"model": served.name, "moe": info.moe}
            | await served.engine.stats()
            | {"usage": frontend.usage.report(), "moderation": frontend.moderation_counts.to_json()}
        )

    @api.post("/v1/moderations", dependencies=v1)
    async def moderations(request: Request) -> dict[str, Any]:
        body: ModerationRequest = parse_body(await read_body(request), ModerationRequest)
        judge = frontend.judge_of(body.model)
        verdicts = await frontend.judge(judge, body.texts())
        return {"id": f"modr-{uuid.uuid4().hex}", "model": judge.name, "results": [v.to_json() for v in verdicts]}

    @api.get("/v1/routes", dependencies=v1)
    async def routes() -> dict[str, Any]:
        return {"routes": frontend.routes.to_json()}

    @api.put("/v1/routes/{alias}", dependencies=v1)
    async def set_route(alias: str, request: Request) -> dict[str, Any]:
        body: RouteRequest = parse_body(await read_body(request), RouteRequest)
        try:
            frontend.routes.set(Split.of(alias, body.targets_text()))
        except UserError as e:
            raise ApiError(400, str(e), param="targets") from None
        now = frontend.routes.get(alias)
        assert now is not None  # set just now
        return now.to_json()  # as it stands now: its targets' order kept

    @api.post("/v1/completions", dependencies=v1)
    async def _completions(request: Request) -> Response:
        return await completions(frontend, request)

    @api.post("/v1/chat/completions", dependencies=v1)
    async def _chat_completions(request: Request) -> Response:
        return await chat_completions(frontend, request)

    return api
