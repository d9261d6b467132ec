"""Continuous batching: one thread runs every in-flight generation request through the model in one KV-cached batch.

What it does, step by step (iteration-level scheduling, as Orca and vLLM do it, without paged memory):
- requests wait in a bounded queue; between two decoding steps the thread takes as many as fit in the batch;
- newcomers are prefilled together, left-padded, in their own forward pass; their key/value cache is then merged
  into the running batch's cache (both left-padded to the longer length), so a request that arrives while others
  run joins at the next step instead of waiting for the batch to finish;
- each decoding step feeds one token per running request, with the attention mask hiding every row's padding and
  position ids counted over real tokens only, so a row computes what it would compute alone;
- after each step every row samples its own token (greedy, or from its own seeded generator), is detokenised, cut at
  its stop strings, and rows that finished or were cancelled leave the batch (their cache rows are dropped and the
  cache is trimmed of columns that only padding still uses).

The thread calls each request's `on_event(text_delta, finish_reason)` as text becomes final; the server turns these
into HTTP responses. Nothing here knows about HTTP.
"""

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmkit.generation import left_pad

logger = logging.getLogger(__name__)

# finish reasons, as OpenAI names them, plus "cancelled" (the client went away or the server is stopping)
STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates: OpenAI's fields (`temperature` 0 = greedy) plus `top_k` and `ignore_eos`."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(eq=False)
class GenerationRequest:
    """One prompt's generation; `on_event` is called from the scheduler thread."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[str, str | None], None]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    # detokenisation state: how much of the decoded text was handed out
    _emitted: int = 0
    _generator: torch.Generator | None = None

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
        tokenizer: its tokenizer (for eos, pad and detokenising).
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
        self.counts = {"finished": 0, "cancelled": 0, "generated_tokens": 0, "steps": 0}

    # ---- the caller's side (any thread) ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lmkit-scheduler", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[str, str | None], None]) -> GenerationRequest:
        """Queue a request; its text arrives through `on_event(delta, finish_reason)` (finish_reason last, once)."""
        if not prompt_ids:
            raise ValueError("a prompt needs at least one token")
        request = GenerationRequest(list(prompt_ids), params, on_event)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        request._generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._wakeup:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (the queue holds {self.max_queue})"
                )
            self._waiting.append(request)
            self._wakeup.notify()
        return request

    def stats(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting), **self.counts}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

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
                except Exception:  # a bug must not leave clients waiting forever: fail the batch, keep serving
                    logger.exception("generation failed; cancelling the requests in the batch")
                    for request in self._running + newcomers:
                        if request.finish_reason is None:
                            self._finish(request, CANCELLED)
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
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
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
        self._sample_and_advance(logits)

    def _sample_and_advance(self, logits: torch.Tensor) -> None:
        """Pick each row's next token, hand out its text, and drop the rows that are done.

        `logits` holds the last rows of the batch: all of them after a decoding step; after a prefill, the newcomers'
        only, and the rows already running (which fed nothing this pass) keep their last token.
        """
        offset = len(self._running) - logits.shape[0]
        next_tokens = self._last_tokens.clone() if offset else None
        greedy = logits.argmax(-1).tolist()  # one op for the whole batch; sampled rows replace theirs below
        chosen = []
        for row in range(logits.shape[0]):
            params = self._running[offset + row].params
            sampled = params.temperature > 0
            generator = self._running[offset + row]._generator
            chosen.append(_sample(logits[row], params, generator) if sampled else greedy[row])
        now = time.perf_counter()
        chosen_tensor = torch.tensor(chosen, device=self.device)[:, None]
        next_tokens = torch.cat((next_tokens, chosen_tensor)) if offset else chosen_tensor
        for row, token in enumerate(chosen):
            request = self._running[offset + row]
            if request.first_token_at is None:
                request.first_token_at = now
            self._advance(request, token)
        self._last_tokens = next_tokens
        self._drop_done()

    def _advance(self, request: GenerationRequest, token: int) -> None:
        """Add one token to a request, emit the text that can no longer change, finish it if it is done."""
        request.token_ids.append(token)
        self.counts["generated_tokens"] += 1
        if token == self.eos_token_id and not request.params.ignore_eos:
            self._emit(request, self._decode(request.token_ids[:-1]), STOP)
            return
        text = self._decode(request.token_ids)
        cut = min((i for i in (text.find(s) for s in request.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._emit(request, text[:cut], STOP)
        elif len(request.token_ids) >= request.params.max_tokens:
            self._emit(request, text, LENGTH)
        else:
            self._emit(request, text[: len(text) - _unsettled_tail(text, request.params.stop)], None)

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
            request.on_event(delta, None)

    def _finish(self, request: GenerationRequest, finish_reason: str, delta: str = "") -> None:
        request.finish_reason, request.finished_at = finish_reason, time.perf_counter()
        self.counts["cancelled" if finish_reason == CANCELLED else "finished"] += 1
        try:
            request.on_event(delta, finish_reason)
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


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise top-k, then nucleus (top-p) filtering, then a draw from `generator`."""
    if params.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        threshold = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first token always stays)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), -math.inf)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _unsettled_tail(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters may still change: a partial multi-byte character, or the start of a stop string."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                held = max(held, size)
                break
    return held
