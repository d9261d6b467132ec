"""lmkit.exporting: every position type becomes a stock transformers model with the same logits and generations."""

import json
import os
import random
import subprocess
import sys
import sysconfig
import textwrap
import time

import pytest
import torch
from conftest import KILLS, kill_after, make_source, tiny_model  # tests/ is on sys.path under pytest
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lmkit import hub
from lmkit.cli import main
from lmkit.errors import UserError
from lmkit.exporting import _per_head_qkv, export_model
from lmkit.modeling import LmkitForCausalLM, scaled_sinusoidal_table

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "and", "then", "slept", "barked"]
PROMPTS = ["the cat sat on", "a dog", "the dog ran under the log and"]
KINDS = ["learned", "sinusoidal", "rope"]
STOCK_CLASS = {"learned": "GPT2LMHeadModel", "sinusoidal": "GPT2LMHeadModel", "rope": "GPTNeoXForCausalLM"}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|pad|>", "<|unk|>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>",
        unk_token="<|unk|>",
    )  # fmt: skip


def save_run(directory, position_embedding_type="learned", **overrides):
    """An lmkit run directory as training.py leaves it: model + tokenizer files."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(
        position_embedding_type, vocab_size=len(tokenizer), n_positions=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides,
    )  # fmt: skip
    # Larger-than-init biases and LayerNorm parameters, so that a misplaced one shows in the logits.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(str(directory))
    return model, tokenizer


def left_padded(tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return batch, (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("kind", KINDS)
def test_each_position_type_exports_to_its_stock_architecture_exactly(tmp_path, kind):
    model, tokenizer = save_run(tmp_path / "run", kind)
    out = export_model(tmp_path / "run", tmp_path / "export")

    assert out == tmp_path / "export"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert not list(tmp_path.glob(".export.tmp-*"))  # the staging directory was renamed, not left behind
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [STOCK_CLASS[kind]]

    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(stock).__name__ == STOCK_CLASS[kind]
    assert AutoTokenizer.from_pretrained(out)(PROMPTS[0]).input_ids == tokenizer(PROMPTS[0]).input_ids
    batch, position_ids = left_padded(tokenizer)
    real = batch.attention_mask.bool()
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = stock(**batch, position_ids=position_ids).logits
    torch.testing.assert_close(theirs[real], ours[real], rtol=0, atol=1e-5)
    assert torch.equal(
        stock.generate(**batch, max_new_tokens=10, do_sample=False),
        model.generate(**batch, max_new_tokens=10, do_sample=False),
    )


def test_transformers_runs_the_exports_bit_identically(tmp_path):
    """Not just within 1e-5: the export names the activation by the kernel lmkit runs (README, lmkit.exporting)."""
    for kind in KINDS:
        model, tokenizer = save_run(tmp_path / kind, kind)
        stock = AutoModelForCausalLM.from_pretrained(export_model(tmp_path / kind, tmp_path / f"{kind}-out")).eval()
        batch, position_ids = left_padded(tokenizer)
        real = batch.attention_mask.bool()
        with torch.no_grad():
            expected = model(**batch).logits[real]
            assert torch.equal(stock(**batch, position_ids=position_ids).logits[real], expected), kind


def test_sinusoidal_export_holds_lmkits_scaled_table_as_wpe(tmp_path):
    model, _ = save_run(tmp_path / "run", "sinusoidal")
    out = export_model(tmp_path / "run", tmp_path / "gpt2", format="gpt2")
    with safe_open(out / "model.safetensors", "pt") as weights:
        wpe = weights.get_tensor("transformer.wpe.weight")
    assert torch.equal(wpe, scaled_sinusoidal_table(model.config))
    assert torch.equal(wpe, model.transformer.wpe_table)


def test_rope_export_is_sequential_full_head_rotary_neox(tmp_path):
    save_run(tmp_path / "run", "rope", rope_theta=500.0)
    export_dir = export_model(tmp_path / "run", tmp_path / "neox", format="gpt-neox")
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["use_parallel_residual"] is False
    # Both spellings of "rotary on the whole head" and of the base: they are read by different tools.
    assert config["rotary_pct"] == 1.0 and config["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert config["rope_parameters"]["rope_theta"] == config["rotary_emb_base"] == config["rope_theta"] == 500.0
    # lmkit's gelu_new is torch's tanh GELU, which transformers names gelu_pytorch_tanh (its gelu_new rounds otherwise)
    assert config["hidden_act"] == "gelu_pytorch_tanh" and config["attention_bias"] is True
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "neox")
    assert all(layer.attention.rotary_ndims == 8 for layer in stock.gpt_neox.layers)  # head_dim = 32 / 4


@pytest.mark.parametrize("activation", ["relu", "relu2"])
@pytest.mark.parametrize("kind", KINDS)
def test_export_honours_an_untied_head_and_other_settings(tmp_path, kind, activation):
    model, tokenizer = save_run(
        tmp_path / "run", kind, tie_word_embeddings=False, n_inner=48, activation_function=activation,
        layer_norm_epsilon=1e-3, rope_theta=123.0,
    )  # fmt: skip
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    out = export_model(tmp_path / "run", tmp_path / "export")
    head, embedding = ("embed_out", "gpt_neox.embed_in") if kind == "rope" else ("lm_head", "transformer.wte")
    with safe_open(out / "model.safetensors", "pt") as weights:  # each architecture's own name for its head
        assert {f"{head}.weight", f"{embedding}.weight"} <= set(weights.keys())
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert stock.config.tie_word_embeddings is False
    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_qkv_rows_are_regrouped_per_head():
    n_head, head_dim, width = 2, 3, 1
    rows = torch.arange(3 * n_head * head_dim, dtype=torch.float32)[:, None].expand(-1, width)
    # lmkit rows: q0 q1 | k0 k1 | v0 v1 (each head_dim rows); GPT-NeoX: q0 k0 v0 | q1 k1 v1.
    expected = torch.tensor([0, 1, 2, 6, 7, 8, 12, 13, 14, 3, 4, 5, 9, 10, 11, 15, 16, 17], dtype=torch.float32)
    assert torch.equal(_per_head_qkv(rows, n_head)[:, 0], expected)
    assert torch.equal(_per_head_qkv(rows[:, 0], n_head), expected)  # the bias


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_gpt2_export_round_trips_through_from_gpt2(tmp_path, kind):
    model, tokenizer = save_run(tmp_path / "run", kind)
    back = LmkitForCausalLM.from_gpt2(export_model(tmp_path / "run", tmp_path / "gpt2")).eval()
    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_rope_export_reads_back_into_lmkit_and_lmkit_commands_take_it(tmp_path, capsys):
    model, tokenizer = save_run(tmp_path / "run", "rope", tie_word_embeddings=False, rope_theta=321.0)
    out = export_model(tmp_path / "run", tmp_path / "neox")
    back = hub.load_model(str(out))  # what lmkit generate / eval / fine-tuning use
    assert type(back) is LmkitForCausalLM and back.config.position_embedding_type == "rope"
    assert back.config.rope_theta == 321.0 and not back.config.tie_word_embeddings
    batch, _ = left_padded(tokenizer)
    real = batch.attention_mask.bool()
    with torch.no_grad():
        assert torch.equal(back(**batch).logits[real], model(**batch).logits[real])
    assert main(["generate", str(out), "--prompt", "the cat", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the cat")


def test_gpt_neox_options_lmkit_does_not_compute_are_refused_by_name(tmp_path):
    save_run(tmp_path / "run", "rope")
    out = export_model(tmp_path / "run", tmp_path / "neox")
    config = json.loads((out / "config.json").read_text())
    for key, value in (("use_parallel_residual", True), ("hidden_act", "gelu_fast")):
        (out / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(UserError, match=f"GPT-NeoX {key} = {value!r} has no lmkit equivalent"):
            hub.load_model(str(out))
    partial = {**config, "rope_parameters": {**config["rope_parameters"], "partial_rotary_factor": 0.25}}
    (out / "config.json").write_text(json.dumps(partial))
    with pytest.raises(UserError, match="partial_rotary_factor = 0.25"):
        hub.load_model(str(out))
    # A model type lmkit does not run is refused instead of loaded with random weights.
    (out / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(UserError, match="model_type must be lmkit, gpt2 or gpt_neox, got 'llama'"):
        hub.load_model(str(out))


def clean_python_path() -> list[str]:
    """site-packages without lmkit's editable install (a .pth file, which only `site` processes)."""
    return [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]


PLAIN_TRANSFORMERS = """
import json, sys
sys.path.extend({paths!r})
sys.modules["lmkit"] = None  # and should some path still hold it, importing it fails
try:
    import lmkit
except ImportError:
    pass
else:
    raise SystemExit("lmkit is importable: this is not a clean python")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
report = {{}}
for kind, path in {exports!r}.items():
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    batch = tokenizer({prompts!r}, return_tensors="pt", padding=True)
    # transformers counts positions from the left edge unless told: count them over real tokens, as lmkit does.
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(**batch, position_ids=position_ids).logits
    generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
    report[kind] = {{"class": type(model).__name__, "logits": logits.tolist(),
                    "new_tokens": generated[:, batch.input_ids.shape[1]:].tolist()}}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_every_export_loads_in_a_python_where_lmkit_cannot_be_imported(tmp_path):
    runs = {kind: save_run(tmp_path / kind, kind) for kind in KINDS}
    exports = {kind: str(export_model(tmp_path / kind, tmp_path / f"{kind}-export")) for kind in KINDS}
    script = PLAIN_TRANSFORMERS.format(paths=clean_python_path(), exports=exports, prompts=PROMPTS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -I: ignore PYTHON* variables and the user site; -S: no site module, so no .pth (editable lmkit) is processed.
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", textwrap.dedent(script)], check=False, cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    for kind, (model, tokenizer) in runs.items():
        assert report[kind]["class"] == STOCK_CLASS[kind]
        batch, _ = left_padded(tokenizer)
        real = batch.attention_mask.bool()
        with torch.no_grad():
            ours = model(**batch).logits
        torch.testing.assert_close(torch.tensor(report[kind]["logits"])[real], ours[real], rtol=0, atol=1e-5)
        generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
        assert report[kind]["new_tokens"] == generated[:, batch.input_ids.shape[1] :].tolist(), kind


@pytest.mark.parametrize(("kind", "wrong"), [("learned", "gpt-neox"), ("sinusoidal", "gpt-neox"), ("rope", "gpt2")])
def test_a_format_that_does_not_fit_the_positions_is_refused(tmp_path, kind, wrong):
    save_run(tmp_path / "run", kind)
    with pytest.raises(UserError, match=f"position_embedding_type '{kind}' exports as") as excinfo:
        export_model(tmp_path / "run", tmp_path / "out", format=wrong)
    assert "\n" not in str(excinfo.value) and "--format auto" in str(excinfo.value)
    with pytest.raises(UserError, match="export format must be one of auto, gpt2, gpt-neox, got 'onnx'"):
        export_model(tmp_path / "run", tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()


def test_a_mis_conversion_is_caught_before_anything_is_written(tmp_path, monkeypatch):
    import lmkit.exporting

    save_run(tmp_path / "run", "rope")
    # GPT-2's layout, unconverted
    monkeypatch.setattr(lmkit.exporting, "_per_head_qkv", lambda tensor, n_head, inverse=False: tensor)
    with pytest.raises(RuntimeError, match="GPTNeoXForCausalLM conversion changed the logits"):
        export_model(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_rope_without_attention_scaling_cannot_be_exported_and_says_why(tmp_path):
    save_run(tmp_path / "run", "rope", scale_attn_weights=False)
    with pytest.raises(UserError, match="scale_attn_weights is false, but GPT-NeoX always scales"):
        export_model(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_output_dir_and_leaves_it_alone(tmp_path):
    save_run(tmp_path / "run")
    target = tmp_path / "gpt2"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_model(tmp_path / "run", target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_model(tmp_path / "run", empty) / "model.safetensors").is_file()


def test_export_rejects_directories_that_are_not_lmkit_models(tmp_path):
    with pytest.raises(UserError, match="not a model directory"):
        export_model(tmp_path / "missing", tmp_path / "out")
    model, _ = save_run(tmp_path / "run")
    model.to_gpt2().save_pretrained(tmp_path / "already-gpt2")
    with pytest.raises(UserError, match="model_type must be 'lmkit'"):
        export_model(tmp_path / "already-gpt2", tmp_path / "out")
    (tmp_path / "run" / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json"):
        export_model(tmp_path / "run", tmp_path / "out")
    config_path = tmp_path / "run" / "config.json"
    config_path.write_text(config_path.read_text().replace('"learned"', '"alibi"'))
    with pytest.raises(UserError, match=r"config.json: model.position_embedding_type must be one of .*'alibi'"):
        export_model(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_picks_the_format_and_reports_mistakes_in_one_line(tmp_path, capsys):
    save_run(tmp_path / "run", "rope")
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "neox")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "neox")
    assert json.loads((tmp_path / "neox" / "config.json").read_text())["model_type"] == "gpt_neox"

    assert main(["export", str(tmp_path / "run"), "--format", "gpt2", "--output", str(tmp_path / "gpt2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "exports as 'gpt-neox', not 'gpt2'" in err
    assert not (tmp_path / "gpt2").exists()


# ---- fault injection: SIGKILL at random points of an export ---------------------------------------------------------


def _export_child(model, output):
    export_model(model, output)


def test_export_killed_at_random_points_leaves_nothing_or_a_complete_export(tmp_path):
    from transformers import GPT2LMHeadModel

    source = make_source(tmp_path / "run", "learned")
    started = time.monotonic()
    _export_child(source, tmp_path / "timed")
    duration = time.monotonic() - started
    rng = random.Random(12)
    for i in range(KILLS):
        output = tmp_path / f"export-{i}"
        delay = rng.uniform(0, duration * 1.2)
        kill_after(_export_child, (source, output), delay)
        if output.exists():  # all or nothing: a complete export loads
            GPT2LMHeadModel.from_pretrained(output)
            assert (output / "tokenizer.json").is_file(), delay
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f"export-{i}")] in ([], [f"export-{i}"])
