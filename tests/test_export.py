"""export_gpt2: a learned-position lmkit model becomes a GPT-2 directory that plain transformers loads."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerFast

from lmkit.configuration import LmkitConfig
from lmkit.errors import UserError
from lmkit.export import export_gpt2
from lmkit.modeling import LmkitForCausalLM

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "and", "then", "slept", "barked"]
PROMPTS = ["the cat sat on", "a dog", "the dog ran under the log and"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|pad|>", "<|unk|>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>",
        unk_token="<|unk|>",
    )  # fmt: skip


def save_run(directory, position_embedding_type="learned"):
    """An lmkit run directory as training.py leaves it: model + tokenizer files."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LmkitConfig(
        vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, position_embedding_type=position_embedding_type,
    )  # fmt: skip
    model = LmkitForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(str(directory))
    return model, tokenizer


def test_export_loads_as_gpt2_with_identical_outputs(tmp_path):
    model, tokenizer = save_run(tmp_path / "run")
    out = export_gpt2(tmp_path / "run", tmp_path / "gpt2")

    assert out == tmp_path / "gpt2"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert not list(tmp_path.glob(".gpt2.tmp-*"))  # the staging directory was renamed, not left behind

    gpt2 = GPT2LMHeadModel.from_pretrained(out).eval()
    exported_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    assert exported_tokenizer(PROMPTS[0]).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(gpt2(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert torch.equal(
        gpt2.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id),
        model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id),
    )


def test_export_round_trips_through_from_gpt2(tmp_path):
    model, tokenizer = save_run(tmp_path / "run")
    back = LmkitForCausalLM.from_gpt2(export_gpt2(tmp_path / "run", tmp_path / "gpt2")).eval()
    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def clean_python_path() -> list[str]:
    """site-packages without lmkit's editable install (a .pth file, which only `site` processes)."""
    return [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]


def test_export_loads_in_a_python_without_lmkit(tmp_path):
    model, tokenizer = save_run(tmp_path / "run")
    out = export_gpt2(tmp_path / "run", tmp_path / "gpt2")
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.extend({clean_python_path()!r})
        try:
            import lmkit
        except ImportError:
            pass
        else:
            raise SystemExit("lmkit is importable: this is not a clean python")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        tokenizer.padding_side = "left"
        batch = tokenizer({PROMPTS!r}, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(tokenizer({PROMPTS[0]!r}, return_tensors="pt").input_ids).logits
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
        print(json.dumps({{"class": type(model).__name__, "logits": logits[0].tolist(),
                          "new_tokens": generated[:, batch.input_ids.shape[1]:].tolist()}}))
        """
    )
    # -I: ignore PYTHON* variables and the user site; -S: no site module, so no .pth (editable lmkit) is processed.
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], check=False, cwd=tmp_path, env=dict(os.environ),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == "GPT2LMHeadModel"

    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(report["logits"]), model(ids).logits[0], rtol=0, atol=1e-5)
    ours = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert report["new_tokens"] == ours[:, batch.input_ids.shape[1] :].tolist()


@pytest.mark.parametrize("kind", ["sinusoidal", "rope"])
def test_export_refuses_positions_gpt2_does_not_have(tmp_path, kind):
    save_run(tmp_path / "run", position_embedding_type=kind)
    with pytest.raises(UserError, match="position_embedding_type") as excinfo:
        export_gpt2(tmp_path / "run", tmp_path / "gpt2")
    assert "\n" not in str(excinfo.value)
    assert not (tmp_path / "gpt2").exists()


def test_export_refuses_a_non_empty_output_dir_and_leaves_it_alone(tmp_path):
    save_run(tmp_path / "run")
    target = tmp_path / "gpt2"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_gpt2(tmp_path / "run", target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_gpt2(tmp_path / "run", empty) / "model.safetensors").is_file()


def test_export_rejects_directories_that_are_not_lmkit_models(tmp_path):
    with pytest.raises(UserError, match="not a model directory"):
        export_gpt2(tmp_path / "missing", tmp_path / "out")
    model, _ = save_run(tmp_path / "run")
    model.to_gpt2().save_pretrained(tmp_path / "already-gpt2")
    with pytest.raises(UserError, match="model_type must be 'lmkit'"):
        export_gpt2(tmp_path / "already-gpt2", tmp_path / "out")
    (tmp_path / "run" / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json"):
        export_gpt2(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()
