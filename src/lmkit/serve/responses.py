"""From one OpenAI request to the scheduler's generations, and from their events back to one OpenAI response.

`plan` checks a request's sampling fields against the model (its window and vocabulary) and the server's limits, and
turns it into one `SamplingParams` per generation: `best_of` candidates for each prompt (`n` when `best_of` is not
set), each with a seed of its own (`lmkit.serve.sampling.seed_of_choice`). `respond` submits them and answers: a
whole response (the `n` best candidates of each prompt by mean token log-probability, as OpenAI's `best_of` ranks
them), or a stream of server-sent events. `echo` puts the prompt before the completion, and log-probabilities are
written in the completions shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) or the chat shape
(`content`: token, logprob, bytes, top_logprobs).

The `served` these functions take is the app's `Served` (scheduler, tokenizer, limits, metrics).
"""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from lmkit.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    SamplingFields,
    TopLogprob,
    Usage,
)
from lmkit.serve.sampling import SamplingParams, TokenLogprob, seed_of_choice
from lmkit.serve.scheduler import CANCELLED, ERROR, Event, GenerationRequest, QueueFull

logger = logging.getLogger(__name__)
MAX_STOPS = 4  # OpenAI's limit on `stop` strings


@dataclass
class Plan:
    """What one HTTP request asks of the scheduler: its prompts, and `best_of` generations for each (prompt-major)."""

    prompts: list[list[int]]
    prompt_texts: list[str | None]  # a text prompt as sent (what `echo` repeats); None: decode the ids
    params: list[SamplingParams]
    n: int
    best_of: int
    echo: bool = False
    logprobs: int | None = None  # alternatives shown per token; None: no logprobs in the response
    stream: bool = False
    include_usage: bool = False


def plan(body: SamplingFields, prompts: list[list[int]], prompt_texts: list[str | None], served,
         max_tokens: int | None, field: str = "max_tokens") -> Plan:
    """Check `body` against the model and the server's limits (each problem a 400 naming its field) and plan it.

    `max_tokens`: what the client asked for under `field` (None: as much as the window holds, within the server's
    ceiling, for chat; 16 for completions, as OpenAI).
    """
    settings, window, vocab = served.settings, served.n_positions, served.tokenizer.vocab_size
    completions = isinstance(body, CompletionRequest)
    echo = completions and body.echo
    if body.stream_options is not None and not body.stream:
        raise _invalid("stream_options", "'stream_options' is only allowed with 'stream': true")
    if isinstance(body, ChatCompletionRequest):
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    longest = max(len(ids) for ids in prompts)
    if max_tokens is None:
        max_tokens = 16 if completions else max(1, min(settings.max_tokens, window - longest))
    if max_tokens == 0 and not echo:
        raise _invalid(field, f"{field!r} must be at least 1 (0 only with 'echo': true, to score the prompt)")
    n, best_of = body.n, (body.best_of if completions and body.best_of is not None else body.n)
    if best_of < n:
        raise _invalid("best_of", f"'best_of' ({best_of}) must be at least 'n' ({n})")
    if best_of > settings.max_n:
        name = "best_of" if best_of > n else "n"
        raise _invalid(name, f"{name!r} is {best_of}; this server generates at most {settings.max_n} choices per "
                             "prompt")
    if body.stream and best_of > n:
        raise _invalid("best_of", "'best_of' cannot be streamed: the best candidates are known only at the end")
    if best_of * max_tokens > settings.max_tokens:
        name = field if best_of == 1 else ("best_of" if best_of > n else "n")
        times = f"{best_of} choices x {max_tokens} tokens = " if best_of > 1 else ""
        raise _invalid(name, f"{field!r} is {times}{best_of * max_tokens} tokens; this server generates at most "
                             f"{settings.max_tokens} per prompt")
    generations = len(prompts) * best_of
    if generations > settings.max_queue:
        name = "prompt" if best_of == 1 else "n"
        raise _invalid(name, f"this request needs {generations} generations ({len(prompts)} prompts x {best_of}); "
                             f"the server queues at most {settings.max_queue}: send it in smaller requests")
    if longest > window or (max_tokens > 0 and longest >= window):
        param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        room = "" if max_tokens == 0 else ", which must also hold at least one generated token"
        raise APIError(400, f"the prompt is {longest} tokens; the model's window is {window} tokens{room}",
                       param=param, code="context_length_exceeded")
    if longest + max_tokens > window:
        raise APIError(400, f"the prompt ({longest} tokens) plus {field!r} ({max_tokens}) is {longest + max_tokens} "
                            f"tokens; the model's window is {window}: ask for at most {window - longest}",
                       param=field, code="context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS or not all(stops):
        raise _invalid("stop", f"'stop' takes up to {MAX_STOPS} non-empty strings, got {stops!r}")
    bias = _logit_bias(body.logit_bias, vocab)
    if any(not 0 <= token < vocab for token in body.stop_token_ids):
        raise _invalid("stop_token_ids", f"'stop_token_ids' must be token ids of this model (0..{vocab - 1})")
    if body.min_tokens > max_tokens:
        raise _invalid("min_tokens", f"'min_tokens' ({body.min_tokens}) is more than {field!r} ({max_tokens})")
    ranked = best_of > n  # candidates are ranked by their log-probability, so it is computed even if not shown
    base = SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
        stop=tuple(stops), stop_token_ids=tuple(body.stop_token_ids), ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty, logit_bias=bias,
        logprobs=logprobs if logprobs is not None else (0 if ranked else None),
        prompt_logprobs=logprobs if echo and logprobs is not None else None,
    )  # fmt: skip
    params = [replace(base, seed=seed_of_choice(body.seed, j)) for _ in prompts for j in range(best_of)]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Plan(prompts, prompt_texts, params, n, best_of, echo, logprobs, body.stream, include_usage)


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _logit_bias(logit_bias: dict[str, float], vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias` (token id as a string -> -100..100) as (id, bias) pairs, each checked."""
    pairs = []
    for key, bias in logit_bias.items():
        if not (key.isdigit() and int(key) < vocab):
            raise _invalid("logit_bias", f"'logit_bias' keys must be token ids of this model (0..{vocab - 1}), "
                                         f"got {key!r}")
        if not -100 <= bias <= 100:
            raise _invalid("logit_bias", f"'logit_bias' values must be between -100 and 100, got {bias} for {key}")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


class _Events:
    """Carry the events of one request's generations from the scheduler thread to the event loop, in one queue of
    (choice index, `Event`), so that a stream interleaves its choices as they are generated."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def handler(self, index: int):
        """The `on_event` of generation `index`."""
        return lambda event: self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))


async def respond(request: Request, served, planned: Plan, chat: bool):
    """Submit the planned generations; answer with their stream, or with the whole response once all are done."""
    events = _Events()
    prompts = [ids for ids in planned.prompts for _ in range(planned.best_of)]
    handlers = [events.handler(index) for index in range(len(planned.params))]
    try:
        generations = served.scheduler.submit_all(prompts, planned.params, handlers)
    except QueueFull as exc:
        raise APIError(503, f"the server is busy: {exc}; retry shortly", code="queue_full",
                       kind="server_overloaded") from None
    request_id = getattr(request.state, "request_id", uuid.uuid4().hex)
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
    writer = _Writer(served, planned, chat, response_id)
    if planned.stream:
        return StreamingResponse(writer.stream(events, generations, request_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        texts = await _collect(request, events, len(generations))
        if texts is None:  # nobody will read the answer: stop generating it
            logger.info("client went away: cancelling its generations [%s]", request_id)
            return JSONResponse({}, status_code=499)  # nginx's "client closed request", for the log
        for generation in generations:
            _raise_if_failed(generation)
            served.metrics.observe_generation(generation)
            _log_generation(generation, request_id)
    finally:
        for generation in generations:
            generation.cancel()  # no-op for finished ones; frees the slot of a client that went away
    return await run_in_threadpool(writer.whole, generations, texts)


async def _collect(request: Request, events: _Events, count: int) -> list[str] | None:
    """The whole text of each of `count` generations, or None if the client disconnected meanwhile."""
    parts: list[list[str]] = [[] for _ in range(count)]
    finished = 0
    while finished < count:
        try:
            index, event = await asyncio.wait_for(events.queue.get(), timeout=0.5)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            if await request.is_disconnected():
                return None
            continue
        parts[index].append(event.text)
        finished += event.finish_reason is not None
    return ["".join(texts) for texts in parts]


def _raise_if_failed(generation: GenerationRequest) -> None:
    if generation.finish_reason == CANCELLED:
        raise APIError.cancelled()
    if generation.finish_reason == ERROR:
        raise APIError.failed(generation.error)


def _log_generation(generation: GenerationRequest, request_id: str) -> None:
    ttft = (generation.first_token_at or generation.finished_at) - generation.submitted_at
    latency = generation.finished_at - generation.submitted_at
    logger.info("generation: %d prompt + %d completion tokens, first token %.1f ms, total %.1f ms, finish %s [%s]",
                len(generation.prompt_ids), len(generation.token_ids), 1000 * ttft, 1000 * latency,
                generation.finish_reason, request_id)


class _Writer:
    """Writes one request's choices, whole or as chunks, in the completions or the chat shape."""

    def __init__(self, served, planned: Plan, chat: bool, response_id: str):
        self.served, self.planned, self.chat, self.response_id = served, planned, chat, response_id
        self.tokenizer = served.tokenizer
        self.created = int(time.time())

    # ---- log-probabilities ----

    def completion_logprobs(self, ids: list[int], scored: list[TokenLogprob | None],
                            offsets: list[int]) -> CompletionLogprobs:
        """The completions shape for `ids`, their scores (None: a prompt's first token) and text offsets. The chosen
        token is among `top_logprobs`, as in OpenAI's and vLLM's answers."""
        string = self.tokenizer.token_string
        tops = []
        for token_id, entry in zip(ids, scored):
            if entry is None:
                tops.append(None)
                continue
            top = {string(i): lp for i, lp in entry.top}
            top.setdefault(string(token_id), entry.logprob)
            tops.append(top)
        return CompletionLogprobs(
            tokens=[string(i) for i in ids], token_logprobs=[None if e is None else e.logprob for e in scored],
            top_logprobs=tops, text_offset=offsets,
        )  # fmt: skip

    def chat_logprobs(self, scored: list[TokenLogprob]) -> ChatLogprobs:
        string, as_bytes = self.tokenizer.token_string, self.tokenizer.token_bytes

        def top(token_id: int, logprob: float) -> TopLogprob:
            return TopLogprob(token=string(token_id), logprob=logprob, bytes=as_bytes(token_id))

        return ChatLogprobs(content=[
            ChatTokenLogprob(**top(e.token_id, e.logprob).model_dump(), top_logprobs=[top(i, lp) for i, lp in e.top])
            for e in scored
        ])  # fmt: skip

    def _prompt_text(self, prompt: int) -> str:
        text = self.planned.prompt_texts[prompt]
        return text if text is not None else self.tokenizer.decode(self.planned.prompts[prompt])

    # ---- a whole response ----

    def whole(self, generations: list[GenerationRequest], texts: list[str]):
        """The response: for each prompt its `n` best candidates (all of them without `best_of`), in order."""
        planned, choices = self.planned, []
        usage = Usage.of(planned.prompts, generations)
        for prompt in range(len(planned.prompts)):
            candidates = list(range(prompt * planned.best_of, (prompt + 1) * planned.best_of))
            if planned.best_of > planned.n:
                candidates = sorted(candidates, key=lambda c: -_mean_logprob(generations[c]))[: planned.n]
            for candidate in candidates:
                choices.append(self._choice(len(choices), prompt, generations[candidate], texts[candidate]))
        kind = ChatCompletionResponse if self.chat else CompletionResponse
        return kind(id=self.response_id, created=self.created, model=self.served.model_name, usage=usage,
                    choices=choices)

    def _choice(self, index: int, prompt: int, generation: GenerationRequest, text: str):
        reason = generation.finish_reason
        shown = self.planned.logprobs is not None
        if self.chat:
            logprobs = self.chat_logprobs(generation.logprobs) if shown else None
            return ChatCompletionChoice(index=index, message=AssistantMessage(content=text), finish_reason=reason,
                                        logprobs=logprobs)
        ids, scored, start = generation.token_ids, list(generation.logprobs), 0
        offsets = []
        if self.planned.echo:
            echoed = self._prompt_text(prompt)
            text, start = echoed + text, len(echoed)
            if shown:
                ids, scored = generation.prompt_ids + ids, generation.prompt_logprobs + scored
                offsets = self.tokenizer.text_offsets(generation.prompt_ids)
        logprobs = None
        if shown:  # the completion's offsets continue after the echoed prompt's text
            offsets += self.tokenizer.text_offsets(generation.token_ids, start)
            logprobs = self.completion_logprobs(ids, scored, offsets)
        return CompletionChoice(index=index, text=text, finish_reason=reason, logprobs=logprobs)

    # ---- a stream ----

    async def stream(self, events: _Events, generations: list[GenerationRequest], request_id: str):
        """Server-sent events: the choices' text chunks, interleaved as they are generated, each choice closed by a
        chunk with its finish reason; then the usage (with `stream_options.include_usage`) and `[DONE]`.

        The first text goes out at once; after it, text is sent at most every `stream_interval_ms`, in one chunk per
        choice holding whatever was generated meanwhile (vLLM's `--stream-interval` idea, in time rather than
        tokens). Each chunk costs the server and the client JSON, HTTP framing and a socket write; with many
        concurrent streams on a CPU that is a large share of each decoding step, while 50 updates a second read as
        smoothly as one per token.
        """
        served, planned = self.served, self.planned
        interval = served.settings.stream_interval_ms / 1000
        loop = asyncio.get_running_loop()
        sent_tokens, started, finished = [0] * len(generations), [False] * len(generations), 0
        try:
            if self.chat:
                for index in range(len(generations)):
                    yield self._chunk(index, "", role=True)
            sent_at = None
            while finished < len(generations):
                pending = {}  # choice index -> (text, finish reason, tokens) gathered since the last send
                _merge(pending, *await events.queue.get())
                if sent_at is not None and loop.time() < sent_at + interval \
                        and all(reason is None for _, reason, _ in pending.values()):
                    await asyncio.sleep(sent_at + interval - loop.time())
                # send what has piled up (meanwhile, or because the client reads slower than the model writes)
                while not events.queue.empty():
                    _merge(pending, *events.queue.get_nowait())
                for index, (text, finish_reason, tokens) in sorted(pending.items()):
                    generation = generations[index]
                    if finish_reason in (CANCELLED, ERROR):
                        failure = APIError.cancelled() if finish_reason == CANCELLED else \
                            APIError.failed(generation.error)
                        yield failure.event()
                        return
                    if planned.echo and not started[index]:  # the prefill has scored the prompt by now
                        yield await run_in_threadpool(self._echo_chunk, index, generation)
                    started[index] = True
                    scored = generation.logprobs[sent_tokens[index]:tokens] if planned.logprobs is not None else None
                    if text or scored:
                        logprobs = self._chunk_logprobs(index, generation, sent_tokens[index], scored)
                        yield self._chunk(index, text, logprobs=logprobs)
                        sent_tokens[index] = tokens
                    if finish_reason is not None:
                        yield self._chunk(index, None, finish_reason)
                        served.metrics.observe_generation(generation)
                        _log_generation(generation, request_id)
                        finished += 1
                sent_at = loop.time()
            if planned.include_usage:
                kind = ChatCompletionChunk if self.chat else CompletionChunk
                usage = Usage.of(planned.prompts, generations)
                yield kind(id=self.response_id, created=self.created, model=served.model_name, choices=[],
                           usage=usage).event(True)
            yield "data: [DONE]\n\n"
        finally:
            for generation in generations:
                if generation.finish_reason is None:
                    logger.info("client went away after %d tokens: cancelling its generation [%s]",
                                len(generation.token_ids), request_id)
                generation.cancel()

    def _chunk_logprobs(self, index: int, generation: GenerationRequest, first: int,
                        scored: list[TokenLogprob] | None):
        """The log-probabilities of a chunk's tokens (from the `first`-th generated one on), or None."""
        if not scored:
            return None
        if self.chat:
            return self.chat_logprobs(scored)
        ids = generation.token_ids[first:first + len(scored)]
        start = len(self.tokenizer.decode(generation.token_ids[:first])) if first else 0
        if self.planned.echo:  # streams have no best_of: choice `index` belongs to prompt index // n
            start += len(self._prompt_text(index // self.planned.n))
        return self.completion_logprobs(ids, scored, self.tokenizer.text_offsets(ids, start))

    def _echo_chunk(self, index: int, generation: GenerationRequest) -> str:
        """A streamed choice's first chunk with `echo`: the prompt's text (and its log-probabilities)."""
        logprobs = None
        if self.planned.logprobs is not None:
            ids = generation.prompt_ids
            logprobs = self.completion_logprobs(ids, generation.prompt_logprobs, self.tokenizer.text_offsets(ids))
        return self._chunk(index, self._prompt_text(index // self.planned.n), logprobs=logprobs)

    def _chunk(self, index: int, text: str | None, finish_reason: str | None = None, role: bool = False,
               logprobs=None) -> str:
        """One choice's chunk; `text` None is the closing chunk that carries only the finish reason."""
        if self.chat:
            delta = ChatDelta(role="assistant" if role else None, content=text)
            choice = ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=finish_reason,
                                                logprobs=logprobs)
            payload = ChatCompletionChunk(id=self.response_id, created=self.created, model=self.served.model_name,
                                          choices=[choice])
        else:
            choice = CompletionStreamChoice(index=index, text=text or "", finish_reason=finish_reason,
                                            logprobs=logprobs)
            payload = CompletionChunk(id=self.response_id, created=self.created, model=self.served.model_name,
                                      choices=[choice])
        return payload.event(self.planned.include_usage)


def _merge(pending: dict, index: int, event: Event) -> None:
    """Add a choice's event to what is waiting to be sent: texts joined, the latest finish reason and token count."""
    text = pending[index][0] if index in pending else ""
    pending[index] = (text + event.text, event.finish_reason, event.tokens)


def _mean_logprob(generation: GenerationRequest) -> float:
    return generation.cumulative_logprob / max(1, len(generation.token_ids))
