"""Evaluation by generation: held-out prompts → continuations → BLEU / chrF, plus perplexity and bits per byte.

BLEU is computed from text the model actually generated (with the KV cache, in left-padded batches), never from
teacher-forced argmax. Each evaluation also scores a trivial baseline (the prompt's last tokens repeated as the
continuation) so a reader knows what "learned something" means.
"""

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from datasets import DatasetDict

from lmkit import data as data_lib
from lmkit import hub as hub_lib
from lmkit.atomic import atomic_write_json, atomic_write_text
from lmkit.errors import UserError
from lmkit.generation import generate_ids, sampling_kwargs
from lmkit.metrics import BLEU_TOKENIZERS, bits_per_byte, bleu_chrf, perplexity
from lmkit.run_dir import RunDir
from lmkit.settings import build_section, check_fields, read_yaml_mapping, setting
from lmkit.tokenization import token_byte_lengths


@dataclass
class EvalArgs:
    """The recipe's `eval:` section: BLEU on generated continuations of held-out documents."""

    bleu_samples: int = setting(32, "Held-out documents scored by BLEU (a fixed, seeded choice); 0 = no BLEU.",
                                minimum=0)
    prompt_tokens: int = setting(32, "Tokens of each document given as the prompt.", minimum=1)
    max_new_tokens: int = setting(32, "Tokens generated; the next this many are the reference.", minimum=1)
    batch_size: int = setting(16, "Prompts generated together (left-padded).", minimum=1)
    temperature: float = setting(0.0, "0 = greedy; > 0 samples.", minimum=0)
    top_k: int = setting(0, "Sample from the k most likely tokens (0 = off).", minimum=0)
    top_p: float = setting(1.0, "Nucleus sampling threshold (1.0 = off).", above=0, maximum=1)
    bleu_tokenize: str | None = setting(
        None, "sacrebleu tokenizer; null = by language ('zh' for Chinese, '13a' otherwise).", choices=BLEU_TOKENIZERS
    )
    seed: int = setting(1234, "Seed of the sample choice and of sampling (not training.seed).")

    def __post_init__(self):
        check_fields(self, "eval")


def needs_bleu(training_args) -> bool:
    """Whether the Trainer picks its best checkpoint by BLEU or chrF, which only an evaluation with BLEU computes."""
    return str(training_args.metric_for_best_model or "").removeprefix("eval_") in ("bleu", "chrf")


@dataclass
class BleuPair:
    prompt_ids: list[int]
    reference_ids: list[int]


def make_bleu_pairs(texts, tokenizer, args: EvalArgs) -> list[BleuPair]:
    """Cut held-out documents into (prompt, reference) token pairs: a fixed choice seeded by `args.seed`.

    Documents too short to give a prompt and at least one reference token are skipped; the reference is the next
    `max_new_tokens` tokens (or fewer, where the document ends).
    """
    if args.bleu_samples == 0:
        return []
    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    pairs = []
    for start in range(0, len(order), 256):
        chunk = [texts[i] for i in order[start:start + 256]]
        # verbose=False: whole documents may exceed model_max_length; only their first tokens are used
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            if len(ids) > args.prompt_tokens:
                pairs.append(BleuPair(ids[: args.prompt_tokens], ids[args.prompt_tokens:][: args.max_new_tokens]))
                if len(pairs) == args.bleu_samples:
                    return pairs
    return pairs


def baseline_continuation(prompt_ids: list[int], length: int) -> list[int]:
    """The trivial baseline: the prompt's last `length` tokens, as if the text simply repeated itself."""
    return prompt_ids[-length:]


def score_bleu(model, tokenizer, pairs: list[BleuPair], args: EvalArgs, process_index: int = 0, num_processes: int = 1,
               synced: bool = False):
    """Generate continuations for `pairs` and score them against the references.

    Under several processes each generates an equal share (the last rank's padded with repeats, dropped after the
    gather) and the texts are gathered, so the score equals the one-process score (greedy decoding is deterministic
    per prompt). With `synced` (a sharded FSDP model, where every forward pass is a collective) the ranks also step
    through `generate` in lockstep until all are done (`synced_gpus`); otherwise no rank waits on another.

    Returns:
        (metrics, rows): metrics has bleu, chrf, baseline_bleu, baseline_chrf; rows are dicts of
        prompt / reference / generation texts for the samples table.
    """
    share = math.ceil(len(pairs) / num_processes) if pairs else 0
    mine = pairs[process_index * share:(process_index + 1) * share]
    mine += [pairs[-1]] * (share - len(mine)) if pairs else []  # equal shares: the same number of generate calls
    generated = generate_ids(
        model,
        [p.prompt_ids for p in mine],
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        eos_token_id=tokenizer.eos_token_id,
        **({"synced_gpus": True} if synced else {}),
        **sampling_kwargs(args.temperature, args.top_k, args.top_p),
    )
    if num_processes > 1:
        generated = gather_object([generated])
        generated = [ids for part in generated for ids in part][: len(pairs)]

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    references = [decode(p.reference_ids) for p in pairs]
    predictions = [decode(ids) for ids in generated]
    baseline = [decode(baseline_continuation(p.prompt_ids, args.max_new_tokens)) for p in pairs]
    tokenize = args.bleu_tokenize
    scores = bleu_chrf(predictions, references, tokenize)
    base = bleu_chrf(baseline, references, tokenize)
    metrics = {"bleu": scores["bleu"], "chrf": scores["chrf"], "baseline_bleu": base["bleu"], "baseline_chrf": base["chrf"]}
    rows = [
        {"prompt": decode(p.prompt_ids), "reference": ref, "generation": pred}
        for p, ref, pred in zip(pairs, references, predictions)
    ]
    return metrics, rows


def samples_markdown(rows: list[dict], title: str) -> str:
    """A Markdown table of prompt / reference / generation (newlines shown as ⏎, pipes escaped)."""
    cell = lambda text: text.replace("|", "\\|").replace("\n", "⏎")  # noqa: E731
    lines = [f"# {title}", "", "| # | prompt | reference | generation |", "|---|---|---|---|"]
    lines += [f"| {i} | {cell(r['prompt'])} | {cell(r['reference'])} | {cell(r['generation'])} |" for i, r in enumerate(rows)]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def token_loss(model, blocks, collator, token_bytes: list[int], batch_size: int = 8) -> dict:
    """Mean next-token cross-entropy and bits per byte over tokenized blocks, padded by the training collator and
    scored by the model's own loss (summed per batch through `num_items_in_batch=1`, so every token weighs the same).

    Returns:
        loss (nats per predicted token), bits_per_byte (over the bytes `token_bytes` gives the predicted tokens),
        tokens and bytes (the predicted ones).
    """
    model.eval()
    device = next(model.parameters()).device
    byte_table = torch.tensor(token_bytes, dtype=torch.float64)
    nats, tokens, n_bytes = 0.0, 0, 0.0
    with collator.no_augmentation():
        for start in range(0, len(blocks), batch_size):
            rows = blocks.select(range(start, min(start + batch_size, len(blocks))))
            batch = {k: v.to(device) for k, v in collator(list(rows)).items()}
            nats += model(**batch, num_items_in_batch=1).loss.item()
            targets = batch["labels"][:, 1:]
            predicted = targets[targets != -100].cpu()
            tokens += predicted.numel()
            n_bytes += float(byte_table[predicted].sum())
    return {"loss": nats / max(tokens, 1), "bits_per_byte": bits_per_byte(nats, n_bytes), "tokens": tokens,
            "bytes": int(n_bytes)}


def evaluate_model(model_ref: str, data: str | None = None, num_samples: int | None = None, output: str | None = None,
                   hub: str | None = None) -> dict:
    """`lmkit eval`: BLEU, chrF, perplexity and bits per byte of a run dir, checkpoint or hub model on held-out text.

    The documents are the run's saved held-out split (of the run the model belongs to), or `data`. Writes the eval report
    and its samples table to `output` (default: the model's own dir when it is local, else ./runs/eval/<org>--<name>).
    """
    model_dir = hub_lib.resolve(model_ref, hub)
    model = hub_lib.load_model(str(model_dir))
    tokenizer = hub_lib.load_tokenizer(str(model_dir))
    local = Path(model_ref).is_dir()

    run = RunDir.of_model(model_dir)
    recipe_path = run.recipe if run.recipe.is_file() else None
    recipe = read_yaml_mapping(recipe_path) if recipe_path else {}
    eval_args = build_section(EvalArgs, recipe.get("eval"), "eval", str(recipe_path or "defaults"))
    if num_samples is not None:
        if num_samples < 0:
            raise UserError(f"--num-samples must be >= 0, got {num_samples}")
        eval_args.bleu_samples = num_samples
    data_args = build_section(data_lib.DataArgs, {**recipe.get("data", {}), "files": [data or "-"]}, "data", "eval")

    if data:
        documents = data_lib.load_eval_documents(data, data_args)
    else:
        if not run.heldout("test").is_file():
            raise UserError(f"{model_ref}: no saved held-out split ({run.heldout('test')}) for this model; pass "
                            f"--data PATH")
        documents = data_lib.load_heldout(run, "test")

    pairs = make_bleu_pairs(documents["text"], tokenizer, eval_args)
    scores, rows = score_bleu(model, tokenizer, pairs, eval_args)
    blocks, _ = data_lib.build_lm_datasets(
        DatasetDict({"test": documents}), tokenizer, data_args, vocab_size=model.config.vocab_size
    )
    scored = token_loss(model, blocks["test"], data_lib.LMDataCollator(tokenizer.pad_token_id),
                        token_byte_lengths(tokenizer))
    report = {
        "model": model_ref,
        "model_dir": str(model_dir),
        "documents": len(documents),
        "eval_loss": scored["loss"],
        "eval_perplexity": perplexity(scored["loss"]),
        "eval_bits_per_byte": scored["bits_per_byte"],
        "eval_bleu": scores["bleu"],
        "eval_chrf": scores["chrf"],
        "baseline_bleu": scores["baseline_bleu"],
        "baseline_chrf": scores["baseline_chrf"],
        "bleu_samples": len(pairs),
        "data": data or str(run.heldout("test")),
    }
    if output is None:
        output = model_dir if local else Path("runs") / "eval" / model_ref.replace("/", "--").replace("@", "-")
    report_path, samples_path = RunDir(output).eval_report()
    atomic_write_json(report_path, report)
    atomic_write_text(samples_path, samples_markdown(rows, f"Samples: {model_ref}"))
    report["output_dir"] = str(output)
    return report
