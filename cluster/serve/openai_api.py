"""OpenAI-compatible request bodies (pydantic, at the HTTP edge) and error bodies.

Non-OpenAI sampling fields (top_k, ignore_eos, stop_token_ids) are accepted in the body, as vLLM
accepts them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.engine.sampling import MAX_LOGPROBS, SamplingParams

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits the context


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


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with the usage of the whole request.")


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # clients send fields we do not use (user, ...)

    model: str = Field(description="The served model's name, as GET /v1/models lists it.")
    temperature: Annotated[float, Field(ge=0, le=2, description="0 is greedy (so is anything below 1e-5).")] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, description="Nucleus sampling mass, in (0, 1].")] = 1.0
    top_k: Annotated[int, Field(ge=-1, description="Keep the k most likely tokens; -1 keeps all.")] = -1
    seed: int | None = Field(None, description="Same seed, same text.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings; not included in the text.")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end the completion.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS.")
    n: Annotated[int, Field(ge=1, le=1, description="Only 1 choice per request is supported.")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k_not_zero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("top_k must be -1 (all tokens) or at least 1")
        return v

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop strings")
        return v

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
    max_tokens: Annotated[int, Field(ge=1)] = 16
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    echo: Literal[False] = False


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
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None


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
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
