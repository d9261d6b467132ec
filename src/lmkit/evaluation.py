"""Evaluation by generation: held-out prompts → continuations → BLEU / chrF, plus perplexity and bits per byte.

BLEU is computed from text the model actually generated (with the KV cache, in left-padded batches), never from
teacher-forced argmax. Each evaluation also scores trivial baselines, so a reader knows what "learned something"
means: for documents one (the prompt's last tokens repeated as the continuation), for prompt→completion pairs two (the
prompt itself as the completion, and the completion most frequent in training where the run recorded it), the
stronger of which by BLEU is also reported as `baseline_bleu`.
"""

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from datasets import DatasetDict

from lmkit import data as data_lib
from lmkit import hub as hub_lib
from lmkit import loading
from lmkit.atomic import atomic_write_json, atomic_write_text, check_writable_dir
from lmkit.errors import UserError
from lmkit.generation import generate_ids, sampling_kwargs
from lmkit.metrics import BLEU_TOKENIZERS, bits_per_byte, bleu_chrf, bleu_tokenizer_for, exact_match_rate, perplexity
from lmkit.run_dir import RunDir
from lmkit.settings import build_section, check_fields, check_value, read_yaml_mapping, setting
from lmkit.tokenization import token_byte_lengths


@dataclass
class EvalArgs:
    """The recipe's `eval:` section: BLEU on generated continuations of held-out documents."""

    bleu_samples: int = setting(32, "Held-out documents (or pairs) scored by BLEU (a fixed, seeded choice); "
                                "0 = no BLEU.", minimum=0)
    prompt_tokens: int = setting(32, "Tokens of each document given as the prompt (documents only).", minimum=1)
    max_new_tokens: int = setting(
        32, "Tokens generated; for documents the next this many are the reference, for pairs generation also stops "
        "at EOS.", minimum=1,
    )
    batch_size: int = setting(16, "Prompts generated together (left-padded).", minimum=1)
    temperature: float = setting(0.0, "0 = greedy; > 0 samples.", minimum=0)
    top_k: int = setting(0, "Sample from the k most likely tokens (0 = off).", minimum=0)
    top_p: float = setting(1.0, "Nucleus sampling threshold (1.0 = off).", above=0, maximum=1)
    bleu_tokenize: str | None = setting(
        None, "sacrebleu tokenizer; null = by language ('zh' for mostly CJK text, '13a' otherwise).",
        choices=BLEU_TOKENIZERS,
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


def _generate_shared(model, tokenizer, prompts: list[list[int]], args: EvalArgs, process_index: int,
                     num_processes: int, synced: bool, stop_ids: list[int] | None = None) -> list[list[int]]:
    """Generated ids for every prompt, each process generating an equal share; see `score_bleu`. Generation stops
    at any of `stop_ids` (default: EOS)."""
    share = math.ceil(len(prompts) / num_processes) if prompts else 0
    mine = prompts[process_index * share:(process_index + 1) * share]
    mine += [prompts[-1]] * (share - len(mine)) if prompts else []  # equal shares: the same number of generate calls
    generated = generate_ids(
        generation_model(model),
        mine,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        eos_token_id=stop_ids or tokenizer.eos_token_id,
        **({"synced_gpus": True} if synced else {}),
        **sampling_kwargs(args.temperature, args.top_k, args.top_p),
    )
    if num_processes > 1:
        generated = gather_object([generated])
        generated = [ids for part in generated for ids in part][: len(prompts)]
    return generated


def generation_model(model):
    """The module that generates: a peft model's underlying model, whose layers carry the adapter (peft's own
    `generate` wrapper adds nothing for LoRA)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) and hasattr(model, "peft_config") else model


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
    generated = _generate_shared(model, tokenizer, [p.prompt_ids for p in pairs], args, process_index, num_processes,
                                 synced)

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    references = [decode(p.reference_ids) for p in pairs]
    predictions = [decode(ids) for ids in generated]
    baseline = [decode(baseline_continuation(p.prompt_ids, args.max_new_tokens)) for p in pairs]
    tokenize = args.bleu_tokenize
    scores = bleu_chrf(predictions, references, tokenize)
    base = bleu_chrf(baseline, references, tokenize)
    metrics = {"bleu": scores["bleu"], "chrf": scores["chrf"],
               "baseline_bleu": base["bleu"], "baseline_chrf": base["chrf"]}
    rows = [
        {"prompt": decode(p.prompt_ids), "reference": ref, "generation": pred}
        for p, ref, pred in zip(pairs, references, predictions)
    ]
    return metrics, rows


def samples_markdown(rows: list[dict], title: str) -> str:
    """A Markdown table of the rows' columns, e.g. prompt / reference / generation (newlines shown as ⏎, pipes
    escaped)."""
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", "⏎")  # noqa: E731
    columns = list(rows[0]) if rows else ["prompt", "reference", "generation"]
    lines = [f"# {title}", "", "| # | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(cell(r[c]) for c in columns) + " |" for i, r in enumerate(rows)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Prompt→completion tasks: generated completions scored against the expected ones


@dataclass
class CompletionTask:
    """Held-out pairs to complete (a fixed seeded sample), and what the two baselines answer."""

    prompt_ids: list[list[int]]  # cut from the left to leave room for max_new_tokens within the model's positions
    prompts: list[str]
    references: list[str]  # the expected completions, as cleaned (not round-tripped through the tokenizer)
    # The completion most frequent in training: the "frequent" baseline answers it always (None: not known).
    frequent_completion: str | None
    # What the "copy" baseline answers for each prompt (None: the prompt itself); a conversation's last user message.
    copies: list[str] | None = None
    # The ids generation stops at (None: EOS); a chat model's end of turn and EOS.
    stop_ids: list[int] | None = None


def make_completion_task(pairs, frequent_completion: str | None, tokenizer, args: EvalArgs,
                         n_positions: int) -> CompletionTask | None:
    """A seeded sample of `args.bleu_samples` held-out pairs (columns prompt, completion); None when bleu_samples is 0.

    The sample depends only on `args.seed` and the pairs, so every evaluation of a run scores the same prompts.
    """
    if args.bleu_samples == 0 or len(pairs) == 0:
        return None
    order = list(range(len(pairs)))
    random.Random(args.seed).shuffle(order)
    chosen = pairs.select(order[: args.bleu_samples])
    room = max(1, n_positions - args.max_new_tokens)
    ids = tokenizer(list(chosen["prompt"]), add_special_tokens=False, verbose=False)["input_ids"]
    return CompletionTask(prompt_ids=[x[-room:] for x in ids], prompts=list(chosen["prompt"]),
                          references=list(chosen["completion"]), frequent_completion=frequent_completion)


def make_conversation_task(conversations, frequent_reply: str | None, tokenizer, args: EvalArgs,
                           n_positions: int) -> CompletionTask | None:
    """The completion task of held-out conversations: a seeded sample of `args.bleu_samples`, each to be answered with
    its last assistant turn from everything before it, rendered through the chat template with the generation prompt
    (earliest turns left out, as in training, until it leaves room for `args.max_new_tokens`). The copy baseline
    answers the last user message; None when bleu_samples is 0."""
    from lmkit import chat
    from lmkit.data.conversations import conversation_text, cut_points, without_turns_before

    if args.bleu_samples == 0 or len(conversations) == 0:
        return None
    order = list(range(len(conversations)))
    random.Random(args.seed).shuffle(order)
    room = max(1, n_positions - args.max_new_tokens)
    task = CompletionTask(prompt_ids=[], prompts=[], references=[], frequent_completion=frequent_reply, copies=[],
                          stop_ids=chat.stop_token_ids(tokenizer))
    for messages in conversations.select(order[: args.bleu_samples])["messages"]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        for start in cut_points(messages[: last + 1]):
            context = without_turns_before(messages[:last], start)
            ids = chat.prompt_ids(tokenizer, context)
            if len(ids) <= room:
                break
        task.prompt_ids.append(ids[-room:])
        task.prompts.append(conversation_text(context))
        task.references.append(messages[last]["content"])
        task.copies.append(next((m["content"] for m in reversed(context) if m["role"] == "user"), ""))
    return task


def score_completions(model, tokenizer, task: CompletionTask, args: EvalArgs, process_index: int = 0,
                      num_processes: int = 1, synced: bool = False):
    """Generate a completion for each prompt of `task` (until EOS or `args.max_new_tokens`) and score it.

    Returns:
        (metrics, rows): metrics has bleu, chrf, exact_match (0-1) and stop_rate (the share of generations that ended
        with a stop token, EOS or a chat model's end of turn, rather than at max_new_tokens), and for each baseline
        (`frequent`: the most frequent training completion; `copy`: the prompt itself, or a conversation's last user
        message) baseline_<name>_bleu/_chrf/_exact_match, plus baseline_bleu/_chrf of the stronger one by BLEU; rows
        are prompt (for a conversation, the conversation) / expected / generated / stopped for the samples table.
    """
    stop_ids = task.stop_ids or [tokenizer.eos_token_id]
    generated = _generate_shared(model, tokenizer, task.prompt_ids, args, process_index, num_processes, synced,
                                 stop_ids)
    predictions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    stopped = [any(i in stop_ids for i in ids) for ids in generated]
    tokenize = args.bleu_tokenize or bleu_tokenizer_for(task.references)

    def scores(answers: list[str]) -> dict:
        return {**bleu_chrf(answers, task.references, tokenize),
                "exact_match": exact_match_rate(answers, task.references)}

    metrics = {**scores(predictions), "stop_rate": sum(stopped) / max(len(stopped), 1)}
    baselines = {"copy": scores(task.copies if task.copies is not None else task.prompts)}
    if task.frequent_completion is not None:
        baselines["frequent"] = scores([task.frequent_completion] * len(task.references))
    for name, values in baselines.items():
        metrics.update({f"baseline_{name}_{key}": value for key, value in values.items()})
    stronger = max(baselines.values(), key=lambda values: values["bleu"])
    metrics.update({"baseline_bleu": stronger["bleu"], "baseline_chrf": stronger["chrf"]})
    rows = [{"prompt": p, "expected": r, "generated": g, "stopped": "stop token" if s else "max_new_tokens"}
            for p, r, g, s in zip(task.prompts, task.references, predictions, stopped)]
    return metrics, rows


def loss_sums(model, batch: dict, byte_table: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """What mean loss and bits per byte are summed from, for one collated batch (call it under `torch.no_grad()`).

    The model's own loss, summed over the predicted tokens through `num_items_in_batch=1`, so that every token weighs
    the same whatever batch it is in.

    Returns:
        (nats, tokens, bytes): the loss summed over the predicted tokens (a tensor on the model's device), how many
        tokens were predicted, and their UTF-8 bytes by `byte_table` (float64 byte lengths by token id, on the CPU).
    """
    nats = model(**batch, num_items_in_batch=1).loss.detach()
    targets = batch["labels"][:, 1:]
    predicted = targets[targets != -100].cpu()
    return nats, predicted.numel(), byte_table[predicted].sum()


@torch.no_grad()
def token_loss(model, blocks, collator, token_bytes: list[int], batch_size: int = 8) -> dict:
    """Mean next-token cross-entropy and bits per byte over tokenized blocks, padded by the training collator and
    scored by the model's own loss (`loss_sums`).

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
            batch_nats, batch_tokens, batch_bytes = loss_sums(model, batch, byte_table)
            nats += batch_nats.item()
            tokens += batch_tokens
            n_bytes += float(batch_bytes)
    return {"loss": nats / max(tokens, 1), "bits_per_byte": bits_per_byte(nats, n_bytes), "tokens": tokens,
            "bytes": int(n_bytes)}


def default_eval_output(model_ref: str, model_dir: Path, local: bool) -> Path:
    """Where `lmkit eval` writes without --output: a local run or checkpoint dir itself; for a hub name or a hub
    revision's path (immutable: nothing but push, delete and gc writes in a hub), ./runs/eval/<org>--<name>-<rev>."""
    revision = hub_lib.revision_containing(model_dir)
    if revision:
        name, rev = revision
        return Path("runs") / "eval" / f"{name.replace('/', '--')}-{rev[:hub_lib.SHORT_REVISION]}"
    return model_dir if local else Path("runs") / "eval" / model_ref.replace("/", "--").replace("@", "-")


def evaluate_model(model_ref: str, data: str | None = None, num_samples: int | None = None, output: str | None = None,
                   hub: str | None = None) -> dict:
    """`lmkit eval`: BLEU, chrF, perplexity and bits per byte of a run dir, checkpoint or hub model on held-out text.

    The documents are the run's saved held-out split (of the run the model belongs to), or `data`. Writes the eval
    report and its samples table to `output` (default: see `default_eval_output`; never inside a hub).
    """
    if num_samples is not None:  # before anything loads
        check_value("num_samples", num_samples, int, {"minimum": 0})
    model_dir = hub_lib.resolve(model_ref, hub)
    local = Path(model_ref).is_dir()
    output = default_eval_output(model_ref, model_dir, local) if output is None else Path(output)
    hub_lib.refuse_inside_hub(output, "--output", hub)
    check_writable_dir(output, "--output")
    model = loading.load_model(str(model_dir))
    tokenizer = loading.load_tokenizer(str(model_dir))

    run = RunDir.of_model(model_dir)
    recipe_path = run.recipe if run.recipe.is_file() else None
    recipe = read_yaml_mapping(recipe_path) if recipe_path else {}
    eval_args = build_section(EvalArgs, recipe.get("eval"), "eval", str(recipe_path or "defaults"))
    if num_samples is not None:
        eval_args.bleu_samples = num_samples
    data_args = build_section(data_lib.DataArgs, {**recipe.get("data", {}), "files": [data or "-"]}, "data", "eval")
    if data_args.format == "messages" or (data and data_lib.looks_like_conversations(data, data_args)):
        report, rows = _evaluate_conversations(model, tokenizer, run, data, data_args, eval_args)
    elif data_args.format == "prompt_completion" or (data and data_lib.looks_like_pairs(data, data_args)):
        report, rows = _evaluate_pairs(model, tokenizer, run, data, data_args, eval_args)
    else:
        report, rows = _evaluate_documents(model, tokenizer, run, model_ref, data, data_args, eval_args)
    report = {"model": model_ref, "model_dir": str(model_dir), **report}
    report_path, samples_path = RunDir(output).eval_report()
    atomic_write_json(report_path, report)
    atomic_write_text(samples_path, samples_markdown(rows, f"Samples: {model_ref}"))
    report["output_dir"] = str(output)
    return report


def _saved_heldout(run: RunDir, label) -> Path:
    """The run's saved held-out test split, what `lmkit eval` scores without --data; `label` names the model."""
    path = run.heldout("test")
    if not path.is_file():
        raise UserError(f"{label}: no saved held-out split ({path}) for this model; pass --data PATH")
    return path


def _loss_report(model, tokenizer, examples) -> dict:
    """eval_loss, eval_perplexity and eval_bits_per_byte of tokenized `examples` (blocks of documents, or pairs)."""
    collator = data_lib.LMDataCollator(tokenizer.pad_token_id)
    scored = token_loss(model, examples, collator, token_byte_lengths(tokenizer))
    return {"eval_loss": scored["loss"], "eval_perplexity": perplexity(scored["loss"]),
            "eval_bits_per_byte": scored["bits_per_byte"]}


def _evaluate_pairs(model, tokenizer, run: RunDir, data: str | None, data_args, eval_args: EvalArgs):
    """`lmkit eval` on prompt→completion pairs: generated completions scored, completion-only loss."""
    data_args = dataclasses.replace(data_args, format="prompt_completion",
                                    block_size=min(data_args.block_size, model.config.n_positions))
    if data:
        if data_args.pairs_from and data_lib.looks_like_pairs(data, data_args):  # pairs given as records, not lines
            data_args = dataclasses.replace(data_args, pairs_from=None)
        pairs = data_lib.load_eval_pairs(data, data_args)
    else:
        pairs = data_lib.load_eval_pairs(str(_saved_heldout(run, run.path)), data_args, heldout=True)
    return _score_task(model, tokenizer, run, data, data_args, eval_args, pairs, "pairs")


def _evaluate_conversations(model, tokenizer, run: RunDir, data: str | None, data_args, eval_args: EvalArgs):
    """`lmkit eval` on conversations: each last assistant turn generated and scored, assistant-only loss."""
    from lmkit import chat

    if not chat.has_template(tokenizer):
        raise UserError(f"{run.path}: the model's tokenizer has no chat template, so it cannot be evaluated on "
                        "conversations")
    data_args = dataclasses.replace(data_args, format="messages", pairs_from=None,
                                    block_size=min(data_args.block_size, model.config.n_positions))
    path = data or str(_saved_heldout(run, run.path))
    conversations = data_lib.load_eval_conversations(path, data_args, heldout=not data)
    return _score_task(model, tokenizer, run, data, data_args, eval_args, conversations, "conversations")


def _score_task(model, tokenizer, run: RunDir, data: str | None, data_args, eval_args: EvalArgs, records,
                unit: str):
    """Generated completions (or last replies) of `records` scored against baselines, and the loss on the labelled
    tokens only: the report and the samples rows of `lmkit eval` on pairs or conversations."""
    stats = json.loads(run.data_stats.read_text(encoding="utf-8")) if run.data_stats.is_file() else {}
    frequent = (stats.get("most_frequent_train_completion") or {}).get("text")
    make_task, build = ((make_conversation_task, data_lib.build_conversation_datasets) if unit == "conversations"
                        else (make_completion_task, data_lib.build_pair_datasets))
    task = make_task(records, frequent, tokenizer, eval_args, model.config.n_positions)
    scores, rows = score_completions(model, tokenizer, task, eval_args) if task else ({}, [])
    examples, _ = build(DatasetDict({"test": records}), tokenizer, data_args, vocab_size=model.config.vocab_size)
    report = {unit: len(records), **_loss_report(model, tokenizer, examples["test"])}
    report.update({f"eval_{k}" if not k.startswith("baseline_") else k: v for k, v in scores.items()})
    report.update({"bleu_samples": len(task.references) if task else 0, "data": data or str(run.heldout("test"))})
    return report, rows


def _evaluate_documents(model, tokenizer, run: RunDir, model_ref: str, data: str | None, data_args,
                        eval_args: EvalArgs):
    """`lmkit eval` on documents: generated continuations scored, loss over every token."""
    if data:
        documents = data_lib.load_eval_documents(data, data_args)
    else:
        _saved_heldout(run, model_ref)  # raises where there is none
        documents = data_lib.load_heldout(run, "test")

    pairs = make_bleu_pairs(documents["text"], tokenizer, eval_args)
    scores, rows = score_bleu(model, tokenizer, pairs, eval_args)
    blocks, _ = data_lib.build_lm_datasets(
        DatasetDict({"test": documents}), tokenizer, data_args, vocab_size=model.config.vocab_size
    )
    report = {
        "documents": len(documents),
        **_loss_report(model, tokenizer, blocks["test"]),
        "eval_bleu": scores["bleu"],
        "eval_chrf": scores["chrf"],
        "baseline_bleu": scores["baseline_bleu"],
        "baseline_chrf": scores["baseline_chrf"],
        "bleu_samples": len(pairs),
        "data": data or str(run.heldout("test")),
    }
    return report, rows
