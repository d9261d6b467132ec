"""How exact `lmkit export` is: lmkit against its stock export (GPT-2 or GPT-NeoX), per position type.

For each position type, a model the size the demo had before the sizing study (4 layers, 192 wide, 128 positions)
is saved, exported with `lmkit.exporting.export_model` and loaded back with plain `AutoModelForCausalLM`. Weights are
drawn wider than at initialisation (std `--std`), so the logits span a trained model's range rather than init's
near-zero. Both models then score a full-window left-padded batch (the export given position ids counted over real
tokens, as lmkit counts them) and decode it greedily. Prints, per type: the stock class, the largest logit and the
largest absolute logit difference over real tokens, whether every greedy token agrees, and the export time.

    python benchmarks/bench_export.py            # about 20 s on 2 cores
    python benchmarks/bench_export.py --std 0.3  # logits like a longer-trained model's
    python benchmarks/bench_export.py --smoke    # a batch of 2, 8 new tokens: does it still run
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from smoke import add_smoke
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from lmkit.configuration import LmkitConfig
from lmkit.exporting import export_model
from lmkit.modeling import LmkitForCausalLM

VOCAB, POSITIONS, EMBD, LAYERS, HEADS = 4096, 128, 192, 4, 4


def save_model(directory: Path, kind: str, std: float) -> LmkitForCausalLM:
    specials = ["<|endoftext|>", "<|pad|>"]
    vocab = {token: i for i, token in enumerate(specials + [f"t{i}" for i in range(VOCAB - len(specials))])}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")),
        eos_token="<|endoftext|>", pad_token="<|pad|>",
    )  # fmt: skip
    torch.manual_seed(0)
    config = LmkitConfig(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=EMBD, n_layer=LAYERS, n_head=HEADS, eos_token_id=0,
        pad_token_id=1, position_embedding_type=kind, initializer_range=std,
    )  # fmt: skip
    model = LmkitForCausalLM(config)
    with torch.no_grad():  # LayerNorms and biases away from 1 and 0, as after training
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                parameter.add_(std * torch.randn_like(parameter))
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(str(directory))
    return model


def compare(kind: str, std: float, batch: int, new_tokens: int, workdir: Path) -> dict:
    model = save_model(workdir / kind, kind, std)
    start = time.perf_counter()
    export_model(workdir / kind, workdir / f"{kind}-export")
    export_seconds = time.perf_counter() - start
    stock = AutoModelForCausalLM.from_pretrained(workdir / f"{kind}-export").eval()

    generator = torch.Generator().manual_seed(1)
    prompt_length = POSITIONS - new_tokens
    ids = torch.randint(2, VOCAB, (batch, prompt_length), generator=generator)
    attention_mask = torch.ones_like(ids)
    for row in range(1, batch):  # row r is left-padded by r * prompt_length / (2 * batch) tokens
        attention_mask[row, : row * prompt_length // (2 * batch)] = 0
    ids = ids.masked_fill(attention_mask == 0, 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    real = attention_mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=attention_mask).logits[real]
        theirs = stock(ids, attention_mask=attention_mask, position_ids=position_ids).logits[real]
    greedy = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=1, eos_token_id=None)
    same_tokens = torch.equal(
        model.generate(ids, attention_mask=attention_mask, **greedy),
        stock.generate(ids, attention_mask=attention_mask, **greedy),
    )
    return {
        "type": kind, "class": type(stock).__name__, "max |logit|": ours.abs().max().item(),
        "max |diff|": (ours - theirs).abs().max().item(), "greedy equal": same_tokens, "export s": export_seconds,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--std", type=float, default=0.1, help="std of the weights (init is 0.02)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    add_smoke(parser, batch=2, new_tokens=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = [compare(k, args.std, args.batch, args.new_tokens, Path(workdir))
                for k in ("learned", "sinusoidal", "rope")]
    print(f"{'type':<11} {'stock class':<19} {'max |logit|':>11} {'max |diff|':>10} {'greedy equal':>12} "
          f"{'export s':>8}")
    for r in rows:
        print(f"{r['type']:<11} {r['class']:<19} {r['max |logit|']:>11.2f} {r['max |diff|']:>10.2e} "
              f"{r['greedy equal']!s:>12} {r['export s']:>8.2f}")


if __name__ == "__main__":
    main()
