"""Evaluation by generation: BLEU/chrF offline, held-out prompt pairs, the baseline, `lmkit eval`, `lmkit generate`."""

import json
import math
import subprocess

import pytest
import torch
from conftest import LMKIT, tiny_model  # tests/ is on sys.path under pytest

from lmkit import metrics
from lmkit.evaluation import EvalArgs, baseline_continuation, make_bleu_pairs, samples_markdown, score_bleu
from lmkit.generation import generate_ids, left_pad, preserved_rng_state


def test_bleu_and_chrf_are_sacrebleu_scores_computed_offline():
    import sacrebleu

    predictions = ["the cat sat on the mat", "a dog barked at night"]
    references = ["the cat sat on a mat", "the dog barked all night"]
    scores = metrics.bleu_chrf(predictions, references)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    assert metrics.bleu_chrf(references, references)["bleu"] == pytest.approx(100.0)


def test_bleu_tokenizer_follows_the_language():
    assert metrics.bleu_tokenizer_for(["床前明月光，疑是地上霜。"]) == "zh"
    assert metrics.bleu_tokenizer_for(["The moon is bright tonight."]) == "13a"
    # with '13a' a Chinese sentence is one "word"; with 'zh' a one-character difference costs little
    prediction, reference = ["床前明月光疑是地上雪"], ["床前明月光疑是地上霜"]
    assert metrics.bleu_chrf(prediction, reference)["bleu"] > metrics.bleu_chrf(prediction, reference, "13a")["bleu"]


def test_perplexity_is_exp_of_the_loss():
    assert metrics.perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert metrics.perplexity(1e6) == float("inf")


def test_bits_per_byte_on_a_byte_level_model_equals_a_direct_computation(tmp_path):
    """eval_bits_per_byte = summed nats / ln 2 / UTF-8 bytes of the predicted tokens' text, separators included."""
    from datasets import Dataset, DatasetDict

    from lmkit.configuration import LmkitConfig
    from lmkit.data import DataArgs, LMDataCollator, build_lm_datasets
    from lmkit.evaluation import token_loss
    from lmkit.modeling import LmkitForCausalLM
    from lmkit.tokenization import TokenizerSpec, load_trained_tokenizer, token_byte_lengths, train_tokenizer

    documents = ["Tea in the café costs 3€ — naïve prices!",
                 "Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich.",
                 "床前明月光，疑是地上霜。 and English after it"]
    train_tokenizer(TokenizerSpec(kind="bpe", vocab_size=300, min_frequency=1, nfkc=False), iter(documents * 20),
                    tmp_path / "tok")
    tokenizer = load_trained_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = LmkitForCausalLM(LmkitConfig(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=256,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    blocks, _ = build_lm_datasets(DatasetDict({"test": Dataset.from_dict({"text": documents})}), tokenizer,
                                  DataArgs(files=["-"], block_size=256), vocab_size=len(tokenizer))
    assert len(blocks["test"]) == 1, "one block: every token but the first is predicted"
    scored = token_loss(model, blocks["test"], LMDataCollator(tokenizer.pad_token_id), token_byte_lengths(tokenizer))

    length = sum(blocks["test"][0]["attention_mask"])  # the one block is the split's last: padded after the text
    ids = torch.tensor([blocks["test"][0]["input_ids"][:length]])
    logits = model(ids).logits[0, :-1].double()
    nats = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    # The text the predicted tokens cover: each document and its end-of-text separator (one byte), less the first
    # token, which is given, not predicted (plain ASCII here, so it decodes on its own).
    first = tokenizer.decode(ids[0, :1])
    assert first and first.isascii()
    n_bytes = sum(len(doc.encode("utf-8")) + 1 for doc in documents) - len(first.encode("utf-8"))
    assert scored["bytes"] == n_bytes
    assert scored["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert metrics.bits_per_byte(nats, n_bytes) == pytest.approx(scored["bits_per_byte"], rel=1e-5)
    assert metrics.bits_per_byte(1.0, 0) is None


def test_token_byte_lengths_of_char_tokens_are_their_utf8_length(tmp_path):
    from lmkit.tokenization import TokenizerSpec, load_trained_tokenizer, token_byte_lengths, train_tokenizer

    train_tokenizer(TokenizerSpec(kind="char", vocab_size=40), iter(["床前明月光 ab", "疑是地上霜 ab"] * 5),
                    tmp_path / "tok")
    tokenizer = load_trained_tokenizer(tmp_path / "tok")
    lengths = token_byte_lengths(tokenizer)
    for char, expected in (("床", 3), ("a", 1), (" ", 1)):
        assert lengths[tokenizer.convert_tokens_to_ids(char)] == expected
    assert lengths[tokenizer.eos_token_id] == 1 and lengths[tokenizer.pad_token_id] == 0
    assert lengths[tokenizer.unk_token_id] == 3, "an unknown token counts as a typical token of the vocabulary"


class CharTokenizer:
    """A stand-in with the tokenizer calls evaluation makes: one id per character, 0 = eos, 1 = pad."""

    pad_token_id, eos_token_id = 1, 0

    def __call__(self, texts, add_special_tokens=False, verbose=True):
        return {"input_ids": [[ord(c) for c in text] for text in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 1)


def test_bleu_pairs_are_a_fixed_seeded_choice():
    texts = [f"{i:03d} is a document " * 3 for i in range(50)] + ["short"]
    args = EvalArgs(bleu_samples=10, prompt_tokens=8, max_new_tokens=5, seed=3)
    pairs = make_bleu_pairs(texts, CharTokenizer(), args)
    assert len(pairs) == 10
    assert pairs == make_bleu_pairs(texts, CharTokenizer(), args), "same seed, same pairs"
    assert pairs != make_bleu_pairs(texts, CharTokenizer(), EvalArgs(bleu_samples=10, prompt_tokens=8,
                                                                      max_new_tokens=5, seed=4))
    for pair in pairs:
        assert len(pair.prompt_ids) == 8 and len(pair.reference_ids) == 5
        text = CharTokenizer().decode(pair.prompt_ids + pair.reference_ids)
        assert any(t.startswith(text) for t in texts), "prompt and reference are consecutive text of one document"


def test_baseline_repeats_the_prompt_tail():
    assert baseline_continuation([1, 2, 3, 4, 5], 2) == [4, 5]
    assert baseline_continuation([1, 2], 5) == [1, 2]


def test_left_padding_aligns_prompt_ends():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=1, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_preserved_rng_state_leaves_global_random_untouched():
    import random

    import numpy as np

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    with preserved_rng_state():
        torch.rand(100), random.random(), np.random.rand(7)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_batched_generation_equals_one_by_one_and_sampling_is_seeded():
    model = tiny_model(vocab_size=300, n_head=2)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    batched = generate_ids(model, prompts, pad_token_id=1, max_new_tokens=6, batch_size=3, eos_token_id=0)
    single = [generate_ids(model, [p], pad_token_id=1, max_new_tokens=6, batch_size=1, eos_token_id=0)[0]
              for p in prompts]
    assert batched == single
    sample = dict(do_sample=True, temperature=1.0, eos_token_id=0)
    first = generate_ids(model, prompts, pad_token_id=1, max_new_tokens=6, seed=5, **sample)
    assert first == generate_ids(model, prompts, pad_token_id=1, max_new_tokens=6, seed=5, **sample)


def test_score_bleu_reports_model_and_baseline():
    model = tiny_model(vocab_size=300, n_head=2)
    texts = ["abcdefghijklmnopqrstuvwxyz" * 2, "the quick brown fox jumps over the lazy dog"]
    args = EvalArgs(bleu_samples=2, prompt_tokens=10, max_new_tokens=6, bleu_tokenize="char")
    scores, rows = score_bleu(model, CharTokenizer(), make_bleu_pairs(texts, CharTokenizer(), args), args)
    assert set(scores) == {"bleu", "chrf", "baseline_bleu", "baseline_chrf"}
    assert len(rows) == 2 and all(set(r) == {"prompt", "reference", "generation"} for r in rows)
    table = samples_markdown(rows, "t")
    assert table.count("\n|") == 4  # header, rule, two rows


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fixtures):
    from lmkit.recipe import load_recipe
    from lmkit.training import train

    base = tmp_path_factory.mktemp("evalrun")
    recipe = base / "r.yaml"
    recipe.write_text(f"""
data: {{files: [{fixtures / 'zh-poetry.jsonl'}], block_size: 64}}
tokenizer: {{train: {{kind: char, vocab_size: 3000, min_frequency: 1}}}}
model: {{n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64, position_embedding_type: rope}}
eval: {{bleu_samples: 6, prompt_tokens: 8, max_new_tokens: 8}}
training: {{output_dir: {base / 'run'}, max_steps: 6, per_device_train_batch_size: 8, report_to: none,
           save_strategy: "no", disable_tqdm: true}}
""")
    train(load_recipe(recipe))
    return base / "run"


def test_lmkit_eval_scores_the_saved_heldout_split(trained_run):
    from lmkit.evaluation import evaluate_model

    report = evaluate_model(str(trained_run), num_samples=4)
    for key in ("eval_loss", "eval_perplexity", "eval_bits_per_byte", "eval_bleu", "eval_chrf", "baseline_bleu"):
        assert key in report
    assert report["bleu_samples"] == 4
    final = json.loads((trained_run / "eval_results.json").read_text())
    # the same held-out text and the same model: perplexity agrees with the Trainer's final evaluation
    assert report["eval_perplexity"] == pytest.approx(final["eval_perplexity"], rel=0.05)
    assert report["eval_bits_per_byte"] == pytest.approx(final["eval_bits_per_byte"], rel=0.05)
    assert json.loads((trained_run / "eval_report.json").read_text())["eval_bleu"] == report["eval_bleu"]
    assert (trained_run / "eval_report_samples.md").read_text().startswith("# Samples")


def test_lmkit_eval_on_another_corpus(trained_run, fixtures, tmp_path):
    from lmkit.evaluation import evaluate_model

    report = evaluate_model(str(trained_run), data=str(fixtures / "zh-quotes.jsonl"), num_samples=3,
                            output=str(tmp_path / "out"))
    assert report["documents"] > 1000
    assert (tmp_path / "out" / "eval_report.json").is_file()


def test_lmkit_generate_streams_a_seeded_continuation(trained_run):
    command = [LMKIT, "generate", str(trained_run), "--prompt", "床前", "--max-new-tokens", "12", "--seed", "3"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith("床前") and len(first.stdout.strip()) > 2
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.stdout == first.stdout, "the same seed gives the same sample"


def test_bleu_tokenizer_is_zh_for_kana_and_hangul_too():
    """What counts as CJK is `lmkit.cjk`'s, as for the tokenizer choice: kana and Hangul count, not only Han."""
    assert metrics.bleu_tokenizer_for(["ひらがなとカタカナ"]) == "zh"
    assert metrics.bleu_tokenizer_for(["안녕하세요 저는 학생입니다"]) == "zh"  # 'zh' splits Hangul as '13a' does
    assert metrics.bleu_tokenizer_for(["123 456 !!!"]) == "13a"  # no letters
