"""The HTTP API of `lmkit serve` as a schema: every request body it accepts, every body it answers, and its errors.

Requests and responses follow OpenAI's completions and chat completions API (plus lmkit's `top_k` and `ignore_eos`).
Every model refuses unknown fields: in a request, a typo or an OpenAI field lmkit does not implement is a 400 naming
it; in a response, a field the server forgot to declare is a bug that fails loudly. Every error the server answers
is an `APIError`, written in OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`. This module owns
these shapes; `lmkit.serve.app` decides which one to send.
"""

import json
from typing import Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_serializer

# Fields of OpenAI's API that lmkit does not implement: named in the 400 rather than silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias", "presence_penalty",
               "frequency_penalty", "tools", "tool_choice", "functions", "function_call", "response_format",
               "parallel_tool_calls")
# why a choice ended: the scheduler's STOP and LENGTH (its CANCELLED is answered as an error, never as a choice)
FinishReason = Literal["stop", "length"]


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------------------------------
# Requests


class StreamOptions(Schema):
    include_usage: bool = False


class SamplingFields(Schema):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0 = off)")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per prompt only")
    ignore_eos: bool = Field(False, description="extension: generate max_tokens tokens even past end-of-text")
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]


class ChatMessage(Schema):
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------------------------------------------------------------
# Responses


class ModelCard(Schema):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: Literal["lmkit"] = "lmkit"


class ModelList(Schema):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(Schema):
    """`GET /health`: readiness, the served name, and the scheduler's counters (`Scheduler.stats()`)."""

    status: Literal["ok", "unavailable"]
    model: str
    running: int
    waiting: int
    finished: int
    cancelled: int
    generated_tokens: int
    steps: int


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, generations) -> "Usage":
        """The token counts of a response's generations (`GenerationRequest`s), summed over its choices."""
        prompt = sum(len(g.prompt_ids) for g in generations)
        completion = sum(len(g.token_ids) for g in generations)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionChoice(Schema):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class CompletionResponse(Schema):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(Schema):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(Schema):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletionResponse(Schema):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class CompletionStreamChoice(Schema):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatDelta(Schema):
    """What a chat chunk adds: the role (first chunk only) and text; the closing chunk's, with the finish reason, is
    `{}`: fields left None are left out."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_what_is_set(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionStreamChoice(Schema):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionChunk(Schema):
    """One server-sent event of a streamed completion. With `stream_options.include_usage`, every chunk carries
    `"usage": null` and a last one with no choices carries the usage; without it, no chunk has the key."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None

    def event(self, include_usage: bool) -> str:
        """The chunk as one server-sent event."""
        return f"data: {self.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


class ChatCompletionChunk(CompletionChunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionStreamChoice]


# ---------------------------------------------------------------------------------------------------------------------
# Errors


class ErrorBody(Schema):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Schema):
    error: ErrorBody


class APIError(Exception):
    """An error answered to the client in OpenAI's envelope; the classmethods name the ones raised in several places.

    `kind` is the envelope's `type`: `invalid_request_error` (the client can fix it), `authentication_error`,
    `server_overloaded` (retry later) or `server_error`.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.kind, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        # a browser asks for the key (as Basic auth's password) only when told how: the playground relies on it
        headers = {"WWW-Authenticate": 'Basic realm="lmkit"'} if self.status == 401 else None
        return JSONResponse(self.body().model_dump(mode="json"), status_code=self.status, headers=headers)

    def event(self) -> str:
        """The error as a server-sent event: a stream has sent its 200 already, so it ends with this instead."""
        return f"data: {self.body().model_dump_json()}\n\n"

    @classmethod
    def model_not_found(cls, requested: str, served: str) -> "APIError":
        return cls(404, f"the model {requested!r} does not exist; this server serves {served!r}", param="model",
                   code="model_not_found")

    @classmethod
    def cancelled(cls) -> "APIError":
        return cls(503, "the request was cancelled: the server is shutting down", code="cancelled",
                   kind="server_overloaded")

    @classmethod
    def too_large(cls, limit: int) -> "APIError":
        return cls(413, f"request body larger than {limit} bytes", code="request_too_large")

    @classmethod
    def from_validation(cls, exc: RequestValidationError) -> "APIError":
        """The first problem pydantic found in a request body, as a 400 naming its field."""
        error = exc.errors()[0]
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        # pydantic reports a union's failure once per member type (prompt.str, prompt.list[int]...): keep the path
        location = [part for part in location if not part.startswith(("str", "list[", "int", "function-"))]
        param = ".".join(location) or None
        if error.get("type") == "json_invalid":
            return cls(400, f"the request body is not valid JSON ({error.get('msg')})", code="invalid_json")
        if error.get("type") == "extra_forbidden":
            field = location[-1] if location else param
            reason = "is not supported by lmkit serve" if field in UNSUPPORTED else "is not a known field"
            return cls(400, f"{param!r} {reason}", param=param, code="unsupported_field")
        if error.get("type") == "missing":
            return cls(400, f"missing required field {param!r}", param=param, code="missing_field")
        if param == "prompt":
            return cls(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such "
                            "lists", param=param, code="invalid_value")
        given = error.get("input")
        given_text = json.dumps(given, ensure_ascii=False)[:80] if not isinstance(given, dict) else "an object"
        return cls(400, f"invalid {param!r}: {error.get('msg')} (got {given_text})", param=param, code="invalid_value")
