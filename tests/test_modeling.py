"""LmkitConfig / LmkitForCausalLM: validation, HF contracts (save/load, Auto*, cache, padding, loss), parity."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import EOS, PAD, tiny_config, tiny_model  # tests/ is on sys.path under pytest
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import lmkit
from lmkit.configuration import (
    ACTIVATION_FUNCTIONS,
    POSITION_EMBEDDING_TYPES,
    LmkitConfig,
)
from lmkit.errors import UserError
from lmkit.modeling import ACTIVATIONS, ChunkedCrossEntropy, LmkitForCausalLM

POSITION_TYPES = list(POSITION_EMBEDDING_TYPES)


def random_ids(batch: int, length: int, seed: int = 1, vocab: int = 97) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=generator)  # no pad/eos inside prompts


# ---- config ----


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"n_embd": 30, "n_head": 4}, "model.n_embd"),
        ({"position_embedding_type": "alibi"}, "model.position_embedding_type"),
        ({"n_embd": 24, "n_head": 8, "position_embedding_type": "rope"}, "model.n_head"),  # head dim 3 is odd
        ({"activation_function": "tanh"}, "model.activation_function"),
        ({"n_layer": 0}, "model.n_layer"),
        ({"n_layer": True}, "model.n_layer"),
        ({"attn_pdrop": 1.0}, "model.attn_pdrop"),
        ({"pad_token_id": 97}, "model.pad_token_id"),
        ({"rope_theta": -1.0}, "model.rope_theta"),
        ({"scale_attn_by_inverse_layer_idx": True}, "model.scale_attn_by_inverse_layer_idx"),
    ],
)
def test_config_rejects_inconsistent_values_naming_the_key(overrides, key):
    with pytest.raises(UserError) as excinfo:
        tiny_config(**overrides)
    message = str(excinfo.value)
    assert key in message and "\n" not in message


def test_config_is_gpt2_compatible_and_round_trips(tmp_path):
    config = tiny_config(position_embedding_type="rope", rope_theta=500.0, n_inner=48)
    assert config.model_type == "lmkit"
    assert config.attribute_map == GPT2Config.attribute_map
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 4)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LmkitConfig)
    assert {k: getattr(loaded, k) for k in LmkitConfig.architecture_keys()} == {
        k: getattr(config, k) for k in LmkitConfig.architecture_keys()
    }
    gpt2_fields = set(GPT2Config.__annotations__)
    assert set(LmkitConfig.architecture_keys()) - gpt2_fields == {"position_embedding_type", "rope_theta",
                                                                   "zero_init_projections"}


def test_configuration_module_does_not_import_torch():
    source = Path(lmkit.configuration.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported


def test_every_accepted_activation_is_implemented():
    assert set(ACTIVATION_FUNCTIONS) == set(ACTIVATIONS)


# ---- model contracts ----


def test_gpt2_initialisation_scales_residual_projections():
    model = tiny_model(n_embd=128, n_layer=8, n_head=4, initializer_range=0.02)
    block = model.transformer.h[3]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0) and torch.all(block.ln_1.weight == 1)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_sinusoidal_positions_are_a_fixed_buffer_not_a_weight():
    model = tiny_model("sinusoidal")
    names = {name for name, _ in model.named_parameters()}
    assert not any("wpe" in name for name in names)
    assert not any("wpe" in key for key in model.state_dict())
    table = model.transformer.wpe_table
    assert table.shape == (64, 32)
    # PE(pos, 0) = sin(pos), PE(pos, 1) = cos(pos): the lowest-index pair has frequency 1; the table is scaled to the
    # token embeddings' initializer_range.
    scale = model.config.initializer_range
    assert torch.allclose(table[:, 0], scale * torch.sin(torch.arange(64.0)), atol=1e-7)
    assert torch.allclose(table[:, 1], scale * torch.cos(torch.arange(64.0)), atol=1e-7)
    angle = 10 / 10000 ** (30 / 32)  # position 10, last pair (2i = 30 of d = 32)
    assert torch.allclose(table[10, -2:], scale * torch.tensor([math.sin(angle), math.cos(angle)]), atol=1e-7)


def test_rope_model_has_no_position_embedding_and_depends_on_order():
    model = tiny_model("rope")
    assert not hasattr(model.transformer, "wpe") and not hasattr(model.transformer, "wpe_table")
    ids = random_ids(1, 12)
    swapped = ids[:, [1, 0, *range(2, 12)]]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits[0, -1], model(swapped).logits[0, -1], atol=1e-5)


@pytest.mark.parametrize("kind", POSITION_TYPES)
def test_save_load_round_trip_is_safetensors_and_exact(tmp_path, kind):
    model = tiny_model(kind)
    ids = random_ids(2, 16)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "lmkit"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LmkitForCausalLM
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_untied_head_is_honoured_and_saved(tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    model.save_pretrained(tmp_path)
    loaded = LmkitForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


@pytest.mark.parametrize("kind", POSITION_TYPES)
def test_kv_cache_gives_the_same_logits_as_a_full_forward(kind):
    model = tiny_model(kind)
    ids = random_ids(2, 20)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :11], use_cache=True)
        pieces = [first.logits]
        cache = first.cache
        for start, stop in [(11, 15), (15, 16), (16, 20)]:  # a multi-token chunk, one token, then a chunk again
            step = model(ids[:, start:stop], cache=cache, use_cache=True)
            cache = step.cache
            pieces.append(step.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    generated = [model.generate(ids[:, :6], max_new_tokens=10, do_sample=False, use_cache=c) for c in (True, False)]
    assert torch.equal(*generated)


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@pytest.mark.parametrize("kind", POSITION_TYPES)
def test_left_padded_batch_equals_unbatched(kind):
    model = tiny_model(kind)
    prompts = [random_ids(1, n, seed=n)[0] for n in (3, 9, 6)]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batched_logits = model(ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None]).logits[0]
            torch.testing.assert_close(batched_logits[row, -len(prompt) :], alone, rtol=0, atol=1e-5)
            assert torch.isfinite(batched_logits[row]).all()
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=8, do_sample=False, pad_token_id=PAD)
        assert batched[row, ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist()


def test_labels_are_shifted_inside_and_minus_100_is_ignored():
    model = tiny_model()
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_torch_cross_entropy(dtype):
    """Value and gradient of the chunked loss match F.cross_entropy in fp32, over several chunks and a partial one."""
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(100, 8192, generator=generator)).to(dtype)  # 8192 columns -> 32-row chunks on CPU
    targets = torch.randint(0, 8192, (100,), generator=generator)
    targets[[0, 37, 99]] = -100
    ours_input, reference_input = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = ChunkedCrossEntropy.apply(ours_input, targets)
    reference = torch.nn.functional.cross_entropy(reference_input.float(), targets, reduction="sum")
    (2.5 * ours).backward()
    (2.5 * reference).backward()
    assert ours.dtype == torch.float32 and ours_input.grad.dtype == dtype
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(ours_input.grad, reference_input.grad)
    assert torch.all(ours_input.grad[[0, 37, 99]] == 0)


def test_num_items_in_batch_makes_gradient_accumulation_exact():
    """Two micro-batches with different numbers of real labels accumulate to the full batch's mean loss and grads."""
    ids = random_ids(4, 12)
    labels = ids.clone()
    labels[0, 3:] = -100  # the first micro-batch has far fewer target tokens than the second
    labels[1, 6:] = -100
    full_model, accumulated_model = tiny_model(), tiny_model()
    full_model.train(), accumulated_model.train()

    full = full_model(ids, labels=labels).loss
    full.backward()

    num_items = (labels[:, 1:] != -100).sum()
    total = 0.0
    for part in (slice(0, 2), slice(2, 4)):
        loss = accumulated_model(ids[part], labels=labels[part], num_items_in_batch=num_items).loss
        loss.backward()
        total += loss.item()

    assert total == pytest.approx(full.item(), abs=1e-5)
    for (name, p_full), p_acc in zip(full_model.named_parameters(), accumulated_model.parameters()):
        torch.testing.assert_close(p_acc.grad, p_full.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_logits_to_keep_returns_only_the_last_positions():
    model = tiny_model()
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 16)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("rope").train()
        if checkpointing:
            model.activation_checkpointing_enable()  # transformers v5's name for gradient_checkpointing_enable
            assert model.is_activation_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for without, with_ in zip(*grads):
        torch.testing.assert_close(with_, without, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", POSITION_TYPES)
def test_each_position_type_learns_real_text(fixtures, kind):
    """30 AdamW steps on bytes of real fortunes must cut the loss well below the uniform ln(256)."""
    lines = (fixtures / "en-fortunes.jsonl").read_text(encoding="utf-8").splitlines()[:400]
    data = torch.tensor(list("\n".join(json.loads(line)["text"] for line in lines).encode("utf-8")))
    torch.manual_seed(0)
    model = LmkitForCausalLM(tiny_config(vocab_size=256, position_embedding_type=kind, bos_token_id=None,
                                         eos_token_id=None, pad_token_id=None)).train()  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        starts = torch.randint(0, len(data) - 64, (8,), generator=generator)
        batch = torch.stack([data[s : s + 64] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), abs=0.3)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]


# ---- GPT-2 parity ----


def tiny_gpt2(attn_implementation: str, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=EOS, eos_token_id=EOS,
        pad_token_id=PAD, attn_implementation=attn_implementation, **overrides,
    )  # fmt: skip
    gpt2 = GPT2LMHeadModel(config).eval()
    assert gpt2.config._attn_implementation == attn_implementation
    return gpt2


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_from_gpt2_matches_gpt2_logits_and_greedy_generation(attn_implementation):
    gpt2 = tiny_gpt2(attn_implementation)
    model = LmkitForCausalLM.from_gpt2(gpt2).eval()
    assert model.config.position_embedding_type == "learned"
    ids = random_ids(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gpt2(ids).logits, rtol=0, atol=1e-5)
    ours = model.generate(ids[:, :5], max_new_tokens=16, do_sample=False)
    theirs = gpt2.generate(ids[:, :5], max_new_tokens=16, do_sample=False)
    assert torch.equal(ours, theirs)


def test_from_gpt2_reads_a_saved_directory_and_keeps_other_activations(tmp_path):
    gpt2 = tiny_gpt2("sdpa", activation_function="relu", scale_attn_weights=False, n_inner=40)
    gpt2.save_pretrained(tmp_path)
    model = LmkitForCausalLM.from_gpt2(tmp_path).eval()
    assert (model.config.activation_function, model.config.scale_attn_weights, model.config.n_inner) == (
        "relu", False, 40,
    )  # fmt: skip
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gpt2(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_to_gpt2_is_a_plain_gpt2_with_the_same_outputs(attn_implementation, kind):
    model = tiny_model(kind, seed=3)
    gpt2 = model.to_gpt2()
    assert type(gpt2) is GPT2LMHeadModel and gpt2.config.model_type == "gpt2"
    gpt2.set_attn_implementation(attn_implementation)
    ids = random_ids(2, 30)
    with torch.no_grad():
        torch.testing.assert_close(gpt2(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert torch.equal(
        gpt2.generate(ids[:, :4], max_new_tokens=12, do_sample=False),
        model.generate(ids[:, :4], max_new_tokens=12, do_sample=False),
    )


def test_to_gpt2_refuses_rope_which_gpt2_does_not_have():
    with pytest.raises(UserError, match=r"model.position_embedding_type .*\(rope exports to GPT-NeoX"):
        tiny_model("rope").to_gpt2()


def test_zero_init_projections_start_each_block_as_the_identity():
    torch.manual_seed(0)
    config = LmkitConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, n_positions=32, zero_init_projections=True)
    model = LmkitForCausalLM(config)
    projections = [m for m in model.modules() if getattr(m, "is_residual_projection", False)]
    assert len(projections) == 4 and all(not p.weight.any() for p in projections)
    assert all(p.weight.std() > 0 for p in LmkitForCausalLM(LmkitConfig(**{**config.to_dict(),
                                                                          "zero_init_projections": False})).modules()
               if getattr(p, "is_residual_projection", False))
    # Exported, the switch is gone (it only decides the start): stock GPT-2 computes the same logits.
    ids = torch.randint(0, 50, (2, 10))
    torch.testing.assert_close(model.to_gpt2().eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=1e-5)
