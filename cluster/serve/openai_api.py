"""OpenAI-compatible request bodies (pydantic, at the HTTP edge) and error bodies.

Non-OpenAI sampling fields (top_k, ignore_eos, stop_token_ids) are accepted in the body, as vLLM
accepts them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from cluster.engine.sampling import (
    GREEDY_TEMPERATURE,
    MAX_LOGPROBS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    SamplingParams,
    check_sampling_field,
)
from cluster.errors import FieldError

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits the context
MAX_MODERATION_INPUTS = 32  # texts in one moderation request, each one prefill
MAX_USER_CHARS = 256  # an end user's id (OpenAI's `user`); longer is refused, as it is kept in the usage book


class ApiError(Exception):
    """An error with an OpenAI error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after_s = retry_after_s  # sent as Retry-After (503 from a full queue)

    def __reduce__(self) -> tuple[Any, ...]:
        # Serve pickles a gRPC method's exception to carry its status to the proxy; the default
        # reduction would call ApiError(message) and fail.
        state = {"param": self.param, "code": self.code, "kind": self.kind, "retry_after_s": self.retry_after_s}
        return (ApiError, (self.status, self.message), state)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Body fields that the engine knows by another name (SamplingParams').
ENGINE_FIELD = {"max_completion_tokens": "max_tokens", "top_logprobs": "logprobs"}


def checked(value: Any, info: ValidationInfo) -> Any:
    """`value` of the body's field, if it keeps the engine's rule for that sampling field; else a
    ValueError that names the field and says how to fix it."""
    field = info.field_name
    assert field is not None  # always set for a field validator
    if value is None:
        return value  # unset: the engine's default applies
    as_engine_holds_it = (value,) if isinstance(value, str) else value  # one stop string, or a list of them
    try:
        check_sampling_field(ENGINE_FIELD.get(field, field), as_engine_holds_it, called=field)
    except FieldError as e:
        raise ValueError(str(e)) from None
    return value


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with the usage of the whole request.")


class SamplingFields(BaseModel):
    """The sampling fields of both request kinds. Their ranges are the engine's (cluster.engine.sampling
    SAMPLING_RULES), applied to each field as the body is parsed, so the error names the field sent."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # clients send fields we do not use (user, ...)

    model: str = Field(description="The served model's name, as GET /v1/models lists it.")
    temperature: float = Field(
        1.0, description=f"0 is greedy (so is anything below {GREEDY_TEMPERATURE:g}), at most {MAX_TEMPERATURE:g}."
    )
    top_p: float = Field(1.0, description="Nucleus sampling mass, in (0, 1].")
    top_k: int = Field(-1, description="Keep the k most likely tokens; -1 keeps all.")
    seed: int | None = Field(None, description="Same seed, same text.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} stop strings; not included in the text.")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end the completion.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS.")
    n: Annotated[int, Field(ge=1, le=1, description="Only 1 choice per request is supported.")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Who asks, as OpenAI's `user`: a route's pick is sticky per user, and usage is counted by user.
    user: str | None = Field(None, max_length=MAX_USER_CHARS, description="The end user, for routes and usage.")

    @field_validator("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids")
    @classmethod
    def _sampling_in_range(cls, v: Any, info: ValidationInfo) -> Any:
        return checked(v, info)

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(description="Text (tokenized with BOS) or token ids (used verbatim).")
    max_tokens: int = 16
    logprobs: int | None = Field(None, description=f"Also return this many most likely tokens per token, at most {MAX_LOGPROBS}.")
    echo: Literal[False] = False

    @field_validator("max_tokens", "logprobs")
    @classmethod
    def _completion_in_range(cls, v: Any, info: ValidationInfo) -> Any:
        return checked(v, info)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(
        None, description=f"With logprobs: this many most likely tokens per token, at most {MAX_LOGPROBS}."
    )

    @field_validator("max_tokens", "max_completion_tokens", "top_logprobs")
    @classmethod
    def _chat_in_range(cls, v: Any, info: ValidationInfo) -> Any:
        return checked(v, info)


class ModerationRequest(BaseModel):
    """POST /v1/moderations, in OpenAI's shape: the texts to judge, and which served model judges."""

    model_config = ConfigDict(extra="ignore")  # OpenAI's clients may send fields this server does not use

    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_MODERATION_INPUTS)] = Field(
        description="A text, or a list of texts, to judge."
    )
    model: str | None = Field(None, description="The judge: a served model; default: --moderation-model, else the first.")

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class RouteTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    weight: float


class RouteRequest(BaseModel):
    """PUT /v1/routes/{alias}: the split's targets, as text ("A:75,B:25") or as a list of {model, weight}."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    targets: str | Annotated[list[RouteTarget], Field(min_length=1)]

    def targets_text(self) -> str:
        if isinstance(self.targets, str):
            return self.targets
        return ",".join(f"{t.model}:{t.weight!r}" for t in self.targets)


class RebalanceRequest(BaseModel):
    """POST /v1/experts/rebalance takes no settings: a client can move experts within the workers'
    slots, never make workers hold more than the operator sized them for (serve's --replicate-hot)."""

    model_config = ConfigDict(extra="forbid")


def _no_constants(name: str) -> Any:
    raise ApiError(400, f"the request body is not valid JSON: {name} is not a JSON number")


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Bytes of a request body -> a validated request, or an ApiError (4xx) that says what to fix.

    Whatever the bytes: invalid UTF-8, NaN, numbers of thousands of digits, nesting thousands deep,
    lone UTF-16 surrogates (valid JSON escapes that no text can hold) all end here as a 400.
    """
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except ValueError as e:  # an integer literal past Python's digit limit
        raise ApiError(400, f"the request body has a number out of range: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "value_error":  # a sampling rule's own words, which name the field (`checked`)
            raise ApiError(400, str(first["ctx"]["error"]), param=param) from None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
