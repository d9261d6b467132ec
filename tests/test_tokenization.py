"""Tokenizer training: round trips, special tokens, standalone loading, stats and the user errors."""

import json
import random
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT  # tests/ is on sys.path under pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmkit.errors import UserError
from lmkit.tokenization import (
    TokenizerSpec,
    load_trained_tokenizer,
    tokenizer_stats,
    train_tokenizer,
    train_tokenizer_from_spec,
)

# The autouse cache fixture in conftest is function-scoped; it only sets env vars, so reuse across examples is safe.
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def read_texts(path: Path, limit: int) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for _, line in zip(range(limit), handle)]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def english(fixtures) -> list[str]:
    return read_texts(fixtures / "en-fortunes.jsonl", 600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, english, fixtures):
    """One small tokenizer of each kind, trained once for the module (nfkc off so round trips see the raw text)."""
    chinese = read_texts(fixtures / "zh-quotes.jsonl", 300)
    base = tmp_path_factory.mktemp("tokenizers")
    corpora = {"bpe": english + chinese, "char": english + chinese, "word": english + chinese,
               "unigram": english + chinese}
    sizes = {"bpe": 600, "char": 3000, "word": 5000, "unigram": 3000}
    return {
        kind: train_tokenizer(
            TokenizerSpec(kind=kind, vocab_size=sizes[kind], nfkc=False, extra_special_tokens=["<|user|>"]),
            corpora[kind],
            base / kind,
        )
        for kind in ("bpe", "char", "word", "unigram")
    }


# --- round trips -----------------------------------------------------------------------------------------------------

unicode_text = st.text(
    alphabet=st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S", "Z", "Cc", "Cf", "Co"]), max_size=200
)


@HYPOTHESIS
@given(text=unicode_text)
def test_bpe_round_trips_any_unicode(trained, text):
    tokenizer = trained["bpe"]
    token_ids = ids(tokenizer, text)
    assert tokenizer.decode(token_ids) == text
    assert tokenizer.unk_token_id not in token_ids  # byte-level: nothing is unknown


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\n\n\t \r\n",
        "e\u0301 a\u0308\u0304",
        "中文，日本語のかな 한국어",
        "👩‍👩‍👧 🏳️‍🌈",
        "\x00\x01\x7f\u200b",
        "a" * 100_000,
    ],
    ids=["empty", "space", "whitespace", "combining", "cjk", "emoji-zwj", "control", "long-line"],
)
def test_bpe_round_trips_edge_cases(trained, text):
    tokenizer = trained["bpe"]
    assert tokenizer.decode(ids(tokenizer, text)) == text


def test_bpe_encodes_english_in_fewer_tokens_than_characters(trained, english):
    stats = tokenizer_stats(trained["bpe"], english[:100])
    assert stats["chars_per_token"] > 1.4  # ~340 merges already shorten English by a third
    assert stats["unk_tokens"] == 0 and stats["roundtrip_exact_fraction"] == 1.0


def test_nfkc_and_lowercase_are_applied_when_on(english, tmp_path):
    raw = "ﬁne Ｆｕｌｌ ①"
    plain = train_tokenizer(TokenizerSpec(nfkc=False, vocab_size=300), english[:50], tmp_path / "plain")
    spec = TokenizerSpec(nfkc=True, lowercase=True, vocab_size=300)
    folded = train_tokenizer(spec, english[:50], tmp_path / "folded")
    assert plain.decode(ids(plain, raw)) == raw
    assert folded.decode(ids(folded, raw)) == unicodedata.normalize("NFKC", raw).lower() == "fine full 1"


@HYPOTHESIS
@given(data=st.data())
def test_char_round_trips_covered_text(trained, data):
    tokenizer = trained["char"]
    covered = sorted(token for token in tokenizer.get_vocab() if token not in tokenizer.all_special_tokens)
    text = "".join(data.draw(st.lists(st.sampled_from(covered), max_size=300)))
    token_ids = ids(tokenizer, text)
    assert len(token_ids) == len(text)  # one token per character
    assert tokenizer.decode(token_ids) == text


def test_char_counts_each_uncovered_character_as_one_unknown(trained):
    tokenizer = trained["char"]
    vocab = tokenizer.get_vocab()
    unseen = [c for c in "龘齉靐𠀀ꙮ" if c not in vocab]
    text = "the " + " ".join(unseen) + "\nend"
    token_ids = ids(tokenizer, text)
    assert token_ids.count(tokenizer.unk_token_id) == len(unseen) > 0
    assert tokenizer_stats(tokenizer, [text])["unk_tokens"] == len(unseen)


@HYPOTHESIS
@given(data=st.data())
def test_word_round_trips_covered_text(trained, data):
    tokenizer = trained["word"]
    vocab = tokenizer.get_vocab()
    # Words the vocabulary holds with and without their leading space, glued by separators it covers.
    words = sorted(t for t in vocab if t.isalpha() and " " + t in vocab)
    glue = [
        g for g in [" ", "\n", ", ", ". ", "\n\n", "; ", " (", ") "] if tokenizer.unk_token_id not in ids(tokenizer, g)
    ]
    assert len(words) > 50 and len(glue) >= 4
    pieces = data.draw(st.lists(st.tuples(st.sampled_from(words), st.sampled_from(glue)), min_size=1, max_size=30))
    text = "".join(word + sep for word, sep in pieces)
    token_ids = ids(tokenizer, text)
    assert tokenizer.unk_token_id not in token_ids
    assert tokenizer.decode(token_ids) == text


def test_word_keeps_whitespace_exactly_and_spells_unknown_words(trained):
    tokenizer = trained["word"]
    text = "the man\n\n\tand the  dog"
    assert tokenizer.decode(ids(tokenizer, text)) == text
    # Words out of the vocabulary are spelled from smaller pieces; only a character never seen is unknown.
    token_ids = ids(tokenizer, "the qwzxvkj and the blorptang")
    assert tokenizer.unk_token_id not in token_ids and len(token_ids) > 5
    assert tokenizer.decode(token_ids) == "the qwzxvkj and the blorptang"
    token_ids = ids(tokenizer, "the 龘 and")
    assert token_ids.count(tokenizer.unk_token_id) == 1 and tokenizer.decode(token_ids) == "the <|unk|> and"


def test_word_segments_chinese_into_the_words_jieba_finds(trained, fixtures):
    import jieba

    tokenizer = trained["word"]
    texts = read_texts(fixtures / "zh-quotes.jsonl", 300)
    tokens = [t for text in texts for t in tokenizer.convert_ids_to_tokens(ids(tokenizer, text))]
    cjk_words = [t for t in tokens if len(t) > 1 and all("\u4e00" <= c <= "\u9fff" for c in t)]
    # Words of two or more characters, not one token per character: they hold a good share of the Chinese text.
    cjk_chars = sum(all("\u4e00" <= c <= "\u9fff" for c in t) * len(t) for t in tokens)
    assert sum(map(len, cjk_words)) > 0.3 * cjk_chars, (sum(map(len, cjk_words)), cjk_chars)
    # The tokens of Chinese text are words jieba cuts from that text (the Unigram path takes the likeliest of them).
    cut = {word for text in texts for word in jieba.Tokenizer().lcut(text)}
    assert sum(word in cut for word in cjk_words) > 0.9 * len(cjk_words)
    text = texts[0]
    assert tokenizer.decode(ids(tokenizer, text)) == text


@pytest.mark.parametrize("kind", ["word", "unigram"])
def test_cjk_runs_after_latin_letters_are_still_segmented(trained, kind):
    tokenizer = trained[kind]
    pieces = tokenizer.convert_ids_to_tokens(ids(tokenizer, "GPT中国人"))
    assert not any("T中" in piece for piece in pieces)  # letters and a CJK run never share a pre-token
    assert tokenizer.decode(ids(tokenizer, "GPT中国人")) == "GPT中国人"


@HYPOTHESIS
@given(data=st.data())
def test_unigram_round_trips_covered_text(trained, data):
    tokenizer = trained["unigram"]
    covered = sorted(token for token in tokenizer.get_vocab() if token not in tokenizer.all_special_tokens)
    text = "".join(data.draw(st.lists(st.sampled_from(covered), max_size=60)))
    token_ids = ids(tokenizer, text)
    assert tokenizer.unk_token_id not in token_ids
    assert tokenizer.decode(token_ids) == text


# --- special tokens --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "char", "word", "unigram"])
def test_special_tokens_have_the_first_ids_are_never_split_and_never_added(trained, kind):
    tokenizer = trained[kind]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id == tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|user|>") == 3
    token_ids = ids(tokenizer, "the<|endoftext|>man<|pad|>and<|user|>the")
    assert [i for i in token_ids if i in (0, 1, 3)] == [0, 1, 3]
    plain = tokenizer("the man")["input_ids"]  # default add_special_tokens=True still adds nothing
    assert 0 not in plain and plain == ids(tokenizer, "the man")


# --- saved directory -------------------------------------------------------------------------------------------------

_STANDALONE_LOAD = """
import json, sys
# The editable install puts lmkit's src/ on sys.path through a .pth file, which -I still reads: drop it and refuse
# any lmkit import, so this proves the directory needs transformers alone.
sys.path = [p for p in sys.path if not p.rstrip("/").endswith("/src")]
class NoLmkit:
    def find_spec(self, name, path=None, target=None):
        if name == "lmkit" or name.startswith("lmkit."):
            raise ImportError("lmkit must not be needed")
sys.meta_path.insert(0, NoLmkit())
from transformers import AutoTokenizer
texts, result = json.loads(sys.argv[1]), {}
for kind, path in json.loads(sys.argv[2]).items():
    tok = AutoTokenizer.from_pretrained(path)
    result[kind] = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    result[kind + "_decoded"] = [tok.decode(i) for i in result[kind]]
assert "lmkit" not in sys.modules
print(json.dumps(result))
"""


def test_saved_directory_loads_with_plain_autotokenizer_without_lmkit(trained):
    texts = ["Hello, world!\n\tA fortune: 42 <|endoftext|> 中文 🙂", "the man and the dog<|pad|>"]
    paths = {kind: tok.name_or_path for kind, tok in trained.items()}
    for path in paths.values():
        config = json.loads((Path(path) / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert config["model_max_length"] == 1024
    completed = subprocess.run(
        [sys.executable, "-I", "-c", textwrap.dedent(_STANDALONE_LOAD), json.dumps(texts), json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    for kind, path in paths.items():
        reloaded = load_trained_tokenizer(path)
        assert result[kind] == [ids(reloaded, t) for t in texts]
        assert result[kind + "_decoded"] == [reloaded.decode(ids(reloaded, t)) for t in texts]
    assert result["bpe_decoded"] == texts


def test_load_tokenizer_rejects_missing_and_broken_directories(tmp_path):
    with pytest.raises(UserError, match="not a tokenizer directory"):
        load_trained_tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load the tokenizer"):
        load_trained_tokenizer(tmp_path)


# --- standalone specs and stats --------------------------------------------------------------------------------------


def test_zh_poetry_char_tokenizer_reports_heldout_unknown_rate(fixtures, tmp_path):
    output = tmp_path / "char-zh"
    spec = TokenizerSpec(
        kind="char",
        vocab_size=5000,
        min_frequency=1,
        files=[str(fixtures / "zh-poetry.jsonl")],
        output_dir=str(output),
        heldout_fraction=0.2,
    )
    assert train_tokenizer_from_spec(spec) == output
    stats = json.loads((output / "tokenizer_stats.json").read_text())
    total_docs = len((fixtures / "zh-poetry.jsonl").read_text(encoding="utf-8").splitlines())
    assert stats["kind"] == "char" and stats["stats_measured_on"] == "heldout"
    assert stats["heldout_docs"] > 0 and stats["corpus_docs"] + stats["heldout_docs"] == total_docs
    # Poems use rare characters: some held-out ones were never seen in training, and the rate says how many.
    assert 0 < stats["unk_rate"] < 0.2
    assert stats["heldout_unk_tokens"] == round(stats["unk_rate"] * stats["heldout_tokens"])
    assert stats["vocab_size"] == len(load_trained_tokenizer(output)) <= 5000


def test_char_coverage_keeps_only_the_frequent_characters(english, tmp_path):
    full = train_tokenizer(TokenizerSpec(kind="char", vocab_size=500, min_frequency=1), english, tmp_path / "full")
    spec = TokenizerSpec(kind="char", vocab_size=500, min_frequency=1, coverage=0.99)
    partial = train_tokenizer(spec, english, tmp_path / "partial")
    stats = json.loads((tmp_path / "partial" / "tokenizer_stats.json").read_text())
    assert len(partial) < len(full)
    assert stats["training_char_coverage"] >= 0.99


@pytest.mark.parametrize("kind", ["bpe", "char", "word", "unigram"])
def test_training_is_reproducible(english, fixtures, tmp_path, kind):
    spec = TokenizerSpec(kind=kind, vocab_size=3000)
    texts = english[:300] + read_texts(fixtures / "zh-quotes.jsonl", 100)
    train_tokenizer(spec, texts, tmp_path / "first")
    train_tokenizer(spec, texts, tmp_path / "second")
    first, second = (json.loads((tmp_path / run / "tokenizer.json").read_text()) for run in ("first", "second"))
    if kind == "unigram":  # the tokenizers trainer's EM is order-dependent: the same pieces, scores ~0.02 apart
        pieces = [{piece for piece, _ in model["model"].pop("vocab")} for model in (first, second)]
        assert pieces[0] == pieces[1]
    assert first == second


def test_max_chars_caps_an_endless_stream(tmp_path):
    def endless():
        while True:
            yield "all work and no play makes jack a dull boy\n"

    train_tokenizer(TokenizerSpec(vocab_size=300, max_chars=20_000), endless(), tmp_path / "tok")
    stats = json.loads((tmp_path / "tok" / "tokenizer_stats.json").read_text())
    assert stats["corpus_chars"] == 20_000
    assert stats["stats_measured_on"].startswith("training text")


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "tokenizer_training").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate_and_train(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # spec paths are relative to where lmkit runs: the repository root
    raw = yaml.safe_load(path.read_text())
    spec = TokenizerSpec(**{**raw, "output_dir": str(tmp_path / "out"), "max_chars": 200_000})
    train_tokenizer_from_spec(spec)
    stats = json.loads((tmp_path / "out" / "tokenizer_stats.json").read_text())
    assert stats["kind"] == raw["kind"] and stats["heldout_docs"] > 0


# --- bad input -------------------------------------------------------------------------------------------------------


def test_unigram_vocabulary_smaller_than_the_alphabet_is_a_user_error(fixtures, tmp_path):
    texts = read_texts(fixtures / "zh-quotes.jsonl", 100)
    with pytest.raises(UserError, match="vocab_size 300 is too small for kind unigram"):
        train_tokenizer(TokenizerSpec(kind="unigram", vocab_size=300), texts, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("texts", [[], ["", "  ", "\n\t\n"]], ids=["empty", "whitespace"])
def test_empty_corpus_is_a_user_error_and_writes_nothing(tmp_path, texts):
    with pytest.raises(UserError, match="empty or whitespace only"):
        train_tokenizer(TokenizerSpec(kind="char", vocab_size=100), texts, tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "bpe", "vocab_size": 258}, "at least 259"),
        ({"kind": "bpe", "vocab_size": 259, "extra_special_tokens": ["<a>"]}, "at least 260"),
        ({"kind": "char", "vocab_size": 3}, "at least 4"),
        ({"kind": "sentencepiece"}, "kind must be one of"),
        ({"kind": "bpe", "coverage": 0.99}, "coverage applies to kind 'char' only"),
        ({"kind": "char", "coverage": 1.5}, r"coverage must be in \(0, 1\]"),
        ({"extra_special_tokens": ["<|pad|>"]}, "must not repeat"),
        ({"max_chars": 0}, "max_chars"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
    ],
)
def test_bad_spec_values_are_user_errors_naming_the_key(kwargs, message):
    with pytest.raises(UserError, match=message):
        TokenizerSpec(**kwargs)


def test_smallest_valid_bpe_vocabulary_trains(english, tmp_path):
    tokenizer = train_tokenizer(TokenizerSpec(kind="bpe", vocab_size=259), english[:20], tmp_path / "tok")
    assert len(tokenizer) == 259


def test_output_dir_holding_something_else_is_refused_and_left_alone(english, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds other files"):
        train_tokenizer(TokenizerSpec(vocab_size=300), english[:20], taken)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_retraining_replaces_a_previous_tokenizer(english, tmp_path):
    target = tmp_path / "tok"
    train_tokenizer(TokenizerSpec(vocab_size=300), english[:20], target)
    train_tokenizer(TokenizerSpec(vocab_size=400), english[:200], target)
    assert json.loads((target / "tokenizer_stats.json").read_text())["requested_vocab_size"] == 400
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary siblings left behind


def test_a_failure_while_reading_leaves_nothing_behind(english, tmp_path):
    def breaks_midway():
        yield from english[:50]
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        train_tokenizer(TokenizerSpec(vocab_size=300), breaks_midway(), tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []


def test_standalone_spec_needs_files_and_output_dir(tmp_path):
    with pytest.raises(UserError, match="files is required"):
        train_tokenizer_from_spec(TokenizerSpec(output_dir=str(tmp_path / "tok")))
    with pytest.raises(UserError, match="output_dir is required"):
        train_tokenizer_from_spec(TokenizerSpec(files=["x.jsonl"]))
    with pytest.raises(UserError, match="missing.jsonl"):
        train_tokenizer_from_spec(
            TokenizerSpec(files=[str(tmp_path / "missing.jsonl")], output_dir=str(tmp_path / "t"))
        )


# ---- 5. giant lines are split or cut, counted and warned about ----------------------------------------------------


def test_tokenizer_training_cuts_giant_words(tmp_path, caplog):
    from lmkit.data.corpus import MAX_WORD_CHARS

    rng = random.Random(0)
    blob = "".join(rng.choice("abcdefghij") for _ in range(300_000))  # one "word": BPE training took 26 s on it
    texts = ["an ordinary sentence of words", blob, "another ordinary sentence"]
    tokenizer = train_tokenizer(TokenizerSpec(kind="bpe", vocab_size=400, min_frequency=2), iter(texts),
                                tmp_path / "tok")
    stats = json.loads((tmp_path / "tok" / "tokenizer_stats.json").read_text())
    assert stats["corpus_documents_split"] == 1 and stats["corpus_words_cut"] == 3  # 3 pieces, each one word
    assert any("giant lines" in r.message for r in caplog.records)
    sample = blob[:5 * MAX_WORD_CHARS]
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample  # encoding a long word still round-trips

