"""What the HTTP and gRPC edges share: the served models and route aliases, tokenizing, chat
rendering, request checks, each request's output as detokenized deltas, and usage.

    edge (http.py, grpc_service.py) ─► Frontend ─► ServedModel (named, or a route's pick) ─► EngineClient.generate
                                         ├─ Detokenizer: text deltas, stop strings
                                         └─ UsageBook: tokens by model and user

Every user mistake becomes an ApiError (an OpenAI error body over HTTP, INVALID_ARGUMENT or
NOT_FOUND over gRPC) before the engine sees the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.engine.protocol import EngineClient, EngineOverloaded, EngineUnavailable, ModelInfo, TokenEvent
from cluster.engine.sampling import SamplingParams
from cluster.engine.scheduler import check_request
from cluster.errors import FieldError, UserError
from cluster.serve.chat import ChatRenderer
from cluster.serve.detokenizer import Detokenizer
from cluster.serve.moderation import (
    Judgement,
    ModerationCounts,
    ModerationSettings,
    judging_params,
    judging_prompt,
    label_token_ids,
)
from cluster.serve.openai_api import ApiError
from cluster.serve.request_log import RequestLog
from cluster.serve.routes import RouteTable
from cluster.serve.usage import UsageBook


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


@dataclass
class ServedModel:
    """One model behind the endpoint: its names (the first is the one answers carry), its engine,
    tokenizer and chat template."""

    names: tuple[str, ...]
    engine: EngineClient
    tokenizer: Any
    chat: ChatRenderer | None  # None: the checkpoint has no tokenizer.model, and chat answers 400
    _info: ModelInfo | None = None
    _labels: tuple[int, ...] | None = None

    def labels(self) -> tuple[int, ...]:
        """The self-moderation labels' tokens (cluster.serve.moderation), found once."""
        if self._labels is None:
            try:
                self._labels = label_token_ids(self.tokenizer)
            except UserError as e:
                raise ApiError(400, f"the model {self.name!r} cannot judge texts: {e}", param="model") from None
        return self._labels

    @property
    def name(self) -> str:
        return self.names[0]

    async def info(self) -> ModelInfo:
        if self._info is None:
            try:
                self._info = await self.engine.model_info()
            except Exception as e:
                raise ApiError(
                    503,
                    f"the engine of {self.name!r} is not reachable ({type(e).__name__}); retry shortly",
                    kind="service_unavailable",
                ) from None
        return self._info

    async def encode(self, text: str) -> list[int]:
        """Text to token ids, with BOS, as the checkpoint's tokenizer does it; on a worker thread,
        so that a long prompt does not stall every other request's stream on this event loop."""
        return await asyncio.to_thread(lambda: list(self.tokenizer(text).input_ids))

    async def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages in the checkpoint's instruct format, as token ids; on a worker thread, as encode."""
        chat = self.chat
        if chat is None:
            raise ApiError(
                400, f"the model {self.name!r} has no tokenizer.model, so it cannot render chat prompts", param="messages"
            )
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

    def token_text(self, token_id: int) -> str:
        # The piece itself, with SentencePiece's word marker as the space it stands for, so that
        # tokens concatenate to the text (decoding one id alone would drop a leading space).
        return str(self.tokenizer.convert_ids_to_tokens(token_id)).replace("\u2581", " ")


class Frontend:
    """The endpoint over its served models: names and route aliases to models, the API key, usage."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        *,
        api_key: str | None = None,
        routes: RouteTable | None = None,
        usage: UsageBook | None = None,
        moderation: ModerationSettings = ModerationSettings(),
        request_log: RequestLog | None = None,
    ) -> None:
        self.api_key = api_key  # None: no key asked for (the CLI allows that only on a loopback address)
        self.served = list(models)
        self.by_name: dict[str, ServedModel] = {}
        for model in self.served:
            for name in model.names:
                if name in self.by_name:
                    raise UserError(f"two served models are called {name!r}; give each its own --served-model-name")
                self.by_name[name] = model
        self.routes = routes or RouteTable([], self.by_name)
        self.usage = usage or UsageBook()
        self.request_log = request_log  # serve --record-requests
        self.moderation = moderation
        if moderation.model is not None and moderation.model not in self.by_name:
            raise UserError(
                f"--moderation-model {moderation.model!r} is not a served model; serve it, or name one of {self.names()}"
            )
        self.moderation_counts = ModerationCounts()

    def names(self) -> str:
        """The served models' names and the routes' aliases, for messages."""
        return ", ".join(repr(n) for n in [*self.by_name, *self.routes.aliases()])

    def model(self, name: str, *, user: str | None = None) -> ServedModel:
        """The model a request's `model` names: a served model's name, or a route's alias (sticky per
        `user`); ApiError 404 naming the served ones otherwise."""
        served = self.by_name.get(self.routes.resolve(name, user))
        if served is None:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.names()}",
                param="model",
                code="model_not_found",
            )
        return served

    def named(self, name: str) -> ServedModel:
        """The served model `name` names, not a route's alias (whose pick would be a random model): for
        management calls and the judge, which must mean one model."""
        if name in self.routes.aliases():
            raise ApiError(400, f"{name!r} is a route's alias, not one model; name one of {self.names()}", param="model")
        return self.model(name)

    async def model_of(self, name: str | None, *, moe: bool = False) -> ServedModel:
        """The model a management route's ?model= names; without one, the only served model, else the
        only MoE one. `moe`: the route is about experts, which a dense model does not have (ApiError 400)."""
        if name is not None:
            served = self.named(name)
        elif len(self.served) == 1:
            served = self.served[0]
        else:
            with_experts = [m for m in self.served if (await m.info()).moe]
            if len(with_experts) != 1:
                raise ApiError(
                    400, f"this server serves several models ({self.names()}); say which with ?model=NAME", param="model"
                )
            served = with_experts[0]
        if moe and not (await served.info()).moe:
            raise ApiError(
                400,
                f"the model {served.name!r} is a dense model: it has no experts to load, map or rebalance",
                param="model",
                code="model_has_no_experts",
            )
        return served

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

    async def check_health(self, *, authorization: str | None = None) -> None:
        """Raise ApiError 503 if any served model's engine is not healthy; the reason (internal text)
        only for a caller with the API key, or for any caller where no key is set, since /health itself needs none."""
        results = await asyncio.gather(*(m.engine.check_health() for m in self.served), return_exceptions=True)
        failed = [(m, r) for m, r in zip(self.served, results) if isinstance(r, BaseException)]
        if not failed:
            return
        try:
            self.authorize(authorization)
            reason = ": " + "; ".join(f"{m.name}: {e}" for m, e in failed)
        except ApiError:
            reason = " (send the API key for the reason)"
        raise ApiError(503, f"the engine is not healthy{reason}", kind="service_unavailable") from None

    async def generate(
        self,
        model: ServedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        timeout_s: float | None = None,
        user: str | None = None,
        whole: bool = False,
    ) -> AsyncIterator[Delta]:
        """A checked request's output as text deltas (_generate); under --moderate output, judged before
        it is sent: every moderation interval's tokens, or `whole` at its end (a non-streamed answer). A
        flagged answer ends with a delta of no text and finish_reason content_filter; nothing judged
        flagged is yielded, and the request is aborted."""
        deltas = self._generate(model, prompt_ids, params, timeout_s=timeout_s, user=user)
        if "output" not in self.moderation.moderate:
            async with contextlib.aclosing(deltas):  # type: ignore[type-var]  # a client that left aborts at once
                async for delta in deltas:
                    yield delta
            return
        judge = self.judge_of(None, serving=model)
        every = None if whole else self.moderation.interval
        held: list[Delta] = []
        answer, since = "", 0
        async with contextlib.aclosing(deltas):  # type: ignore[type-var]  # leaving early aborts the request
            async for delta in deltas:
                held.append(delta)
                answer, since = answer + delta.text, since + len(delta.token_ids)
                if delta.finish_reason is None and (every is None or since < every):
                    continue
                [verdict] = await self.judge(judge, [answer], param="messages")
                if verdict.flagged:
                    self.moderation_counts.filtered_answers += 1
                    yield Delta("", [], [], [], "content_filter")
                    return
                for part in held:
                    yield part
                held, since = [], 0

    def judge_of(self, name: str | None, *, serving: ServedModel | None = None) -> ServedModel:
        """Who judges: the model named, else --moderation-model, else the model serving (it moderates
        itself), else the first served model."""
        if name is not None:
            return self.named(name)
        if self.moderation.model is not None:
            return self.by_name[self.moderation.model]
        return serving or self.served[0]

    async def judge(self, model: ServedModel, texts: list[str], *, param: str = "input") -> list[Judgement]:
        """Each text judged by `model` with the self-reflection prompt: one prefill each, batched with
        whatever the engine runs; ApiError 400 for a text whose prompt does not fit the context."""
        labels, params = model.labels(), judging_params(model.labels())

        room = (await model.info()).max_model_len - params.max_tokens  # the judge's one step needs a slot

        async def one(text: str) -> Judgement:
            prompt = await asyncio.to_thread(judging_prompt, text, model.tokenizer, model.chat, max_len=room)
            await model.check(prompt, params, param=param)
            stream = model.engine.generate(prompt, params, uuid.uuid4().hex)
            async with contextlib.aclosing(stream), engine_errors():  # type: ignore[type-var]
                async for event in stream:
                    if event.finish_reason == "error" or [t for t, _ in event.top_logprobs] != list(labels):
                        raise ApiError(500, "the engine failed while judging a text; retry it", kind="server_error")
                    return Judgement.of([lp for _, lp in event.top_logprobs], self.moderation.threshold)
            raise ApiError(500, "the engine's stream ended before judging the text; retry it", kind="server_error")

        verdicts = list(await asyncio.gather(*(one(t) for t in texts)))
        self.moderation_counts.calls += len(verdicts)
        self.moderation_counts.flagged += sum(v.flagged for v in verdicts)
        return verdicts

    async def check_input(self, model: ServedModel, prompt: str | list[int], *, param: str) -> None:
        """Under --moderate input: ApiError 400 (code content_filter, naming the categories) for a flagged
        prompt (text, or token ids, judged as their text)."""
        if "input" not in self.moderation.moderate:
            return
        text = (
            prompt
            if isinstance(prompt, str)
            else await asyncio.to_thread(model.tokenizer.decode, prompt, skip_special_tokens=True)
        )
        [verdict] = await self.judge(self.judge_of(None, serving=model), [text], param=param)
        if verdict.flagged:
            self.moderation_counts.refused_prompts += 1
            raise ApiError(
                400,
                f"the prompt was flagged by moderation as {', '.join(verdict.flagged_categories)}; it was not run",
                param=param,
                code="content_filter",
            )

    async def _generate(
        self,
        model: ServedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        timeout_s: float | None = None,
        user: str | None = None,
    ) -> AsyncIterator[Delta]:
        """A checked request's output as text deltas, unmoderated. Stop strings end it early; closing it
        aborts the request. Its tokens are counted in the usage book (for `model` and `user`) however it ends.

        Raises ApiError: 503 (with Retry-After) when the engine's queue is full, 503 when it is
        unavailable, 500 when the engine failed this request, 504 when it is not done within
        `timeout_s` (the request is aborted); never a success for a failure.
        """
        arrived = self.request_log.arrival() if self.request_log is not None else 0.0
        detokenizer = Detokenizer(model.tokenizer, params.stop)
        stream = model.engine.generate(prompt_ids, params, uuid.uuid4().hex)
        generated = 0
        try:
            async with contextlib.aclosing(stream), engine_errors():  # type: ignore[type-var]  # a client that left frees its sequence
                async for event in within(stream, timeout_s):
                    if event.finish_reason == "error":
                        raise ApiError(500, "the engine failed while generating this request; retry it", kind="server_error")
                    generated += 1
                    text = detokenizer.add(event.token_id)
                    finish = event.finish_reason or ("stop" if detokenizer.stopped else None)
                    if finish:
                        text += detokenizer.flush()
                    top = [event.top_logprobs] if params.logprobs else []
                    yield Delta(text, [event.token_id], [event.logprob], top, finish)
                    if finish:
                        return
            raise ApiError(500, "the engine's stream ended before the request finished; retry it", kind="server_error")
        finally:
            self.usage.record(model.name, user, len(prompt_ids), generated)
            if self.request_log is not None:
                self.request_log.record(arrived, len(prompt_ids), generated)

    async def complete(
        self,
        model: ServedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        timeout_s: float | None = None,
        user: str | None = None,
    ) -> Delta:
        """The whole output at once (judged whole, under --moderate output)."""
        return merge([d async for d in self.generate(model, prompt_ids, params, timeout_s=timeout_s, user=user, whole=True)])
