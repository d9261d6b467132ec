"""One request's next token: its sampling parameters, the logit processing they ask for, a draw that cannot fail on
finite logits, and the log-probabilities reported back.

Every function here works on one row of the batch's logits, so a request computes what it would compute alone
whatever else runs beside it (the scheduler relies on this for batch invariance). The order, as in vLLM:

1. the model's logits, in float32;
2. `logit_bias` added, `min_tokens` bans the end tokens, then the penalties: `repetition_penalty` (prompt and output
   tokens, as in CTRL and transformers), `frequency_penalty` and `presence_penalty` (output tokens, OpenAI's
   definitions). The log-softmax of these "processed" logits is what `logprobs` reports;
3. temperature, top-k and top-p shape the distribution the token is drawn from (temperature 0: the argmax).
"""

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates: OpenAI's fields (`temperature` 0 = greedy) plus vLLM's extensions.

    `logprobs`: how many alternatives to report per generated token (0: only the chosen token's log-probability;
    None: none are computed). `prompt_logprobs`: the same for the prompt's tokens (`echo` with `logprobs`).
    `max_tokens` 0 generates nothing: the request only scores its prompt.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def processes_logits(self) -> bool:
        """Whether step 2 changes anything: if not, the raw logits are used as they are."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


@dataclass(frozen=True)
class TokenLogprob:
    """A token and its log-probability, with the `top` most likely (token, log-probability) pairs at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RowState:
    """What a request's logit processing remembers across steps: how often each token was generated."""

    vocab_size: int
    prompt_ids: list[int]
    output_counts: torch.Tensor | None = None  # (vocab,) float32, created on the first token that needs it
    _seen: torch.Tensor | None = field(default=None, repr=False)  # prompt or output tokens, for repetition_penalty

    def add(self, token: int, device) -> None:
        if self.output_counts is None:
            self.output_counts = torch.zeros(self.vocab_size, device=device)
        self.output_counts[token] += 1
        if self._seen is not None:
            self._seen[token] = True

    def seen(self, device) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
            self._seen[torch.tensor(self.prompt_ids, device=device)] = True
            if self.output_counts is not None:
                self._seen |= self.output_counts > 0
        return self._seen


def process(logits: torch.Tensor, params: SamplingParams, state: RowState, end_ids: tuple[int, ...]) -> torch.Tensor:
    """One row's logits (vocab,) after bias, `min_tokens` and the penalties (step 2), as a new float32 tensor."""
    logits = logits.float().clone()
    for token, bias in params.logit_bias:
        logits[token] += bias
    generated = 0 if state.output_counts is None else int(state.output_counts.sum())
    if generated < params.min_tokens and end_ids:
        logits[list(end_ids)] = -math.inf
    if params.repetition_penalty != 1.0:
        seen = state.seen(logits.device)
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if state.output_counts is not None and (params.frequency_penalty or params.presence_penalty):
        counts = state.output_counts
        logits -= counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
    return logits


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from one row's processed logits: the argmax at temperature 0, else a draw after temperature,
    top-k and top-p.

    Works in float64 and relative to the largest logit, so that any temperature in (0, 2], however small (1e-300 is
    0 in float32), and any top-p in (0, 1] give a proper distribution: the temperature divides differences that are
    <= 0 and turns them into 0 (the best tokens) or -inf, never inf or nan, and the most likely token always survives
    top-p.
    """
    if params.temperature <= 0:
        return int(logits.argmax())
    logits = logits.double()
    best = logits.max()
    if not torch.isfinite(best):
        raise ValueError("the model produced no finite logit for this request")
    scaled = (logits - best) / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        threshold = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < threshold, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = scaled.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p; the first one always stays (a top_p
        # below float32's smallest number would otherwise drop them all)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[0] = False
        scaled = scaled.masked_fill(drop.scatter(0, order, drop), -math.inf)
    return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry in one row's log-softmax, with the `top` most likely tokens at that position."""
    alternatives = ()
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        alternatives = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top: int) -> list[TokenLogprob | None]:
    """The log-probability of each prompt token given the ones before it (`logits`: (len(prompt), vocab), the
    prompt's own positions); the first token has none."""
    logprobs = logits.float().log_softmax(-1)
    scored: list[TokenLogprob | None] = [None]
    for position, token in enumerate(prompt_ids[1:]):
        scored.append(token_logprob(logprobs[position], token, top))
    return scored


def seed_of_choice(seed: int | None, index: int) -> int | None:
    """The seed of a request's `index`-th choice: the request's own for the first, distinct ones after it, so that a
    seeded request with `n` > 1 gives the same n choices every time and its first choice equals its `n` = 1 answer."""
    if seed is None or index == 0:
        return seed
    return (seed + index * 0x9E3779B97F4A7C15) % (1 << 64)  # the golden-ratio step of splitmix64
