"""Behaviour of the data stage: every input form, each cleaning step, the split, packing/padding, masking, caching and
the one-line errors for bad or damaged input, and giant lines."""

import bz2
import gzip
import json
import math
import os
import random
import re
import string
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, run_cli, tiny_recipe  # tests/ is on sys.path under pytest
from datasets import Dataset, DatasetDict

import lmkit.data
from lmkit.data import (
    DataArgs,
    LMDataCollator,
    build_lm_datasets,
    load_eval_documents,
    load_heldout,
    prepare_splits,
    save_heldout,
    word_tables,
)
from lmkit.data.corpus import MAX_DOCUMENT_CHARS, iter_documents
from lmkit.errors import UserError
from lmkit.run_dir import RunDir
from lmkit.tokenization import TokenizerSpec, train_tokenizer


@pytest.fixture
def tok():
    return char_tokenizer()


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def all_texts(splits: DatasetDict) -> list[str]:
    return [t for name in splits for t in splits[name]["text"]]


def numbered_docs(n: int) -> list[str]:
    return [f"document number {i} says hello" for i in range(n)]


# ---------------------------------------------------------------- reading


def test_text_separators(tmp_path):
    (tmp_path / "lines.txt").write_text("first doc\n\nsecond doc\n  \nthird\n", encoding="utf-8")
    assert list(iter_documents([str(tmp_path / "lines.txt")])) == ["first doc", "second doc", "third"]

    (tmp_path / "blank.txt").write_text("a poem\nline two\n\n\nnext\r\nstill next\n", encoding="utf-8")
    assert list(iter_documents([str(tmp_path / "blank.txt")], doc_separator="blank_line")) == [
        "a poem\nline two", "next\nstill next"]

    # Debian fortune files: documents separated by lines equal to "%", no extension.
    (tmp_path / "fortunes").write_text("Be wise.\n -- someone\n%\nSecond fortune\n%\n", encoding="utf-8")
    assert list(iter_documents([str(tmp_path / "fortunes")], doc_separator="%")) == [
        "Be wise.\n -- someone", "Second fortune"]


def test_structured_and_compressed_formats(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["from jsonl"])
    (tmp_path / "b.json").write_text(json.dumps([{"text": "from json array"}, {"text": "second"}]), encoding="utf-8")
    (tmp_path / "c.csv").write_text('id,text\n1,"from csv, with comma\nand newline"\n', encoding="utf-8")
    Dataset.from_dict({"text": ["from parquet"], "n": [1]}).to_parquet(str(tmp_path / "d.parquet"))
    with gzip.open(tmp_path / "e.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "from gzip"}) + "\n")
    with bz2.open(tmp_path / "f.txt.bz2", "wt", encoding="utf-8") as f:
        f.write("from bz2\n")
    import zstandard

    (tmp_path / "g.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "from zstd"}\n'))
    Dataset.from_dict({"text": ["from save_to_disk"]}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "ignored.dat").write_bytes(b"\x00\x01binary index")  # unknown extensions in folders are skipped

    docs = list(iter_documents([str(tmp_path)]))
    assert sorted(docs) == sorted([
        "from jsonl", "from json array", "second", "from csv, with comma\nand newline", "from parquet", "from gzip",
        "from bz2", "from zstd", "from save_to_disk"])
    # A glob selects a subset, and the order is stable (sorted paths).
    assert list(iter_documents([str(tmp_path / "*.json*")])) == ["from jsonl", "from json array", "second",
                                                                  "from gzip", "from zstd"]


def test_text_field_option(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["in body"], field="body")
    assert list(iter_documents([str(tmp_path / "a.jsonl")], text_field="body")) == ["in body"]


def test_mixed_inputs_through_prepare_splits(tmp_path, cache):
    write_jsonl(tmp_path / "a.jsonl", numbered_docs(30))
    (tmp_path / "b.txt").write_text("\n".join(f"text line {i}" for i in range(30)) + "\n", encoding="utf-8")
    splits, stats = prepare_splits(
        DataArgs(files=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], cache_dir=cache), seed=1)
    assert stats["documents_read"] == 60
    assert sorted(all_texts(splits)) == sorted(numbered_docs(30) + [f"text line {i}" for i in range(30)])


# ---------------------------------------------------------------- cleaning


def test_each_cleaning_step_is_applied_and_counted(tmp_path, cache):
    docs = [
        "\x1b[31mred\x1b[0m text\x07 with\tcontrols",  # ANSI + BEL removed, tab kept
        "ｆｕｌｌ width ﬁ",  # NFKC
        "  indented code\nx  =  1   \n\n\n\nend  ",  # trailing, inner runs, 3+ newlines, strip; indentation kept
        "plain",
        "plain",  # duplicate
        "x",  # too short with min_chars=2
        "y" * 50,  # too long with max_chars=40
        "\x00\x01",  # empty once control characters are gone
    ]
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    splits, stats = prepare_splits(DataArgs(files=[str(path)], min_chars=2, max_chars=40, cache_dir=cache), seed=0)
    assert sorted(all_texts(splits)) == sorted([
        "red text with\tcontrols", "full width fi", "indented code\nx = 1\n\nend", "plain"])
    assert stats["documents_read"] == 8
    assert stats["changed_by"] == {"control": 2, "nfkc": 1, "whitespace": 1}
    assert stats["dropped"] == {"empty": 1, "too_short": 1, "too_long": 1, "duplicate": 1}
    assert stats["documents_kept"] == 4

    # Every step off: the text passes through (only exact duplicates of the raw text would merge, and dedup is off).
    raw_args = DataArgs(files=[str(path)], nfkc=False, strip_control=False, normalize_whitespace=False, dedup=False,
                        min_chars=0, cache_dir=cache)
    splits, stats = prepare_splits(raw_args, seed=0)
    assert sorted(all_texts(splits)) == sorted(docs)
    assert stats["dropped"] == {"empty": 0, "too_short": 0, "too_long": 0, "duplicate": 0}


def test_newlines_of_real_poems_survive(fixtures, cache):
    splits, stats = prepare_splits(DataArgs(files=[str(fixtures / "zh-poetry.jsonl")], cache_dir=cache), seed=3)
    texts = all_texts(splits)
    assert stats["documents_kept"] == len(texts) > 300
    assert sum("\n" in t for t in texts) > 0.9 * len(texts)


# ---------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_seeded(tmp_path, cache):
    path = write_jsonl(tmp_path / "c.jsonl", numbered_docs(2000))
    args = DataArgs(files=[str(path)], validation_size=0.1, cache_dir=cache)
    first, stats = prepare_splits(args, seed=7)
    again, _ = prepare_splits(args, seed=7)
    other_seed, _ = prepare_splits(args, seed=8)
    sets = {name: set(first[name]["text"]) for name in first}
    assert set(first) == {"train", "test", "validation"}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["validation"])
    assert not (sets["test"] & sets["validation"])
    assert sum(map(len, sets.values())) == 2000
    for name in first:
        assert first[name]["text"] == again[name]["text"]
        assert stats["splits"][name]["documents"] == len(first[name])
    assert 140 < len(first["test"]) < 260 and 140 < len(first["validation"]) < 260
    assert set(other_seed["test"]["text"]) != sets["test"]


def test_split_is_stable_when_the_corpus_grows(tmp_path, cache):
    small = write_jsonl(tmp_path / "small.jsonl", numbered_docs(500))
    grown = write_jsonl(tmp_path / "grown.jsonl", numbered_docs(1500)[::-1])  # more documents, another order
    before, _ = prepare_splits(DataArgs(files=[str(small)], cache_dir=cache), seed=0)
    after, _ = prepare_splits(DataArgs(files=[str(grown)], cache_dir=cache), seed=0)
    assert set(before["test"]["text"]) <= set(after["test"]["text"])
    assert set(before["train"]["text"]) <= set(after["train"]["text"])


def test_tiny_corpus_still_gets_a_test_document(tmp_path, cache):
    path = write_jsonl(tmp_path / "c.jsonl", ["one", "two", "three"])
    splits, _ = prepare_splits(DataArgs(files=[str(path)], cache_dir=cache), seed=0)
    assert len(splits["test"]) >= 1 and len(splits["train"]) >= 1


def test_heldout_round_trip(tmp_path, cache):
    path = write_jsonl(tmp_path / "c.jsonl", numbered_docs(100) + ["unicode 诗\nwith newline and \"quotes\""])
    splits, _ = prepare_splits(DataArgs(files=[str(path)], validation_size=0.2, cache_dir=cache), seed=0)
    save_heldout(splits, RunDir(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run" / "heldout").iterdir()) == ["test.jsonl", "validation.jsonl"]
    for name in ("test", "validation"):
        assert load_heldout(RunDir(tmp_path / "run"), name)["text"] == splits[name]["text"]
    with pytest.raises(UserError, match="heldout"):
        load_heldout(RunDir(tmp_path / "nowhere"))


def test_load_eval_documents_cleans_like_training(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", ["a  b  ", "a  b", "\x1b[1mbold\x1b[0m"])
    assert load_eval_documents(str(path))["text"] == ["a b", "bold"]


# ---------------------------------------------------------------- tokenization, packing, padding


def small_splits(tmp_path, cache, n=60, **kwargs):
    path = write_jsonl(tmp_path / "c.jsonl", [f"doc {i}: " + "xy" * (i % 17) for i in range(n)])
    args = DataArgs(files=[str(path)], cache_dir=cache, **kwargs)
    return prepare_splits(args, seed=0)[0], args


def test_packing_keeps_every_token_with_eos_separators(tmp_path, cache, tok):
    splits, args = small_splits(tmp_path, cache, block_size=16)
    lm, stats = build_lm_datasets(splits, tok, args, vocab_size=len(tok))
    for name in splits:
        expected = []
        for text in splits[name]["text"]:
            expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows = lm[name]
        assert all(len(r) == 16 for r in rows["input_ids"])
        stream = [t for ids, mask in zip(rows["input_ids"], rows["attention_mask"]) for t, m in zip(ids, mask) if m]
        assert stream == expected  # nothing dropped, order kept, one EOS after each document
        # Only the very last block is partial; its padding is pad id, mask 0, labels -100.
        assert all(all(m) for m in rows["attention_mask"][:-1])
        last = rows[-1]
        n_real = sum(last["attention_mask"])
        assert n_real == len(expected) - 16 * (len(rows) - 1)
        assert set(last["input_ids"][n_real:]) <= {tok.pad_token_id}
        assert set(last["labels"][n_real:]) <= {-100}
        assert all(ids == labels for ids, labels, mask in zip(rows["input_ids"], rows["labels"],
                                                              rows["attention_mask"]) if all(mask))
        assert stats["splits"][name]["tokens"] == len(expected)
        assert stats["splits"][name]["blocks"] == -(-len(expected) // 16)
        assert stats["splits"][name]["padding_tokens"] == 16 * len(rows) - len(expected)
    assert stats["tokens_dropped"] == 0


def test_packing_across_map_batches_and_processes(tmp_path, cache, tok, monkeypatch):
    """Many map batches and two processes give exactly the blocks of one pass over the whole stream."""
    monkeypatch.setattr(lmkit.data.blocks, "_PACK_BATCH_DOCS", 37)
    splits, args = small_splits(tmp_path, cache, n=1200, block_size=7, num_proc=2)
    lm, stats = build_lm_datasets(splits, tok, args, vocab_size=len(tok))
    expected = []
    for text in splits["train"]["text"]:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = [t for ids in lm["train"]["input_ids"] for t in ids]
    assert flat[:len(expected)] == expected
    assert len(lm["train"]) == -(-len(expected) // 7)
    assert stats["tokens_dropped"] == 0


def test_padding_mode_rows_and_collator(tmp_path, cache, tok):
    splits, args = small_splits(tmp_path, cache, block_size=8, packing=False)
    lm, stats = build_lm_datasets(splits, tok, args, vocab_size=len(tok))
    rows = lm["train"]["input_ids"]
    assert all(1 <= len(r) <= 8 for r in rows)
    # Documents are cut into pieces; re-joining the pieces gives the documents, each ending in EOS.
    joined = [t for r in rows for t in r]
    expected = []
    for text in splits["train"]["text"]:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert joined == expected
    assert stats["splits"]["train"]["tokens_dropped"] == 0

    collator = LMDataCollator(pad_token_id=tok.pad_token_id)
    features = [lm["train"][i] for i in range(4)]
    batch = collator(features)
    width = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, width)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == f["input_ids"]
        assert batch["labels"][row, :n].tolist() == f["input_ids"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == -100).all()


def test_token_ids_beyond_the_model_vocabulary(tmp_path, cache, tok):
    splits, args = small_splits(tmp_path, cache)
    with pytest.raises(UserError, match="vocab_size=10") as info:
        build_lm_datasets(splits, tok, args, vocab_size=10)
    assert "tokenizer" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- masking augmentation


def test_input_masking_statistics_and_no_augmentation():
    collator = LMDataCollator(pad_token_id=1, mask_token_id=2, mask_prob=0.15)
    features = [{"input_ids": list(range(3, 503)), "attention_mask": [1] * 500, "labels": list(range(3, 503))}] * 40
    features[0] = {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]}  # forces padding
    torch.manual_seed(0)
    batch = collator(features)
    masked = batch["input_ids"] == 2
    real = batch["attention_mask"].bool()
    rate = masked[real].float().mean().item()
    assert 0.13 < rate < 0.17
    assert not masked[~real].any()  # padding is never masked
    assert batch["labels"][1].tolist() == list(range(3, 503))  # labels keep the original tokens
    torch.manual_seed(0)
    assert torch.equal(collator(features)["input_ids"], batch["input_ids"])  # seeded by torch's global RNG

    with collator.no_augmentation():
        clean = collator(features)
    assert not (clean["input_ids"] == 2).any()
    assert collator.augment  # restored afterwards
    assert not (LMDataCollator(pad_token_id=1)(features)["input_ids"] == 2).any()


# ---------------------------------------------------------------- word masking

ENGLISH_WORDS = ("the a cat dog bird sat ran flew on under over mat house red blue green quickly slowly and but very "
                 "small large old tree river stone light night morning").split()
CHINESE_CHARS = "我们你他她是的了在有这个人中国大小天地上下山水日月年时好学生说话看书读写字今明去来公园散步花草风雨"
CJK = "\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7a3"
# What the word masking counts as a word: each CJK character, and each run of other non-whitespace characters.
WORD = re.compile(rf"[{CJK}]|[^\s{CJK}]+")


def english_docs(n: int = 40) -> list[str]:
    """Sentences with single and double spaces, newlines and punctuation glued to words."""
    rng, docs = random.Random(0), []
    for _ in range(n):
        text = ""
        for i, word in enumerate(rng.choices(ENGLISH_WORDS, k=rng.randint(5, 14))):
            text += (rng.choice([" ", " ", " ", "  ", ", ", "\n"]) if i else "") + word
        docs.append(text.capitalize() + rng.choice([".", "!", "?"]))
    return docs


def chinese_docs(n: int = 40) -> list[str]:
    """Runs of Han characters with CJK punctuation and the odd Latin word in between."""
    rng, docs = random.Random(1), []
    for _ in range(n):
        chars = rng.choices(CHINESE_CHARS, k=rng.randint(8, 24))
        for _ in range(rng.randint(0, 2)):
            chars.insert(rng.randrange(1, len(chars)), rng.choice(["，", "、", " GPT ", "OK"]))
        docs.append("".join(chars) + "。")
    return docs


@pytest.fixture(scope="module")
def word_tokenizers(tmp_path_factory):
    base = tmp_path_factory.mktemp("word-masking")
    # bpe: small enough that many Han characters are cut into byte tokens, and some tokens hold two characters.
    corpora = {"bpe": (360, english_docs() + chinese_docs()), "char": (500, chinese_docs()),
               "word": (500, english_docs())}
    return {kind: train_tokenizer(TokenizerSpec(kind=kind, vocab_size=size, min_frequency=1, nfkc=False), texts,
                                  base / kind)
            for kind, (size, texts) in corpora.items()}


def word_masking_rows(tokenizer, docs: list[str], copies: int = 10):
    """Documents (with EOS) packed into rows of about 20-48 tokens, so rows cut words and need padding.

    Rows are cut between characters only: bytes cut off a character at the start of a row cannot tell which character
    they belong to (test_word_masking_row_cut_inside_a_character). Returns the features and, per row, each token's
    words as (copy, document, word) keys (empty for EOS and whitespace-only tokens).
    """
    ids, spans, words = [], [], []
    for copy in range(copies):
        for d, doc in enumerate(docs):
            word_spans = [m.span() for m in WORD.finditer(doc)]
            encoding = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
            for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
                ids.append(token)
                spans.append((copy, d, start, end))
                words.append({(copy, d, w) for w, (a, b) in enumerate(word_spans) if a < end and start < b})
            ids.append(tokenizer.eos_token_id)
            spans.append(None)
            words.append(set())
    assert tokenizer.unk_token_id not in ids

    def cuts_a_character(i: int) -> bool:
        before, after = spans[i - 1], spans[i]
        return before is not None and after is not None and before[:2] == after[:2] and after[2] < before[3]

    rng, features, row_words, start = random.Random(2), [], [], 0
    while start < len(ids):
        stop = min(start + rng.randint(20, 48), len(ids))
        while stop < len(ids) and cuts_a_character(stop):
            stop += 1
        features.append({"input_ids": ids[start:stop], "attention_mask": [1] * (stop - start),
                         "labels": ids[start:stop]})
        row_words.append(words[start:stop])
        start = stop
    return features, row_words


@pytest.mark.parametrize("kind, language", [("bpe", "english"), ("bpe", "chinese"), ("char", "chinese"),
                                            ("word", "english")])
def test_word_masking_masks_whole_words(word_tokenizers, kind, language):
    tokenizer = word_tokenizers[kind]
    tables = word_tables(tokenizer)
    features, row_words = word_masking_rows(tokenizer, english_docs() if language == "english" else chinese_docs())
    unk, p = tokenizer.unk_token_id, 0.15
    collator = LMDataCollator(tokenizer.pad_token_id, unk, p, words=tables)
    torch.manual_seed(0)
    batch = collator(features)
    real = batch["attention_mask"].bool()
    masked = batch["input_ids"] == unk
    assert not masked[~real].any()  # padding is never masked

    with collator.no_augmentation():
        word_ids = tables.word_ids(collator(features)["input_ids"])
    units, masked_units, inside_character = [], [], 0  # a word cut by a row boundary is two units
    for row, (feature, words) in enumerate(zip(features, row_words)):
        original = feature["input_ids"]
        assert batch["labels"][row, :len(original)].tolist() == original  # labels keep the original tokens
        unit: set = set()
        for i, token in enumerate(original):
            is_masked = bool(masked[row, i])
            if not words[i]:  # EOS and whitespace-only tokens: never masked, a word of their own
                assert not is_masked and not tables.maskable[token]
                assert i == 0 or word_ids[row, i] != word_ids[row, i - 1]
                continue
            # The tokens of one word (and of words that share a token) form one unit, masked wholly or not at all.
            joined = i > 0 and bool(words[i] & words[i - 1])
            assert (i > 0 and word_ids[row, i] == word_ids[row, i - 1]) == joined, (row, i, original)
            if joined:
                unit |= words[i]
                assert is_masked == bool(masked[row, i - 1])
            else:
                unit = set(words[i])
                units.append(unit)
                masked_units.append(is_masked)
            inside_character += bool(tables.inside[token])
    if kind == "bpe" and language == "chinese":
        assert inside_character > 100  # characters cut into byte tokens were there to keep together
    # Each word is masked with probability p; words that share a token are masked together, which widens the spread.
    n_words = sum(map(len, units))
    share = sum(len(unit) for unit, chosen in zip(units, masked_units) if chosen) / n_words
    std = math.sqrt(p * (1 - p) * sum(len(unit) ** 2 for unit in units)) / n_words
    assert n_words > 2000
    assert abs(share - p) < 4 * std, (share, std)
    if language == "chinese":
        assert sum(map(len, units)) < 1.3 * len(units)  # nearly every character is a word of its own


CHINESE_WORDS = "我们 喜欢 公园 散步 学生 读书 写字 今天 明天 中国 朋友 时间".split()


def test_word_masking_masks_whole_chinese_words_of_the_word_tokenizer(tmp_path):
    """The word tokenizer segments Chinese (jieba): each word is one token, so masking by word masks whole words."""
    rng = random.Random(3)
    docs = ["".join(rng.choices(CHINESE_WORDS, k=rng.randint(4, 10))) + "。" for _ in range(200)]
    tokenizer = train_tokenizer(TokenizerSpec(kind="word", vocab_size=200, min_frequency=1, nfkc=False), docs,
                                tmp_path / "word")
    features = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}
                for ids in (tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs)]
    pieces = {piece for feature in features for piece in tokenizer.convert_ids_to_tokens(feature["input_ids"])}
    assert pieces == {*CHINESE_WORDS, "。"}  # two characters a token: the words, not their characters
    tables = word_tables(tokenizer)
    collator = LMDataCollator(tokenizer.pad_token_id, tokenizer.unk_token_id, 0.3, words=tables)
    torch.manual_seed(0)
    batch = collator(features)
    masked = batch["input_ids"] == tokenizer.unk_token_id
    masked_words = tokenizer.convert_ids_to_tokens(batch["labels"][masked].tolist())
    assert len(masked_words) > 200 and set(masked_words) <= {*CHINESE_WORDS, "。"}  # each mask hides a whole word
    with collator.no_augmentation():
        word_ids = tables.word_ids(collator(features)["input_ids"])
    real = batch["attention_mask"].bool()
    steps = word_ids[:, 1:] - word_ids[:, :-1]
    assert (steps[real[:, 1:]] == 1).all()  # every token a word of its own


def test_word_masking_row_cut_inside_a_character(word_tokenizers):
    """A packed row may begin with the last bytes of a character: they stay one word with what follows them, unless
    that starts a word of its own (which a CJK character does)."""
    tokenizer = word_tokenizers["bpe"]
    tables = word_tables(tokenizer)
    ids = tokenizer("公园散步", add_special_tokens=False)["input_ids"]
    inside = tables.inside[ids].tolist()
    assert any(inside)  # this small tokenizer cuts some of these characters into byte tokens
    first = inside.index(True)
    row = torch.tensor([ids[first:]])
    word_ids = tables.word_ids(row)[0].tolist()
    fragment = next((i for i, flag in enumerate(inside[first:]) if not flag), len(row[0]))
    assert word_ids[:fragment] == [0] * fragment
    if fragment < len(word_ids):  # the next token begins a Han character: a new word
        assert word_ids[fragment] == 1


def test_word_masking_is_seeded_and_off_in_evaluation(word_tokenizers):
    tokenizer = word_tokenizers["bpe"]
    features, _ = word_masking_rows(tokenizer, english_docs() + chinese_docs(), copies=1)
    collator = LMDataCollator(tokenizer.pad_token_id, tokenizer.unk_token_id, 0.3, words=word_tables(tokenizer))
    torch.manual_seed(0)
    first = collator(features)["input_ids"]
    torch.manual_seed(0)
    assert torch.equal(collator(features)["input_ids"], first)  # seeded by torch's global RNG
    assert not torch.equal(collator(features)["input_ids"], first)
    assert (first == tokenizer.unk_token_id).any()

    with collator.no_augmentation():
        clean = collator(features)
    assert not (clean["input_ids"] == tokenizer.unk_token_id).any()
    assert collator.augment  # restored afterwards


# ---------------------------------------------------------------- caching


def test_cache_reuse_and_invalidation(tmp_path, cache, tok):
    splits, args = small_splits(tmp_path, cache, block_size=16)
    lm1, stats1 = build_lm_datasets(splits, tok, args, vocab_size=len(tok))
    assert not stats1["cache_hit"]

    splits2, split_stats2 = prepare_splits(args, seed=0)
    assert split_stats2["read_clean_cache_hit"]
    lm2, stats2 = build_lm_datasets(splits2, tok, args, vocab_size=len(tok))
    assert stats2["cache_hit"]
    assert lm2["train"]._fingerprint == lm1["train"]._fingerprint
    assert lm2["train"]["input_ids"] == lm1["train"]["input_ids"]

    bigger_blocks = DataArgs(**{**args.__dict__, "block_size": 32})
    lm3, stats3 = build_lm_datasets(splits2, tok, bigger_blocks, vocab_size=len(tok))
    assert not stats3["cache_hit"] and len(lm3["train"][0]["input_ids"]) == 32

    other_tok = char_tokenizer(string.printable[::-1])
    _, stats4 = build_lm_datasets(splits2, other_tok, args, vocab_size=len(other_tok))
    assert not stats4["cache_hit"] and stats4["tokenizer_sha256"] != stats1["tokenizer_sha256"]


def test_changed_file_invalidates_the_read_cache(tmp_path, cache):
    path = write_jsonl(tmp_path / "c.jsonl", numbered_docs(20))
    prepare_splits(DataArgs(files=[str(path)], cache_dir=cache), seed=0)
    write_jsonl(path, numbered_docs(25))
    _, stats = prepare_splits(DataArgs(files=[str(path)], cache_dir=cache), seed=0)
    assert not stats["read_clean_cache_hit"] and stats["documents_read"] == 25


# ---------------------------------------------------------------- bad input


def one_line_error(func, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_inputs_give_one_line_errors(tmp_path, cache):
    assert "missing.txt does not exist" in one_line_error(list, iter_documents([str(tmp_path / "missing.txt")]))
    assert "matches no files" in one_line_error(list, iter_documents([str(tmp_path / "*.nothing")]))

    path = write_jsonl(tmp_path / "fields.jsonl", ["x"], field="body")
    message = one_line_error(list, iter_documents([str(path)]))
    assert "'text'" in message and "body" in message and "fields.jsonl:1" in message

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    assert "bad.jsonl:2" in one_line_error(list, iter_documents([str(tmp_path / "bad.jsonl")]))

    (tmp_path / "latin1.txt").write_bytes(b"fine line\ncaf\xe9\n")
    message = one_line_error(list, iter_documents([str(tmp_path / "latin1.txt")]))
    assert "latin1.txt" in message and "byte offset 13" in message
    replaced = list(iter_documents([str(tmp_path / "latin1.txt")], encoding_errors="replace"))
    assert replaced == ["fine line", "caf\ufffd"]

    (tmp_path / "notes.docx").write_bytes(b"PK")
    assert "cannot read" in one_line_error(list, iter_documents([str(tmp_path / "notes.docx")]))

    # The same errors surface from prepare_splits (datasets wraps generator errors; lmkit unwraps them).
    assert "bad.jsonl:2" in one_line_error(prepare_splits, DataArgs(files=[str(tmp_path / "bad.jsonl")],
                                                                    cache_dir=cache), seed=0)
    # ... also when the reading ran in worker processes (two files, num_proc=2), where only a traceback text returns.
    (tmp_path / "two").mkdir()
    write_jsonl(tmp_path / "two" / "a.jsonl", ["fine"])
    (tmp_path / "two" / "b.jsonl").write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    assert "b.jsonl:2" in one_line_error(prepare_splits, DataArgs(files=[str(tmp_path / "two")], num_proc=2,
                                                                  cache_dir=cache), seed=0)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["\x00", "  \x1b[0m "])
    assert "left after cleaning" in one_line_error(prepare_splits, DataArgs(files=[str(empty)], cache_dir=cache),
                                                   seed=0)


@pytest.mark.parametrize("overrides, key", [
    ({"files": []}, "data.files"),
    ({"test_size": 1.5}, "data.test_size"),
    ({"test_size": 0.5, "validation_size": 0.5}, "data.validation_size"),
    ({"block_size": 1}, "data.block_size"),
    ({"mask_prob": 1.0}, "data.mask_prob"),
    ({"mask_unit": "words"}, "data.mask_unit"),
    ({"doc_separator": ""}, "data.doc_separator"),
    ({"encoding_errors": "ignore"}, "data.encoding_errors"),
    ({"max_chars": 0}, "data.max_chars"),
    ({"packing": "yes"}, "data.packing"),
    ({"num_proc": 0}, "data.num_proc"),
])
def test_data_args_validation_names_the_key(overrides, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        DataArgs(**{"files": ["corpus.txt"], **overrides})


# ---- 4. caches are keyed by content ------------------------------------------------------------------------------


def test_read_cache_sees_an_in_place_edit_that_keeps_size_and_mtime(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document number {i} about foxes\n" for i in range(20)))
    before = corpus.stat()
    args = DataArgs(files=[str(corpus)], cache_dir=str(tmp_path / "cache"))
    first, stats = prepare_splits(args, seed=0)
    again, stats_again = prepare_splits(args, seed=0)
    assert stats_again["read_clean_cache_hit"]  # the cache works...
    corpus.write_text(corpus.read_text().replace("foxes", "hares"))  # same length
    os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (corpus.stat().st_size, corpus.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    edited, stats_edited = prepare_splits(args, seed=0)
    assert not stats_edited["read_clean_cache_hit"]  # ...and the edit is seen
    texts = [t for split in edited.values() for t in split["text"]]
    assert len(texts) == 20 and all("hares" in t for t in texts)


# ---- 8. OS errors and damaged inputs: one error line naming the path and the cause, exit 2 --------------------------


def _damaged_corpus(tmp_path: Path, kind: str) -> Path:
    if kind == "truncated_gz":
        path = tmp_path / "corpus.txt.gz"
        text = "".join(f"line {i}: {random.Random(i).random()}\n" for i in range(2000)).encode()
        path.write_bytes(gzip.compress(text)[:len(text) // 4])
    elif kind == "not_gzip":
        path = tmp_path / "corpus.txt.gz"
        path.write_text("plain text, not gzip\n")
    elif kind == "corrupt_parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "corpus.parquet"
        pq.write_table(pa.table({"text": ["one document", "another one"] * 50}), path)
        path.write_bytes(path.read_bytes()[:-40])
    else:
        path = tmp_path / "corpus.jsonl.xz"
        path.write_bytes(b"\xfd7zXZ\x00" + os.urandom(64))
    return path


@pytest.mark.parametrize("kind", ["truncated_gz", "not_gzip", "corrupt_parquet", "damaged_xz"])
def test_damaged_corpus_files_are_one_clear_error(tmp_path, kind):
    path = _damaged_corpus(tmp_path, kind)
    with pytest.raises(UserError, match=f"{path}: cannot read: .*damaged") as caught:
        prepare_splits(DataArgs(files=[str(path)]), seed=0)
    assert "\n" not in str(caught.value)


def test_damaged_corpus_through_the_cli(tmp_path, fixtures):
    path = _damaged_corpus(tmp_path, "truncated_gz")
    recipe = tiny_recipe(tmp_path, fixtures, "run", corpus=path)
    result = run_cli("train", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert str(path) in line and "ended before the end-of-stream marker" in line
    assert not (tmp_path / "run").exists()


# ---- 5. giant lines are split or cut, counted and warned about ----------------------------------------------------


def test_a_giant_line_becomes_documents_of_bounded_size(tmp_path, caplog):
    words = [f"w{i % 997}" for i in range(60_000)]
    line = " ".join(words)  # about 300,000 characters on one line
    corpus = tmp_path / "giant.txt"
    corpus.write_text("a short ordinary line\nanother short line here\n" + line + "\n")
    splits, stats = prepare_splits(DataArgs(files=[str(corpus)], dedup=False), seed=0)
    texts = [t for split in splits.values() for t in split["text"]]
    pieces = [t for t in texts if t.startswith("w") or t[:1].isdigit() or len(t) > 100]
    assert stats["documents_read"] == 3
    assert stats["long_documents_split"] == {"documents": 1, "pieces": len(pieces), "max_document_chars":
                                             MAX_DOCUMENT_CHARS}
    assert len(pieces) == -(-len(line) // MAX_DOCUMENT_CHARS) and max(map(len, pieces)) <= MAX_DOCUMENT_CHARS
    assert sorted(" ".join(pieces).split()) == sorted(words)  # cut at spaces: no word lost or broken
    assert any("giant lines" in r.message for r in caplog.records)


@pytest.mark.parametrize(("name", "where"), [("deep.jsonl", "deep.jsonl:2: "), ("deep.json", "deep.json: ")])
def test_json_nested_deeper_than_the_reader_goes_is_one_clear_error(tmp_path, name, where):
    nested = "[" * 100_000 + "]" * 100_000
    path = tmp_path / name
    path.write_text('{"text": "fine"}\n{"text": ' + nested + "}\n" if name.endswith("l") else nested)
    with pytest.raises(UserError, match="JSON nested too deeply to read") as caught:
        list(iter_documents([str(path)]))
    assert where in str(caught.value)
