"""`optimizer.name: muon` (lmkit.optimizers): Muon on the blocks' 2-D matrices, AdamW on the rest, one optimizer to
the Trainer: its schedule, its checkpoints and an exact `--resume`; refused for LoRA."""

import io
import shutil

import pytest
import torch
import yaml
from conftest import max_abs_diff, tiny_recipe  # tests/ is on sys.path under pytest

from lmkit.configuration import LmkitConfig
from lmkit.errors import UserError
from lmkit.modeling import LmkitForCausalLM
from lmkit.optimizers import MuonWithAdamW, OptimizerArgs, build, muon_parameter_names
from lmkit.recipe import load_recipe

TRAINING = type("Args", (), {"learning_rate": 1e-2, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95,
                             "adam_epsilon": 1e-8})


def _model(seed: int = 0) -> LmkitForCausalLM:
    torch.manual_seed(seed)
    return LmkitForCausalLM(LmkitConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, n_positions=32,
                                        position_embedding_type="learned", resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0))  # no dropout: no random state to carry over


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = _model()
    names = muon_parameter_names(model)
    assert names and all(name.endswith(".weight") and (".attn." in name or ".mlp." in name) for name in names)
    assert len(names) == 4 * model.config.n_layer  # c_attn, attn c_proj, c_fc, mlp c_proj of every block
    optimizer = build(model, OptimizerArgs(name="muon"), TRAINING, decay_names={n for n, _ in model.named_parameters()
                                                                                if "bias" not in n and "ln" not in n})
    muon, adamw = optimizer.parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    everything = {id(p) for p in model.parameters()}
    in_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert in_muon | in_adamw == everything and not in_muon & in_adamw
    assert id(model.get_input_embeddings().weight) in in_adamw


def _steps(model, optimizer, scheduler, count: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ids = torch.randint(0, 50, (4, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_the_schedule_drives_both_and_a_saved_state_continues_exactly():
    def fresh():
        model = _model()
        optimizer = build(model, OptimizerArgs(name="muon"), TRAINING, set())
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

    model, optimizer, scheduler = fresh()
    _steps(model, optimizer, scheduler, 3, seed=1)
    rates = [group["lr"] for part in optimizer.parts for group in part.param_groups]
    assert rates == pytest.approx([1e-2 / 4] * 3), "the schedule sets Muon's rate and AdamW's (2 groups)"
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    _steps(model, optimizer, scheduler, 3, seed=2)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as the Trainer reloads a checkpoint
    resumed, optimizer2, scheduler2 = fresh()
    resumed.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    scheduler2.load_state_dict(saved["scheduler"])
    assert isinstance(optimizer2, MuonWithAdamW) and optimizer2.state
    _steps(resumed, optimizer2, scheduler2, 3, seed=2)
    assert max_abs_diff(model.state_dict(), resumed.state_dict()) == 0.0


@pytest.mark.slow
def test_a_muon_run_killed_after_a_checkpoint_resumes_exactly(tmp_path, fixtures):
    """Trained 12 steps with a checkpoint at 6; the same run cut back to its checkpoint (as if killed right after
    it) and resumed ends at the very same weights."""
    from safetensors.torch import load_file

    from lmkit.cli import main

    recipe = tiny_recipe(tmp_path, fixtures, optimizer={"name": "muon"},
                         training={"eval_strategy": "no", "save_total_limit": 3})
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["optimizer"]["name"] == "muon"
    assert {"muon", "adamw"} <= set(torch.load(run / "checkpoint-6" / "optimizer.pt", weights_only=True))
    finished = load_file(run / "model.safetensors")
    for path in run.iterdir():  # back to the moment after checkpoint-6 was written
        if path.name not in ("checkpoint-6", "recipe.yaml", "lmkit_run.json", "tokenizer", "heldout",
                             "data_stats.json", "run_history.jsonl", "metrics.csv", "samples"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert main(["train", str(recipe), "--resume"]) == 0
    assert max_abs_diff(finished, load_file(run / "model.safetensors")) == 0.0


def test_muon_with_lora_is_one_clear_error(tmp_path, fixtures):
    recipe = tiny_recipe(tmp_path, fixtures, optimizer={"name": "muon"})
    with pytest.raises(UserError, match="optimizer.name muon trains full weight matrices"):
        load_recipe(recipe, ["finetune.method=lora", "model.init_from=x"])
    with pytest.raises(UserError, match="optimizer.name"):
        load_recipe(recipe, ["optimizer.name=lion"])


def test_muon_under_fsdp_is_refused_before_any_work(tmp_path, fixtures, monkeypatch):
    from lmkit.training import preflight

    recipe = load_recipe(tiny_recipe(tmp_path, fixtures, optimizer={"name": "muon"}))
    preflight(recipe)  # DDP or one process: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(UserError, match="optimizer.name muon orthogonalises whole weight matrices, which FSDP shards"):
        preflight(recipe)
    assert not (tmp_path / "run").exists()

