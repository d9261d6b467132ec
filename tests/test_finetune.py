"""Fine-tuning for a task: prompt→completion examples (label mask, truncation, split by group), completion scoring
against sacrebleu, LoRA (targets, merge equality, exact resume, publishing), and the task recipes in a fast form."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (  # tests/ is on sys.path
    LMKIT,
    REPO_ROOT,
    kill_at_checkpoint,
    max_abs_diff,
    one_error_line,
    tiny_model,
)
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file

from lmkit import adapters
from lmkit import data as data_lib
from lmkit.cli import main
from lmkit.configuration import LmkitConfig
from lmkit.errors import UserError
from lmkit.evaluation import CompletionTask, EvalArgs, score_completions
from lmkit.modeling import LmkitForCausalLM
from lmkit.tokenization import TokenizerSpec, save_portable, train_tokenizer

POEM_LINES = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。",
              "春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"]


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    return train_tokenizer(TokenizerSpec(kind="char", vocab_size=200), POEM_LINES * 3,
                           tmp_path_factory.mktemp("char") / "tok")


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    texts = ["hello world, hello there, say hello"] * 50 + ["the theme of the thesis"] * 50
    return train_tokenizer(TokenizerSpec(kind="bpe", vocab_size=300), texts, tmp_path_factory.mktemp("bpe") / "tok")


def pairs(prompts, completions, groups=None) -> Dataset:
    return Dataset.from_dict({"prompt": prompts, "completion": completions, "group": groups or list(prompts)})


def build(tokenizer, prompts, completions, block_size=64):
    args = data_lib.DataArgs(files=["unused.jsonl"], format="prompt_completion", block_size=block_size)
    return data_lib.build_pair_datasets(DatasetDict({"train": pairs(prompts, completions)}), tokenizer, args,
                                        vocab_size=len(tokenizer))


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------------
# Examples: label mask, boundary, padding, truncation


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_label_mask_covers_the_completion_and_eos_only(kind, char_tokenizer, bpe_tokenizer):
    tokenizer = char_tokenizer if kind == "char" else bpe_tokenizer
    texts = (POEM_LINES[:2], POEM_LINES[2:]) if kind == "char" else (["hello", "the"], [" world", "me of it"])
    examples, stats = build(tokenizer, *texts)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad != eos, "lmkit tokenizers pad with <|pad|>, never with EOS"
    rows = list(examples["train"])
    for row, prompt, completion in zip(rows, *texts):
        p, c = ids_of(tokenizer, prompt), ids_of(tokenizer, completion)
        assert row["input_ids"] == p + c + [eos]
        assert row["labels"] == [-100] * len(p) + c + [eos]
    # padded by the collator: padding is never a label, and the EOS of the shorter row still is
    batch = data_lib.LMDataCollator(pad)(rows)
    for row_ids, row_labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        assert (row_labels[n:] == -100).all() and (row_ids[n:] == pad).all()
        assert row_labels[n - 1] == eos and row_ids[n - 1] == eos
    assert stats["splits"]["train"]["completion_tokens"] == sum(len(ids_of(tokenizer, c)) + 1 for c in texts[1])


def test_eos_is_labelled_even_when_pad_is_eos(char_tokenizer):
    # labels come from positions, not from comparing ids with pad: a GPT-2-style tokenizer padding with EOS still
    # learns to stop
    examples, _ = build(char_tokenizer, POEM_LINES[:2], ["低头", "思故乡"])
    rows = list(examples["train"])
    batch = data_lib.LMDataCollator(char_tokenizer.eos_token_id)(rows)
    eos = char_tokenizer.eos_token_id
    assert [int((labels == eos).sum()) for labels in batch["labels"]] == [1, 1]


def test_prompt_and_completion_are_tokenized_apart_so_the_boundary_never_moves(bpe_tokenizer):
    prompt, completion = "say hel", "lo there"  # "hello" is one BPE token of this vocabulary
    joined = ids_of(bpe_tokenizer, prompt + completion)
    apart = ids_of(bpe_tokenizer, prompt) + ids_of(bpe_tokenizer, completion)
    assert joined != apart, "the fixture must merge across the boundary when tokenized in one piece"
    examples, _ = build(bpe_tokenizer, [prompt], [completion])
    row = examples["train"][0]
    assert row["input_ids"] == apart + [bpe_tokenizer.eos_token_id]
    n_prompt = len(ids_of(bpe_tokenizer, prompt))
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert bpe_tokenizer.decode(row["labels"][n_prompt:-1]) == completion


def test_long_prompts_are_cut_from_the_left_and_long_completions_dropped(char_tokenizer):
    prompts = ["床前明月光疑是地上霜", "举头", "春眠不觉晓"]
    completions = ["低头", "望明月低头思故乡处处闻", "夜来"]
    examples, stats = build(char_tokenizer, prompts, completions, block_size=8)
    counts = stats["splits"]["train"]
    assert counts == {**counts, "pairs": 3, "examples": 2, "prompt_truncated": 1, "prompt_tokens_cut": 10 + 2 + 1 - 8,
                      "dropped_completion_too_long": 1}
    first = examples["train"][0]
    assert len(first["input_ids"]) == 8
    assert first["input_ids"][:5] == ids_of(char_tokenizer, "疑是地上霜"), "the prompt keeps its end"
    with pytest.raises(UserError, match="every one of the 1 train pairs"):
        build(char_tokenizer, ["举头"], ["望明月低头思故乡"], block_size=8)


# ---------------------------------------------------------------------------------------------------------------------
# Reading and splitting pairs


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_split_is_by_group_and_seeded(tmp_path):
    records = [{"prompt": f"第{g}首第{i}句", "completion": f"答{g}-{i}", "poem": f"poem-{g}"}
               for g in range(40) for i in range(5)]
    records.append({"prompt": "第0首第0句", "completion": "答0-0", "poem": "poem-0"})  # an exact duplicate
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    args = data_lib.DataArgs(files=[str(path)], format="prompt_completion", group_field="poem", test_size=0.2)
    splits, stats = data_lib.prepare_pair_splits(args, seed=3)
    train_groups, test_groups = set(splits["train"]["group"]), set(splits["test"]["group"])
    assert train_groups and test_groups and not train_groups & test_groups
    assert stats["dropped"]["duplicate"] == 1 and stats["pairs_kept"] == 200
    assert len(splits["train"]) + len(splits["test"]) == 200 and len(splits["test"]) % 5 == 0
    again, _ = data_lib.prepare_pair_splits(args, seed=3)
    assert list(again["test"]["prompt"]) == list(splits["test"]["prompt"])
    other, _ = data_lib.prepare_pair_splits(args, seed=4)
    assert set(other["test"]["group"]) != test_groups


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_pairs_are_read_from_every_structured_format(tmp_path, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"q": f"问{i}", "a": f"答{i}"} for i in range(12)]
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, records)
    elif fmt == "json":
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    elif fmt == "csv":
        path.write_text("q,a\n" + "".join(f"{r['q']},{r['a']}\n" for r in records), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    args = data_lib.DataArgs(files=[str(path)], format="prompt_completion", prompt_field="q", completion_field="a",
                             test_size=0.25)
    splits, stats = data_lib.prepare_pair_splits(args, seed=0)
    assert stats["records_read"] == 12
    assert sorted(p for s in splits.values() for p in s["prompt"]) == sorted(r["q"] for r in records)
    assert all(c == "答" + p[1:] for s in splits.values() for p, c in zip(s["prompt"], s["completion"]))


def test_a_text_file_needs_pairs_from(tmp_path):
    path = tmp_path / "poems.txt"
    path.write_text("一\n二\n", encoding="utf-8")
    args = data_lib.DataArgs(files=[str(path)], format="prompt_completion")
    with pytest.raises(UserError, match="a text file has no prompt/completion fields.*data.pairs_from: lines"):
        data_lib.prepare_pair_splits(args, seed=0)
    with pytest.raises(UserError, match="data.pairs_from needs data.format: prompt_completion"):
        data_lib.DataArgs(files=[str(path)], pairs_from="lines")


def test_cleaning_applies_to_both_fields(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "\x1b[32mＡ  line\x1b[m ", "completion": " next\tline  "},
        {"prompt": "b", "completion": "\x07"},  # the completion is empty once cleaned: dropped, counted
    ] + [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)])
    args = data_lib.DataArgs(files=[str(path)], format="prompt_completion", test_size=0.3)
    splits, stats = data_lib.prepare_pair_splits(args, seed=1)
    everything = {p: c for s in splits.values() for p, c in zip(s["prompt"], s["completion"])}
    assert everything["A line"] == "next\tline"
    assert stats["dropped"]["empty"] == 1


def test_pairs_from_lines_split_by_document(tmp_path, fixtures):
    args = data_lib.DataArgs(files=[str(fixtures / "zh-poetry.jsonl")], format="prompt_completion",
                             pairs_from="lines", test_size=0.2)
    splits, stats = data_lib.prepare_pair_splits(args, seed=42)
    documents, _ = data_lib.prepare_splits(data_lib.DataArgs(files=[str(fixtures / "zh-poetry.jsonl")],
                                                             test_size=0.2), seed=42)
    test_lines = {line.strip() for text in documents["test"]["text"] for line in text.split("\n")}
    assert set(splits["test"]["prompt"]) <= test_lines, "pairs come from the held-out documents of the text split"
    assert not set(splits["train"]["group"]) & set(splits["test"]["group"])
    first = documents["train"]["text"][0].split("\n")
    assert (first[0], first[1]) in set(zip(splits["train"]["prompt"], splits["train"]["completion"]))
    assert stats["most_frequent_train_completion"]["count"] >= 1


# ---------------------------------------------------------------------------------------------------------------------
# Scoring generated completions


def test_completion_scores_equal_hand_computed_sacrebleu(monkeypatch, char_tokenizer):
    import sacrebleu

    prompts = ["床前明月光，", "举头望明月，", "春眠不觉晓，"]
    references = ["疑是地上霜。", "低头思故乡。", "处处闻啼鸟。"]
    predictions = ["疑是地上霜。", "低头思明月。", "花落知多少"]
    eos = char_tokenizer.eos_token_id
    generated = [ids_of(char_tokenizer, predictions[0]) + [eos], ids_of(char_tokenizer, predictions[1]) + [eos],
                 ids_of(char_tokenizer, predictions[2])]  # the last one ran into max_new_tokens
    monkeypatch.setattr("lmkit.evaluation.generate_ids", lambda *args, **kwargs: generated)
    task = CompletionTask(prompt_ids=[ids_of(char_tokenizer, p) for p in prompts], prompts=prompts,
                          references=references, frequent_completion="低头思故乡。")
    metrics, rows = score_completions(None, char_tokenizer, task, EvalArgs(bleu_samples=3))
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    assert metrics["exact_match"] == pytest.approx(1 / 3) and metrics["stop_rate"] == pytest.approx(2 / 3)
    copy = sacrebleu.corpus_bleu(prompts, [references], tokenize="zh").score
    frequent = sacrebleu.corpus_bleu(["低头思故乡。"] * 3, [references], tokenize="zh").score
    assert metrics["baseline_copy_bleu"] == pytest.approx(copy)
    assert metrics["baseline_frequent_bleu"] == pytest.approx(frequent)
    assert metrics["baseline_frequent_exact_match"] == pytest.approx(1 / 3)
    assert metrics["baseline_bleu"] == pytest.approx(max(copy, frequent))
    assert rows[2] == {"prompt": prompts[2], "expected": references[2], "generated": predictions[2],
                       "stopped": "max_new_tokens"}


# ---------------------------------------------------------------------------------------------------------------------
# LoRA


# The LoRA base: 2 rotary layers of width 16, which the parameter counts below are computed for.
LORA_BASE = {"vocab_size": 40, "n_positions": 32, "n_embd": 16, "n_head": 2}


def test_default_targets_are_every_attention_and_mlp_linear():
    model = tiny_model("rope", **LORA_BASE)
    assert adapters.available_targets(model) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert len(adapters.resolve_targets(model, None)) == 8
    assert adapters.resolve_targets(model, ["c_fc"]) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    with pytest.raises(UserError, match="'q_proj' matches no linear module.*available: attn.c_attn, attn.c_proj"):
        adapters.resolve_targets(model, ["c_attn", "q_proj"])
    with pytest.raises(UserError, match="LM head.*tied"):
        adapters.resolve_targets(model, ["lm_head"])


def lora_model(base, **settings):
    args = adapters.FinetuneArgs(method="lora", r=4, **settings)
    lora = adapters.apply_lora(base, args, "demo/base", "abc123")
    torch.manual_seed(1)
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:  # B starts at zero (the adapter starts as a no-op): make it do something
            torch.nn.init.normal_(parameter, std=0.5)
    return lora


def test_only_adapters_train_and_the_merged_model_gives_the_same_logits():
    base = tiny_model("rope", **LORA_BASE)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    lora = lora_model(base)
    counts = adapters.parameter_counts(lora)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # r * (in + out) per adapted linear: c_attn 16->48, attn.c_proj 16->16, c_fc 16->64, mlp.c_proj 64->16; 2 layers
    assert counts["trainable_parameters"] == 2 * 4 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))
    assert 0 < counts["trainable_share"] < 0.5
    input_ids = torch.randint(0, 40, (3, 12))
    with torch.no_grad():
        adapted = lora(input_ids=input_ids).logits
        assert (adapted - LmkitForCausalLM(base.config).eval()(input_ids=input_ids).logits).abs().max() > 1e-3
        merged = adapters.merge(lora)
        assert isinstance(merged, LmkitForCausalLM)
        assert torch.allclose(merged(input_ids=input_ids).logits, adapted, atol=1e-5)
    assert merged.lm_head.weight is merged.transformer.wte.weight, "the tie survives the merge"
    assert torch.equal(merged.transformer.wte.weight, frozen["transformer.wte.weight"])


def test_lora_on_a_model_imported_from_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                       eos_token_id=0)).eval()
    lora = lora_model(LmkitForCausalLM.from_gpt2(gpt2).eval())
    assert len(lora.peft_config["default"].target_modules) == 8
    input_ids = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        adapted = lora(input_ids=input_ids).logits
        assert torch.allclose(adapters.merge(lora)(input_ids=input_ids).logits, adapted, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Recipes: errors (one line, exit 2), runs, resume, publishing


@pytest.fixture()
def base_model_dir(tmp_path, fixtures) -> Path:
    """A tiny random model with a char tokenizer of the fixture poems: what model.init_from and tokenizer.path use."""
    texts = [json.loads(line)["text"] for line in (fixtures / "zh-poetry.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer(TokenizerSpec(kind="char", vocab_size=3000, min_frequency=1), texts,
                                tmp_path / "base-tok")
    config = LmkitConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tokenizer),
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id, position_embedding_type="rope")
    torch.manual_seed(0)
    LmkitForCausalLM(config).save_pretrained(tmp_path / "base")
    save_portable(tokenizer, tmp_path / "base")
    return tmp_path / "base"


TASK = """
data:
  files: [{corpus}]
  format: prompt_completion
  block_size: 48
  test_size: 0.2
tokenizer: {{path: {base}}}
model: {{init_from: {base}}}
finetune: {{method: lora, r: 4, dropout: 0.1}}
eval: {{bleu_samples: 6, max_new_tokens: 12}}
hub: {{dir: {hub}}}
training:
  output_dir: {out}
  max_steps: 8
  per_device_train_batch_size: 8
  learning_rate: 3.0e-3
  eval_strategy: steps
  eval_steps: 4
  save_steps: 3
  logging_steps: 2
  report_to: none
  seed: 7
  disable_tqdm: true
"""


def task_recipe(tmp_path, corpus, base, name="run") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TASK.format(corpus=corpus, base=base, hub=tmp_path / "hub", out=tmp_path / name))
    return path


@pytest.mark.parametrize("records, overrides, message", [
    ([{"prompt": "a", "answer": "b"}], [], r"pairs.jsonl:1: no field 'completion' \(data.completion_field\); fields "
                                           r"present: prompt, answer"),
    ([{"prompt": "a", "completion": 5}], [], r"pairs.jsonl:1: field 'completion' \(data.completion_field\) holds a "
                                             r"int \('5'\), expected a string"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "  "}], [],
     r"pairs.jsonl:2: field 'completion' \(data.completion_field\) is empty"),
    ([{"prompt": "a", "completion": "b"}], ["finetune.target_modules=[q_proj]"],
     r"finetune.target_modules: 'q_proj' matches no linear module of the model; available: attn.c_attn, "
     r"attn.c_proj, mlp.c_fc, mlp.c_proj"),
    ([{"prompt": "a", "completion": "b"}], ["finetune.r=10000"],
     r"finetune.r must be at most the base model's width \(n_embd 32\), got 10000"),
])
def test_bad_pairs_and_targets_are_one_line_errors(tmp_path, base_model_dir, capsys, records, overrides, message):
    corpus = write_jsonl(tmp_path / "pairs.jsonl", records)
    code = main(["train", str(task_recipe(tmp_path, corpus, base_model_dir)), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "run").exists(), "nothing half-written"


def adapter_weights(run: Path) -> dict:
    return load_file(str(run / "adapter_model.safetensors"))


@pytest.mark.slow
def test_lora_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path, fixtures, base_model_dir):
    corpus = fixtures / "zh-poetry.jsonl"
    lines = ["data.pairs_from=lines"]
    reference = task_recipe(tmp_path, corpus, base_model_dir, "uninterrupted")
    subprocess.run([LMKIT, "train", str(reference), *lines], check=True, capture_output=True, timeout=600)

    interrupted = task_recipe(tmp_path, corpus, base_model_dir, "interrupted")
    run = tmp_path / "interrupted"
    kill_at_checkpoint([LMKIT, "train", str(interrupted), *lines], run, 3)
    assert not (run / "model.safetensors").exists(), "the run was killed before it finished"
    resumed = subprocess.run([LMKIT, "train", str(interrupted), *lines, "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_abs_diff(adapter_weights(run / "adapter"), adapter_weights(tmp_path / "uninterrupted" / "adapter")) \
        <= 1e-6
    merged = lambda path: load_file(str(path / "model.safetensors"))  # noqa: E731
    assert max_abs_diff(merged(run), merged(tmp_path / "uninterrupted")) <= 1e-6


@pytest.mark.slow
def test_lora_run_holds_adapter_and_merged_model_and_publishes_both(tmp_path, fixtures, base_model_dir, capsys):
    from peft import PeftModel

    corpus = fixtures / "zh-poetry.jsonl"
    recipe = task_recipe(tmp_path, corpus, base_model_dir)
    assert main(["train", str(recipe), "data.pairs_from=lines", "hub.name=me/next-line", "hub.push=end"]) == 0
    run = tmp_path / "run"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run / "adapter").iterdir()}
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_model_dir.resolve())
    results = json.loads((run / "eval_results.json").read_text())
    for key in ("eval_bleu", "eval_chrf", "eval_exact_match", "eval_stop_rate", "eval_baseline_copy_bleu",
                "eval_baseline_frequent_bleu"):
        assert key in results
    train_results = json.loads((run / "train_results.json").read_text())
    assert 0 < train_results["trainable_share"] < 0.2
    assert "| prompt | expected | generated | stopped |" in (run / "eval_samples.md").read_text()

    # the merged model equals the base model with the adapter applied
    input_ids = torch.randint(5, 100, (2, 16))
    with torch.no_grad():
        merged = LmkitForCausalLM.from_pretrained(run).eval()(input_ids=input_ids).logits
        base = LmkitForCausalLM.from_pretrained(base_model_dir)
        adapted = PeftModel.from_pretrained(base, run / "adapter").eval()(input_ids=input_ids).logits
    assert (merged - adapted).abs().max() <= 1e-5

    # published: the merged model with the adapter beside it; the card names the base model
    snapshot = next((tmp_path / "hub" / "models--me--next-line" / "snapshots").iterdir())
    assert (snapshot / "adapter" / "adapter_model.safetensors").is_file()
    assert (snapshot / "model.safetensors").is_file()
    card = (snapshot / "README.md").read_text()
    assert "base_model:" in card and str(base_model_dir.resolve()) in card and "LoRA" in card

    # lmkit eval on a pairs file, and on the run's own held-out pairs
    report = tmp_path / "report"
    assert main(["eval", str(run), "--data", str(run / "heldout" / "test.jsonl"), "--output", str(report)]) == 0
    scored = json.loads((report / "eval_report.json").read_text())
    assert scored["pairs"] > 0 and "eval_exact_match" in scored and "baseline_copy_bleu" in scored
    # a LoRA checkpoint holds the adapter only: every command that loads a model says so, in the same words
    checkpoint = run / "checkpoint-6"
    for argv in (["push", checkpoint, "--name", "me/ckpt", "--hub", tmp_path / "hub"], ["eval", checkpoint],
                 ["generate", checkpoint, "--prompt", "x"], ["export", checkpoint, "--output", tmp_path / "exp"],
                 ["serve", checkpoint, "--port", "0"]):
        err = one_error_line(capsys, argv)
        assert "a LoRA checkpoint holds the adapter only" in err and "finished run dir" in err, argv


@pytest.mark.slow
def test_task_recipes_run_in_a_fast_form(tmp_path, fixtures, monkeypatch):
    """recipes/next-line-{full,lora}: a tiny demo model trained and published first, then both fine-tunes on the
    fixture poems (the real recipes read the fortunes-zh poems)."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("LMKIT_HUB", str(hub))
    demo = ["data.files=[" + str(fixtures / "zh-poetry.jsonl") + "]", f"training.output_dir={tmp_path / 'demo'}",
            "training.max_steps=6", "training.eval_steps=6", "training.save_strategy=no", "eval.bleu_samples=2",
            "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "budget.time=null", "training.report_to=none"]
    assert main(["train", str(REPO_ROOT / "recipes" / "quickstart-zh" / "config.yaml"), *demo]) == 0
    fast = ["data.files=[" + str(fixtures / "zh-poetry.jsonl") + "]", "data.pairs_skip_lines=0",
            "training.max_steps=4", "training.eval_steps=2", "training.save_steps=4", "training.logging_steps=2",
            "eval.bleu_samples=4", "training.report_to=none"]
    scores = {}
    for method in ("full", "lora"):
        out = tmp_path / method
        assert main(["train", str(REPO_ROOT / "recipes" / f"next-line-{method}" / "config.yaml"), *fast,
                     f"training.output_dir={out}"]) == 0
        scores[method] = json.loads((out / "eval_results.json").read_text())
        assert (out / "adapter").is_dir() == (method == "lora")
    assert all("eval_bleu" in s and "eval_baseline_bleu" in s for s in scores.values())
    card = next((hub / "models--demo--zh-next-line-lora" / "snapshots").iterdir()) / "README.md"
    assert "demo/zh-char" in card.read_text()


@pytest.mark.slow
def test_lora_task_fine_tune_of_a_model_imported_from_a_gpt2_directory(tmp_path, fixtures, gpt2_dir):
    """model.init_from a transformers GPT-2 save (byte-level BPE, no pad token): LoRA adapts the imported model."""
    recipe = task_recipe(tmp_path, fixtures / "zh-poetry.jsonl", gpt2_dir)
    assert main(["train", str(recipe), "data.pairs_from=lines", "training.max_steps=4", "training.save_strategy=no",
                 "training.eval_steps=2"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "eval_results.json").read_text())
    assert "eval_bleu" in results and 0 <= results["eval_stop_rate"] <= 1
    config = json.loads((run / "config.json").read_text())
    assert config["model_type"] == "lmkit" and config["pad_token_id"] != config["eos_token_id"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_task_recipes_pad_pairs_in_length_groups_and_keep_the_demo_split():
    from lmkit.recipe import load_recipe

    demo = load_recipe(REPO_ROOT / "recipes" / "quickstart-zh" / "config.yaml")
    for method in ("full", "lora"):
        recipe = load_recipe(REPO_ROOT / "recipes" / f"next-line-{method}" / "config.yaml")
        assert recipe.data.format == "prompt_completion" and recipe.data.packing is False
        assert recipe.training.train_sampling_strategy == "group_by_length"
        assert recipe.finetune.method == method
        # the held-out poems are the demo model's held-out poems: same seed, same test share, same cleaning
        assert (recipe.training.seed, recipe.data.test_size) == (demo.training.seed, demo.data.test_size)
        assert set(recipe.data.files) <= set(demo.data.files)


def test_a_pair_run_can_train_its_own_tokenizer_on_prompts_and_completions(tmp_path, fixtures):
    recipe = tmp_path / "scratch.yaml"
    recipe.write_text(f"""
data: {{files: [{fixtures / "zh-poetry.jsonl"}], format: prompt_completion, pairs_from: lines, block_size: 48}}
tokenizer: {{train: {{kind: char, vocab_size: 3000, min_frequency: 1}}}}
model: {{n_layer: 1, n_head: 2, n_embd: 16, n_positions: 48}}
eval: {{bleu_samples: 2, max_new_tokens: 8}}
training: {{output_dir: {tmp_path / "run"}, max_steps: 2, per_device_train_batch_size: 4, report_to: none,
           save_strategy: "no", disable_tqdm: true}}
""")
    assert main(["train", str(recipe)]) == 0
    stats = json.loads((tmp_path / "run" / "tokenizer_stats.json").read_text())
    assert stats["vocab_size"] > 100
