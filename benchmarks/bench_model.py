"""Throughput of LmkitForCausalLM against transformers' GPT2LMHeadModel (SDPA): same weights, batch and optimizer.

Both models hold the same numbers (the GPT-2 one is `to_gpt2()` of the lmkit one) and are timed in one process,
alternating step by step after warm-up, so machine noise hits both alike. Prints training tokens/s in fp32 and under
bf16 autocast, greedy generation tokens/s with the KV cache, and model FLOPs utilisation against this machine's fp32
matmul peak (timed here with a large torch.mm).

    python benchmarks/bench_model.py                  # about 2-4 minutes on 2 cores
    python benchmarks/bench_model.py --steps 3 --gen-reps 1   # a quick look
    python benchmarks/bench_model.py --compile        # lmkit under torch.compile (adds compile time)
    python benchmarks/bench_model.py --smoke          # one step, batch 2, 8 new tokens: does it still run
"""

import argparse
import os
import statistics
import time

import torch
from smoke import add_smoke
from transformers import GPT2LMHeadModel

from lmkit.configuration import LmkitConfig
from lmkit.modeling import LmkitForCausalLM

VOCAB, POSITIONS, EMBD, LAYERS, HEADS = 8192, 256, 256, 4, 4


def build_models(compile_lmkit: bool) -> tuple[torch.nn.Module, GPT2LMHeadModel]:
    torch.manual_seed(0)
    config = LmkitConfig(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=EMBD, n_layer=LAYERS, n_head=HEADS, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    lmkit_model = LmkitForCausalLM(config)
    hf_model = lmkit_model.to_gpt2()
    hf_model.set_attn_implementation("sdpa")
    if compile_lmkit:
        lmkit_model = torch.compile(lmkit_model)
    return lmkit_model, hf_model


def train_step(model, optimizer, batch, precision: str) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_training(models: dict, batch, precision: str, steps: int, warmup: int) -> dict[str, float]:
    """Seconds per step for each model, alternating which one goes first at every step."""
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    for model in models.values():
        model.train()
    for _ in range(warmup):
        for name, model in models.items():
            train_step(model, optimizers[name], batch, precision)
    times = {name: [] for name in models}
    order = list(models)
    for step in range(steps):
        for name in order if step % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            train_step(models[name], optimizers[name], batch, precision)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def time_generation(models: dict, prompts, new_tokens: int, reps: int) -> dict[str, float]:
    """Best seconds over `reps` for a greedy, KV-cached generation of `new_tokens` tokens for every prompt."""
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "use_cache": True}
    for model in models.values():
        model.eval()
        model.generate(prompts[:2, :8], max_new_tokens=4, do_sample=False, pad_token_id=1)  # warm-up
    times = {name: [] for name in models}
    order = list(models)
    for rep in range(reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            models[name].generate(prompts, pad_token_id=1, **settings)
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def matmul_peak_flops(size: int, reps: int = 10) -> float:
    """This machine's fp32 matmul throughput in FLOP/s (best of `reps` square torch.mm)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def training_flops_per_token(model: LmkitForCausalLM, seq_len: int) -> float:
    """6 N per token for the matmuls (forward + backward) plus attention's 12 L C T (PaLM, appendix B).

    N counts the weights that multiply: the blocks and the LM head (tied to wte; the embedding lookups are free).
    """
    config = model.config
    block_params = sum(p.numel() for p in model.transformer.h.parameters())
    lm_head = config.vocab_size * config.n_embd
    return 6 * (block_params + lm_head) + 12 * config.n_layer * config.n_embd * seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per model and precision")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per model first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gen-reps", type=int, default=2, help="timed generation runs per model")
    parser.add_argument("--compile", action="store_true", help="wrap the lmkit model in torch.compile")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--gen-tokens", type=int, default=64, help="new tokens per prompt in the generation timing")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the matrices timing the matmul peak")
    add_smoke(parser, steps=1, warmup=1, batch_size=2, gen_reps=1, gen_tokens=8, peak_size=512)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # Other processes on the machine slow both models, and many small kernels (HF's GELU, generation) most: the load
    # average says how far to trust the absolute figures. The ratios come from alternating steps.
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load}")
    peak = matmul_peak_flops(args.peak_size)
    print(f"fp32 matmul peak (torch.mm {args.peak_size}^3): {peak / 1e9:.1f} GFLOP/s")

    lmkit_model, hf_model = build_models(args.compile)
    models = {"lmkit": lmkit_model, "hf-gpt2": hf_model}
    raw_lmkit = getattr(lmkit_model, "_orig_mod", lmkit_model)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(2, VOCAB, (args.batch_size, POSITIONS), generator=generator)
    tokens_per_step = batch.numel()
    flops_per_token = training_flops_per_token(raw_lmkit, POSITIONS)
    print(f"config: vocab {VOCAB}, n_positions {POSITIONS}, n_embd {EMBD}, n_layer {LAYERS}, n_head {HEADS}; "
          f"batch {args.batch_size}x{POSITIONS}; AdamW; {flops_per_token / 1e6:.1f} MFLOP/token (train)")  # fmt: skip

    for precision in args.precisions.split(","):
        seconds = time_training(models, batch, precision, args.steps, args.warmup)
        rates = {name: tokens_per_step / s for name, s in seconds.items()}
        for name, rate in rates.items():
            mfu = rate * flops_per_token / peak
            print(f"train {precision:4s} {name:8s} {rate:9.0f} tokens/s   MFU {mfu:5.1%} of fp32 matmul peak")
        print(f"train {precision:4s} ratio lmkit/hf-gpt2: {rates['lmkit'] / rates['hf-gpt2']:.2f}")

    prompts = torch.randint(2, VOCAB, (16, 32), generator=generator)
    new_tokens = args.gen_tokens
    seconds = time_generation(models, prompts, new_tokens, args.gen_reps)
    rates = {name: prompts.shape[0] * new_tokens / s for name, s in seconds.items()}
    for name, rate in rates.items():
        print(f"generate {name:8s} {rate:9.0f} new tokens/s (16 prompts x 32 tokens, {new_tokens} new, greedy, "
              "KV cache)")
    print(f"generate ratio lmkit/hf-gpt2: {rates['lmkit'] / rates['hf-gpt2']:.2f}")


if __name__ == "__main__":
    main()
