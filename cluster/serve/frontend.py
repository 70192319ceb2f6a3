"""What the HTTP and gRPC edges share: the model's name, tokenizing, chat rendering, request
checks, and each request's output as detokenized deltas.

    edge (http.py, grpc_service.py) ─► Frontend ─► EngineClient.generate (TokenEvents)
                                         └─ Detokenizer: text deltas, stop strings

Every user mistake becomes an ApiError (an OpenAI error body over HTTP, INVALID_ARGUMENT or
NOT_FOUND over gRPC) before the engine sees the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cluster.engine.protocol import EngineClient, EngineOverloaded, EngineUnavailable, ModelInfo, TokenEvent
from cluster.engine.sampling import SamplingParams
from cluster.engine.scheduler import check_request
from cluster.errors import FieldError, UserError
from cluster.serve.chat import ChatRenderer
from cluster.serve.detokenizer import Detokenizer
from cluster.serve.openai_api import ApiError


@contextlib.asynccontextmanager
async def engine_errors() -> AsyncIterator[None]:
    """The engine's refusals as HTTP-shaped errors (gRPC maps them on: UNAVAILABLE, INTERNAL)."""
    try:
        yield
    except EngineOverloaded as e:
        raise ApiError(503, str(e), kind="server_overloaded", retry_after_s=1) from None
    except EngineUnavailable as e:
        raise ApiError(503, str(e), kind="service_unavailable") from None


async def within(events: AsyncIterator[TokenEvent], timeout_s: float | None) -> AsyncIterator[TokenEvent]:
    """The events that come before the deadline; then ApiError 504 (the caller's closing of the
    stream aborts the request in the engine)."""
    if timeout_s is None:
        async for event in events:
            yield event
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            event = await asyncio.wait_for(events.__anext__(), max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request did not finish within its deadline of {timeout_s:g} s", kind="timeout") from None
        yield event


@dataclass(frozen=True)
class Delta:
    """What one step added to a request: new text and tokens; the last one has finish_reason."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None


def merge(parts: list[Delta]) -> Delta:
    """A whole stream's deltas as one (Frontend.generate ends every stream with a finish_reason)."""
    return Delta(
        text="".join(d.text for d in parts),
        token_ids=[t for d in parts for t in d.token_ids],
        logprobs=[lp for d in parts for lp in d.logprobs],
        top_logprobs=[a for d in parts for a in d.top_logprobs],
        finish_reason=parts[-1].finish_reason,
    )


class Frontend:
    def __init__(
        self, engine: EngineClient, *, model_name: str, tokenizer: Any, chat: ChatRenderer | None, api_key: str | None = None
    ) -> None:
        self.engine = engine
        self.api_key = api_key  # None: no key asked for (the CLI allows that only on a loopback address)
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.chat = chat  # None: the checkpoint has no tokenizer.model, and chat answers 400
        self._info: ModelInfo | None = None

    async def info(self) -> ModelInfo:
        if self._info is None:
            try:
                self._info = await self.engine.model_info()
            except Exception as e:
                raise ApiError(
                    503, f"the engine is not reachable ({type(e).__name__}); retry shortly", kind="service_unavailable"
                ) from None
        return self._info

    def authorize(self, authorization: str | None) -> None:
        """Raise ApiError 401 unless `authorization` is "Bearer <the API key>" (or no key is set)."""
        if self.api_key is None:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(
                401,
                "a valid API key is required: send 'Authorization: Bearer <key>'",
                kind="authentication_error",
                code="invalid_api_key",
            )

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def encode(self, text: str) -> list[int]:
        """Text to token ids, with BOS, as the checkpoint's tokenizer does it; on a worker thread,
        so that a long prompt does not stall every other request's stream on this event loop."""
        return await asyncio.to_thread(lambda: list(self.tokenizer(text).input_ids))

    async def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages in the Mixtral instruct format, as token ids; on a worker thread, as encode."""
        chat = self.chat
        if chat is None:
            raise ApiError(400, "this model has no tokenizer.model, so it cannot render chat prompts", param="messages")
        try:
            return await asyncio.to_thread(chat.render, messages)
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None

    async def check(self, prompt_ids: list[int], params: SamplingParams, *, param: str) -> None:
        """Raise ApiError, naming the field to fix, for a request the engine cannot run (`param`: the
        field that holds the prompt)."""
        info = await self.info()
        try:
            check_request(prompt_ids, params, max_model_len=info.max_model_len, vocab_size=info.vocab_size)
        except FieldError as e:
            raise ApiError(400, str(e), param=param if e.field == "prompt" else e.field, code=e.code) from None

    async def check_health(self, *, authorization: str | None = None) -> None:
        """Raise ApiError 503 if the engine is not healthy; the reason (internal text) only for a caller
        with the API key, or for any caller where no key is set, since /health itself needs none."""
        try:
            await self.engine.check_health()
        except Exception as e:
            try:
                self.authorize(authorization)
                reason = f": {e}"
            except ApiError:
                reason = " (send the API key for the reason)"
            raise ApiError(503, f"the engine is not healthy{reason}", kind="service_unavailable") from None

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, timeout_s: float | None = None
    ) -> AsyncIterator[Delta]:
        """A checked request's output as text deltas. Stop strings end it early; closing it aborts the request.

        Raises ApiError: 503 (with Retry-After) when the engine's queue is full, 503 when it is
        unavailable, 500 when the engine failed this request, 504 when it is not done within
        `timeout_s` (the request is aborted); never a success for a failure.
        """
        detokenizer = Detokenizer(self.tokenizer, params.stop)
        stream = self.engine.generate(prompt_ids, params, uuid.uuid4().hex)
        async with contextlib.aclosing(stream), engine_errors():  # type: ignore[type-var]  # a client that left frees its sequence
            async for event in within(stream, timeout_s):
                if event.finish_reason == "error":
                    raise ApiError(500, "the engine failed while generating this request; retry it", kind="server_error")
                text = detokenizer.add(event.token_id)
                finish = event.finish_reason or ("stop" if detokenizer.stopped else None)
                if finish:
                    text += detokenizer.flush()
                top = [event.top_logprobs] if params.logprobs else []
                yield Delta(text, [event.token_id], [event.logprob], top, finish)
                if finish:
                    return
        raise ApiError(500, "the engine's stream ended before the request finished; retry it", kind="server_error")

    async def complete(self, prompt_ids: list[int], params: SamplingParams, *, timeout_s: float | None = None) -> Delta:
        """The whole output at once."""
        return merge([d async for d in self.generate(prompt_ids, params, timeout_s=timeout_s)])

    def token_text(self, token_id: int) -> str:
        # The piece itself, with SentencePiece's word marker as the space it stands for, so that
        # tokens concatenate to the text (decoding one id alone would drop a leading space).
        return str(self.tokenizer.convert_ids_to_tokens(token_id)).replace("\u2581", " ")
