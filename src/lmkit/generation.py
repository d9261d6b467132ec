"""Batched and streamed generation on top of `GenerationMixin.generate`, shared by evaluation, the callback and the CLI.

lmkit owns no sampling loop: it only batches prompts with left padding (so every prompt ends where generation
starts), and keeps each sampled generation reproducible with its own seeded generator state.
"""

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from transformers import TextStreamer


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


def sampling_kwargs(temperature: float, top_k: int | None, top_p: float | None) -> dict:
    """generate() keyword arguments for a temperature (0 = greedy) with optional top-k / nucleus filtering."""
    if temperature <= 0:
        return {"do_sample": False}
    kwargs = {"do_sample": True, "temperature": temperature}
    if top_k:
        kwargs["top_k"] = top_k
    if top_p is not None and top_p < 1.0:
        kwargs["top_p"] = top_p
    return kwargs


@torch.no_grad()
def stream_generate(model, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0, **generate_kwargs) -> str:
    """Generate from one text prompt, printing tokens to stdout as they come; returns the generated text."""
    model.eval()
    torch.manual_seed(seed)
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if input_ids.shape[1] == 0:  # an empty prompt starts a new document
        input_ids = torch.tensor([[tokenizer.eos_token_id]])
    input_ids = input_ids.to(next(model.parameters()).device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        streamer=streamer,
        **generate_kwargs,
    )
    return tokenizer.decode(generated[0, input_ids.shape[1]:], skip_special_tokens=True)
