"""The HTTP API of `lmkit serve` as a schema: every request body it accepts, every body it answers, and its errors.

Requests and responses follow OpenAI's completions and chat completions API, plus vLLM's extensions (`top_k`,
`repetition_penalty`, `min_tokens`, `stop_token_ids`, `ignore_eos`) and its `/tokenize` and `/detokenize` shapes.
Requests are strict, as OpenAI's API is: `"max_tokens": "5"` or `"stream": "yes"` is a 400, not coerced. Every field
of OpenAI's requests is accepted; a `null` means the field's default, and a field whose value changes nothing
(`"tools": []`, `"response_format": {"type": "text"}`, `"store": false`...) is accepted as such. A value lmkit cannot
honour (tools, a suffix, JSON output) is a 400 naming the field, and so is an unknown field. In a response, a field
the server forgot to declare is a bug that fails loudly. Every error the server answers is an `APIError`, written in
OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`. This module owns these shapes;
`lmkit.serve.app` and `lmkit.serve.responses` decide which one to send.
"""

import json
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

# why a choice ended: the scheduler's STOP and LENGTH (CANCELLED and ERROR are answered as errors, never as choices)
FinishReason = Literal["stop", "length"]
_UNION_MEMBER_TAGS = ("list[", "dict[", "function-", "json-or-python[")
INT64 = (-(1 << 63), (1 << 64) - 1)  # what a seed may be (vLLM's bound): torch seeds its generators with 64 bits


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestSchema(Schema):
    """A request body: strict types, and `null` for any field means its default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    def unsupported(self) -> tuple[str, str] | None:
        """The first field set to a value lmkit cannot honour, and why: (field, reason); None when all can be."""
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Requests


class StreamOptions(RequestSchema):
    include_usage: bool = False
    include_obfuscation: bool = False  # OpenAI pads streamed chunks against side channels; a local server need not


class SamplingFields(RequestSchema):
    """The fields completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0 = off)")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="extension (vLLM's): > 1 discourages repeats")
    logit_bias: dict[str, float] = Field(default_factory=dict, description="token id -> bias in -100..100")
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list, description="extension: also stop at these tokens")
    min_tokens: int = Field(0, ge=0, description="extension: generate at least this many tokens")
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    ignore_eos: bool = Field(False, description="extension: generate max_tokens tokens even past end-of-text")
    user: str | None = None
    # accepted, and change nothing here: a local server keeps no records and has one service tier
    metadata: dict[str, str] | None = None
    store: bool = False
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.store:
            return "store", "lmkit serve does not store completions; send false or leave it out"
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "lmkit serve does not insert text (no fill-in-the-middle); leave 'suffix' out"
        return super().unsupported()


class TextPart(RequestSchema):
    type: Literal["text"]
    text: str


class ChatMessage(RequestSchema):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI reads them)."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ResponseFormat(RequestSchema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] = Field(default_factory=list)
    function_call: str | dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        no_tools = "lmkit serve does not call tools"
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, no_tools
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                return name, no_tools
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", f"lmkit serve writes text only, not {self.response_format.type!r}"
        if self.modalities and self.modalities != ["text"]:
            return "modalities", "lmkit serve writes text only"
        for name in ("audio", "prediction", "web_search_options"):
            if getattr(self, name):
                return name, f"lmkit serve does not support {name!r}"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "'top_logprobs' needs 'logprobs': true"
        return super().unsupported()


class TokenizeRequest(RequestSchema):
    """vLLM's `POST /tokenize`: text, or chat messages rendered through the model's template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(RequestSchema):
    model: str | None = None
    tokens: list[int]


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
    failed: int
    generated_tokens: int
    steps: int


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompts: list[list[int]], generations) -> "Usage":
        """The token counts of a response: each prompt once, and every generation (`GenerationRequest`) it ran,
        including the `best_of` candidates it did not return (as OpenAI counts them)."""
        prompt = sum(len(ids) for ids in prompts)
        completion = sum(len(g.token_ids) for g in generations)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionLogprobs(Schema):
    """A completion choice's `logprobs` (the legacy completions shape): per token its text, its log-probability
    (None for a prompt's first token), its `logprobs` most likely alternatives, and where it starts in the text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(Schema):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Schema):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionChoice(Schema):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


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
    logprobs: ChatLogprobs | None = None


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
    logprobs: CompletionLogprobs | None = None


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
    logprobs: ChatLogprobs | None = None


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


class TokenizeResponse(Schema):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(Schema):
    prompt: str


class TokenizerInfo(Schema):
    """`GET /tokenizer_info` (vLLM's): what a client needs to tokenize as the server does (lm-eval reads it)."""

    tokenizer_class: str
    vocab_size: int
    model_max_length: int
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None


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
    def failed(cls, reason: str | None) -> "APIError":
        return cls(500, f"this request failed: {reason or 'unknown error'}", code="generation_failed",
                   kind="server_error")

    @classmethod
    def from_validation(cls, exc: RequestValidationError) -> "APIError":
        """The first problem pydantic found in a request body, as a 400 naming its field."""
        error = exc.errors()[0]
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        # pydantic reports a union's failure once per member type (prompt.str, prompt.list[int]...): keep the path
        location = [part for part in location
                    if part not in ("str", "int", "float", "bool") and not part.startswith(_UNION_MEMBER_TAGS)]
        param = ".".join(location) or None
        kind, given = error.get("type"), error.get("input")
        if kind == "json_invalid":
            return cls(400, f"the request body is not valid JSON ({error.get('msg')})", code="invalid_json")
        if param is None and kind in ("model_attributes_type", "model_type", "dict_type", "missing"):
            what = ("nothing" if given in (None, b"", "") else "bytes that are not JSON" if isinstance(given, bytes)
                    else f"a JSON {type(given).__name__}")
            return cls(400, f"the request body must be a JSON object, got {what}", code="invalid_body")
        if kind == "extra_forbidden":
            return cls(400, f"{param!r} is not a known field", param=param, code="unsupported_field")
        if kind == "missing":
            return cls(400, f"missing required field {param!r}", param=param, code="missing_field")
        if param == "prompt":
            return cls(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such "
                            "lists", param=param, code="invalid_value")
        if isinstance(given, bytes):
            given = given.decode("utf-8", "replace")
        given_text = json.dumps(given, ensure_ascii=False)[:80] if not isinstance(given, dict) else "an object"
        return cls(400, f"invalid {param!r}: {error.get('msg')} (got {given_text})", param=param, code="invalid_value")
