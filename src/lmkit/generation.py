"""Generation with `GenerationMixin.generate`: batched for evaluation, streamed for `lmkit generate` and the API.

- `generate_ids`: many prompts, in left-padded batches (so every prompt ends where generation starts), each sampled
  generation reproducible from a seed without moving the caller's random state. Evaluation scores BLEU with it.
- `stream_generate`: one text prompt, its text handed as it is decoded to a callback or a transformers streamer.
- `GenerateSettings`: the checked settings of one streamed generation (`lmkit generate`'s flags).

The sampling here is transformers'. `lmkit serve` has its own decoding loop (`lmkit.serve.scheduler`), because
continuous batching lets requests join and leave one KV-cached batch between steps, which `generate` cannot.
"""

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

from lmkit.settings import SettingError, check_fields, setting


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run a block without moving Python's, NumPy's or torch's global random state.

    Evaluation inside a training run uses this, so that a run that evaluates every N steps draws exactly the same
    dropout masks and data order as a run that never evaluates.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token-id lists into (B, T) input_ids and attention_mask, padded on the left."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    pad_token_id: int,
    max_new_tokens: int,
    batch_size: int = 16,
    seed: int = 0,
    **generate_kwargs,
) -> list[list[int]]:
    """Generate a continuation for each prompt (token ids in, new token ids out), in left-padded batches.

    Greedy unless `do_sample=True` is passed; sampling draws from a generator seeded with `seed`, and the caller's
    global random state is left as it was.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[list[int]] = []
    try:
        with preserved_rng_state():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                input_ids, attention_mask = left_pad(batch, pad_token_id, device)
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_token_id,
                    **generate_kwargs,
                )
                new_tokens = generated[:, input_ids.shape[1]:].tolist()
                for ids in new_tokens:
                    # generate() pads finished rows with pad_token_id; cut there.
                    outputs.append(ids[: ids.index(pad_token_id)] if pad_token_id in ids else ids)
    finally:
        model.train(was_training)
    return outputs


GREEDY_BELOW = 1e-6


def sampling_kwargs(temperature: float, top_k: int | None, top_p: float | None) -> dict:
    """generate() keyword arguments for a temperature (0 = greedy) with optional top-k / nucleus filtering.

    A temperature below `GREEDY_BELOW` is greedy too: transformers divides float32 logits by it, which overflows to
    inf (and the draw fails) long before the distribution stops being the argmax's to float precision.
    """
    if temperature < GREEDY_BELOW:
        return {"do_sample": False}
    kwargs = {"do_sample": True, "temperature": temperature}
    if top_k:
        kwargs["top_k"] = top_k
    if top_p is not None and top_p < 1.0:
        kwargs["top_p"] = top_p
    return kwargs


@dataclass(frozen=True)
class GenerateSettings:
    """How `stream_generate` continues a prompt: `lmkit generate`'s flags, and `lmkit.generate`'s keywords."""

    # No upper bounds but the seed's: a rope model continues past n_positions for as long as asked (stream_generate
    # checks the others' window), and a top_k above the vocabulary keeps every token.
    max_new_tokens: int = setting(64, "Tokens generated at most.", minimum=1)
    temperature: float = setting(0.8, "0 = greedy; > 0 samples.", minimum=0)
    top_k: int = setting(50, "Sample from the k most likely tokens (0 = off).", minimum=0)
    top_p: float = setting(0.95, "Nucleus sampling threshold (1.0 = off).", above=0, maximum=1)
    seed: int = setting(0, "Seed of the sampling.", minimum=0, maximum=(1 << 64) - 1)  # torch.manual_seed's range

    def __post_init__(self):
        check_fields(self)


class _CallbackStreamer(TextStreamer):
    """A `TextStreamer` that hands each piece of final text to a callback instead of printing it."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:  # the streamer also reports empty pieces (a token that ends mid-character, the end of the stream)
            self._on_text(text)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids generation starts from: the prompt's, or EOS for an empty prompt (a new document starts)."""
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
    return ids or [tokenizer.eos_token_id]


@torch.no_grad()
def stream_generate(model, tokenizer, prompt: str, stream: Callable[[str], None] | BaseStreamer | None = None,
                    settings: GenerateSettings = GenerateSettings()) -> str:
    """Continue `prompt`, streaming the new text as it is decoded; returns the whole generated text.

    Args:
        stream: a callback that gets each new piece of text (`print` with `end=""`, say), or a transformers streamer
            (`TextStreamer`, `TextIteratorStreamer`, ...) that `generate` feeds with token ids; None streams nothing.
        settings: the length and sampling; the caller's global random state is left as it was.

    Raises:
        SettingError: `max_new_tokens` reaches past the positions a learned or sinusoidal model has.
    """
    ids = prompt_ids(tokenizer, prompt)
    limit = model.config.n_positions if model.config.position_embedding_type != "rope" else None
    if limit is not None and len(ids) + settings.max_new_tokens > limit:
        # rope extends past n_positions; learned and sinusoidal position tables end there
        raise SettingError("max_new_tokens", f"must be at most {max(limit - len(ids), 0)} here: the prompt is "
                           f"{len(ids)} tokens and the model takes {limit} in all, got {settings.max_new_tokens}")
    if callable(stream) and not isinstance(stream, BaseStreamer):
        stream = _CallbackStreamer(tokenizer, stream)
    was_training = model.training
    model.eval()
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    try:
        with preserved_rng_state():
            torch.manual_seed(settings.seed)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                streamer=stream,
                **sampling_kwargs(settings.temperature, settings.top_k, settings.top_p),
            )
    finally:
        model.train(was_training)
    return tokenizer.decode(generated[0, input_ids.shape[1]:], skip_special_tokens=True)
