"""Continuous batching: one thread runs every in-flight generation request through the model in one KV-cached batch.

What it does, step by step (iteration-level scheduling, as Orca and vLLM do it, without paged memory):
- requests wait in a bounded queue; between two decoding steps the thread takes as many as fit in the batch;
- newcomers are prefilled together, left-padded, in their own forward pass; their key/value cache is then merged
  into the running batch's cache (both left-padded to the longer length), so a request that arrives while others
  run joins at the next step instead of waiting for the batch to finish;
- each decoding step feeds one token per running request, with the attention mask hiding every row's padding and
  position ids counted over real tokens only, so a row computes what it would compute alone;
- after each step every row picks its own token (`lmkit.serve.sampling`: greedy, or from its own seeded generator,
  after its own penalties and bias), is detokenised, cut at its stop strings, and rows that finished, failed or were
  cancelled leave the batch (their cache rows are dropped and the cache is trimmed of columns that only padding still
  uses). A row whose sampling fails ends with its own error; the rest of the batch goes on.

The thread calls each request's `on_event(Event)` as text becomes final; the server turns these into HTTP responses.
Nothing here knows about HTTP.
"""

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from lmkit.generation import left_pad
from lmkit.serve.sampling import (
    RowState,
    SamplingParams,
    TokenLogprob,
    choose,
    process,
    prompt_logprobs,
    token_logprob,
)

logger = logging.getLogger(__name__)

# finish reasons, as OpenAI names them, plus "cancelled" (the client went away or the server is stopping) and
# "error" (this request's sampling failed; `GenerationRequest.error` says why)
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


class Event(NamedTuple):
    """What a request's `on_event` receives: text that can no longer change, the finish reason with the last event
    (None before), and how many tokens the request had generated when the text was cut (their log-probabilities are
    `request.logprobs[:tokens]`)."""

    text: str
    finish_reason: str | None
    tokens: int


@dataclass(eq=False)
class GenerationRequest:
    """One prompt's generation; `on_event` is called from the scheduler thread."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    token_ids: list[int] = field(default_factory=list)
    # with params.logprobs: one entry per generated token; with params.prompt_logprobs: one per prompt token
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    error: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    # detokenisation state: how much of the decoded text was handed out
    _emitted: int = 0
    _generator: torch.Generator | None = None
    _state: RowState | None = None

    def cancel(self) -> None:
        """Ask the scheduler to drop this request; it leaves the batch before the next decoding step."""
        self.cancelled = True


class BatchCache:
    """Per-layer keys and values (B, nh, S, hs) of the running batch, with the `Cache` methods the model calls."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.keys[layer_idx] is None else self.keys[layer_idx].shape[2]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key), dim=2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], value), dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def select(self, rows: torch.Tensor, first_column: int) -> None:
        """Keep `rows` (batch indices) and the columns from `first_column` on."""
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i][rows, :, first_column:]
            self.values[i] = self.values[i][rows, :, first_column:]

    def merge(self, other: "BatchCache") -> None:
        """Append `other`'s rows below this cache's, left-padding the shorter of the two with zeros."""
        width = max(self.get_seq_length(), other.get_seq_length())
        for i in range(len(self.keys)):
            self.keys[i] = torch.cat((_widen(self.keys[i], width), _widen(other.keys[i], width)))
            self.values[i] = torch.cat((_widen(self.values[i], width), _widen(other.values[i], width)))


def _widen(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the sequence dimension of a (B, nh, S, hs) cache tensor or a (B, S) mask on the left to `width`.

    Not `lmkit.generation.left_pad`, which builds input ids and their mask from token-id lists: this widens tensors
    that already exist, so that two batches' caches and masks can be stacked.
    """
    dim = 2 if tensor.ndim == 4 else 1
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat((tensor.new_zeros(shape), tensor), dim=dim)


class Scheduler:
    """Owns the model on one thread and runs all submitted requests through it in one continuously refilled batch.

    Args:
        model: an `LmkitForCausalLM` (any position type); it is put in eval mode.
        tokenizer: its tokenizer (for eos, pad, the vocabulary size and detokenising).
        max_batch_size: requests decoded together at most; more wait in the queue.
        max_queue: requests allowed to wait; `submit` raises `QueueFull` beyond it.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 32, max_queue: int = 64):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.device = next(model.parameters()).device
        # the Rust tokenizer decodes alike when transformers adds no clean-up of its own
        cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._backend = None if cleans_up else getattr(tokenizer, "backend_tokenizer", None)
        self.eos_token_id = tokenizer.eos_token_id
        # the tokens that end a text: the tokenizer's eos, and those of the model's generation config (a chat model's
        # end-of-turn token is one)
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        self.end_ids = tuple(dict.fromkeys(i for i in (self.eos_token_id, *configured) if i is not None))
        self.vocab_size = model.config.vocab_size
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._waiting: deque[GenerationRequest] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # the running batch: its requests (row order), their cache, attention mask (B, S) and last tokens (B, 1)
        self._running: list[GenerationRequest] = []
        self._cache: BatchCache | None = None
        self._mask: torch.Tensor | None = None
        self._last_tokens: torch.Tensor | None = None
        self.on_step: Callable[[int], None] | None = None  # told each decoding step's batch size (metrics)
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0, "steps": 0}

    # ---- the caller's side (any thread) ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lmkit-scheduler", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[Event], None]) -> GenerationRequest:
        """Queue a request; its text arrives through `on_event(Event)` (the one with a finish reason last, once)."""
        return self.submit_all([prompt_ids], [params], [on_event])[0]

    def submit_all(self, prompts: list[list[int]], params: list[SamplingParams],
                   on_events: list[Callable[[Event], None]]) -> list[GenerationRequest]:
        """Queue several requests (one HTTP request's choices) together: all of them, or none if the queue has not
        room for all (`QueueFull`)."""
        requests = []
        for ids, request_params, on_event in zip(prompts, params, on_events):
            if not ids:
                raise ValueError("a prompt needs at least one token")
            request = GenerationRequest(list(ids), request_params, on_event)
            seed = request_params.seed if request_params.seed is not None else random.getrandbits(63)
            request._generator = torch.Generator(device=self.device).manual_seed(seed % (1 << 64))
            request._state = RowState(self.vocab_size, request.prompt_ids)
            requests.append(request)
        with self._wakeup:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (the queue holds {self.max_queue})"
                )
            self._waiting.extend(requests)
            self._wakeup.notify()
        return requests

    def stats(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting), **self.counts}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def cancel_all(self) -> None:
        """Cancel every request queued or running (each ends with CANCELLED before the next step); keep serving."""
        with self._wakeup:
            for request in list(self._waiting) + list(self._running):
                request.cancel()
            self._wakeup.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything still queued or running and end the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the scheduler thread ----

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self._stopping and not self._waiting and not self._running:
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    room = self.max_batch_size - len(self._running)
                    newcomers = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                try:
                    newcomers = [r for r in newcomers if not self._finish_if_cancelled(r)]
                    if newcomers:
                        self._prefill(newcomers)
                    elif self._running:
                        self._decode_step()
                except Exception:  # the forward pass failed: no row of the batch can go on, but the server can
                    logger.exception("generation failed; ending the requests in the batch with an error")
                    for request in self._running + newcomers:
                        if request.finish_reason is None:
                            request.error = "generation failed on the server (see its log)"
                            self._finish(request, ERROR)
                    self._running, self._cache = [], None
        for request in list(self._waiting) + self._running:
            self._finish(request, CANCELLED)
        self._waiting.clear()
        self._running = []

    def _prefill(self, newcomers: list[GenerationRequest]) -> None:
        """Run the newcomers' prompts (left-padded) and merge their cache into the running batch."""
        input_ids, mask = left_pad([r.prompt_ids for r in newcomers], self.pad_token_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # counted over real tokens, as if each row were alone
        cache = BatchCache(self.model.config.n_layer)
        scores_prompt = any(r.params.prompt_logprobs is not None for r in newcomers)
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=0 if scores_prompt else 1).logits
        if scores_prompt:
            for row, request in enumerate(newcomers):
                if request.params.prompt_logprobs is not None:  # the prompt is the row's last len(prompt) columns
                    own = logits[row, logits.shape[1] - len(request.prompt_ids):]
                    request.prompt_logprobs = prompt_logprobs(own, request.prompt_ids, request.params.prompt_logprobs)
        logits = logits[:, -1]
        if self._running:
            width = max(self._mask.shape[1], mask.shape[1])
            self._cache.merge(cache)
            self._mask = torch.cat((_widen(self._mask, width), _widen(mask, width)))
        else:
            self._cache, self._mask = cache, mask
        self._running += newcomers
        self._sample_and_advance(logits)

    def _decode_step(self) -> None:
        """Feed every running row its last token; sample the next one."""
        self._mask = torch.cat((self._mask, self._mask.new_ones((len(self._running), 1))), dim=1)
        positions = self._mask.sum(-1, keepdim=True) - 1
        logits = self.model(input_ids=self._last_tokens, attention_mask=self._mask, position_ids=positions,
                            cache=self._cache, use_cache=True).logits[:, -1]
        self.counts["steps"] += 1
        if self.on_step is not None:
            self.on_step(len(self._running))
        self._sample_and_advance(logits)

    def _sample_and_advance(self, logits: torch.Tensor) -> None:
        """Pick each row's next token, hand out its text, and drop the rows that are done.

        `logits` holds the last rows of the batch: all of them after a decoding step; after a prefill, the newcomers'
        only, and the rows already running (which fed nothing this pass) keep their last token.
        """
        offset = len(self._running) - logits.shape[0]
        greedy = logits.argmax(-1).tolist()  # one op for the whole batch; rows with more to do replace theirs below
        chosen = []
        for row in range(logits.shape[0]):
            request = self._running[offset + row]
            try:
                chosen.append(self._pick(request, logits[row], greedy[row]))
            except Exception as exc:  # this row's failure is this request's error, never its batch-mates'
                logger.exception("sampling failed for one request; ending it with an error")
                request.error = f"sampling failed: {exc}"
                chosen.append(None)
        now = time.perf_counter()
        placeholders = [self.pad_token_id if token is None else token for token in chosen]
        chosen_tensor = torch.tensor(placeholders, device=self.device)[:, None]
        self._last_tokens = torch.cat((self._last_tokens, chosen_tensor)) if offset else chosen_tensor
        for row, token in enumerate(chosen):
            request = self._running[offset + row]
            if request.params.max_tokens == 0:  # scoring only: the prompt's log-probabilities are all it asked for
                self._finish(request, LENGTH)
            elif token is None:
                self._finish(request, ERROR)
            else:
                if request.first_token_at is None:
                    request.first_token_at = now
                self._advance(request, token)
        self._drop_done()

    def _pick(self, request: GenerationRequest, logits: torch.Tensor, greedy: int) -> int | None:
        """One row's next token (`greedy` is its argmax of the raw logits); records its log-probability if asked."""
        params = request.params
        if params.max_tokens == 0:
            return None
        if params.processes_logits:
            end_ids = (*(() if params.ignore_eos else self.end_ids), *params.stop_token_ids)
            logits = process(logits, params, request._state, end_ids)
        if params.temperature > 0:
            token = choose(logits, params, request._generator)
        else:
            token = int(logits.argmax()) if params.processes_logits else greedy
        if params.logprobs is not None:
            entry = token_logprob(logits.float().log_softmax(-1), token, params.logprobs)
            request.logprobs.append(entry)
            request.cumulative_logprob += entry.logprob
        if params.processes_logits:
            request._state.add(token, logits.device)
        return token

    def _advance(self, request: GenerationRequest, token: int) -> None:
        """Add one token to a request, emit the text that can no longer change, finish it if it is done."""
        request.token_ids.append(token)
        self.counts["generated_tokens"] += 1
        params = request.params
        if (token in self.end_ids and not params.ignore_eos) or token in params.stop_token_ids:
            self._emit(request, self._decode(request.token_ids[:-1]), STOP)
            return
        text = self._decode(request.token_ids)
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._emit(request, text[:cut], STOP)
        elif len(request.token_ids) >= params.max_tokens:
            self._emit(request, text, LENGTH)
        else:
            self._emit(request, text[: len(text) - _unsettled_tail(text, params.stop)], None)

    def _decode(self, token_ids: list[int]) -> str:
        if self._backend is None:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)
        # straight to the Rust tokenizer: transformers' decode() first converts every id in Python
        return self._backend.decode(token_ids, skip_special_tokens=True)

    def _emit(self, request: GenerationRequest, text: str, finish_reason: str | None) -> None:
        delta, request._emitted = text[request._emitted:], max(request._emitted, len(text))
        if finish_reason is not None:
            self._finish(request, finish_reason, delta)
        elif delta:
            request.on_event(Event(delta, None, len(request.token_ids)))

    def _finish(self, request: GenerationRequest, finish_reason: str, delta: str = "") -> None:
        request.finish_reason, request.finished_at = finish_reason, time.perf_counter()
        self.counts[{CANCELLED: "cancelled", ERROR: "failed"}.get(finish_reason, "finished")] += 1
        try:
            request.on_event(Event(delta, finish_reason, len(request.token_ids)))
        except Exception:
            logger.exception("a request's event handler failed")

    def _finish_if_cancelled(self, request: GenerationRequest) -> bool:
        if request.cancelled and request.finish_reason is None:
            self._finish(request, CANCELLED)
        return request.finish_reason is not None

    def _drop_done(self) -> None:
        keep = [row for row, r in enumerate(self._running) if not self._finish_if_cancelled(r)]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[row] for row in keep]
        if not keep:
            self._cache = self._mask = self._last_tokens = None
            return
        rows = torch.tensor(keep, device=self.device)
        mask = self._mask[rows]
        first_column = int(mask.any(0).nonzero()[0])  # columns left of this hold padding in every remaining row
        self._cache.select(rows, first_column)
        self._mask, self._last_tokens = mask[:, first_column:], self._last_tokens[rows]


def _unsettled_tail(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters may still change: a partial multi-byte character, or the start of a stop string."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                held = max(held, size)
                break
    return held
