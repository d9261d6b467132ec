"""The local model hub: push, browse, load, delete, model cards, plain-transformers loading, integrity and safety."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EVAL_RESULTS, SPAWN, make_source, source_tokenizer  # tests/ is on sys.path
from transformers import GPT2LMHeadModel

from lmkit import hub
from lmkit.cli import format_list, format_show
from lmkit.errors import UserError
from lmkit.hub import publish
from lmkit.hub.model_card import write_model_card

TEXT = "the quick brown fox."


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**tokenizer(TEXT, return_tensors="pt")).logits


def snapshots(hub_path: Path, name: str = "org/model") -> list[str]:
    """Every entry in the model's snapshots dir, hidden ones included."""
    folder = hub_path / ("models--" + name.replace("/", "--")) / "snapshots"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def source(tmp_path) -> Path:
    return make_source(tmp_path / "run")


# ---- push, list, show, resolve, load, delete ----


def test_push_creates_revisions_and_moves_main(source, hub_path):
    first = hub.push(source, "org/model", hub=hub_path, message="first")
    second = hub.push(source, "org/model", hub=hub_path, message="second")
    first_rev, second_rev = first.split("@")[1], second.split("@")[1]
    assert first.startswith("org/model@") and first_rev != second_rev

    (row,) = hub.list_models(hub_path)
    assert (row["name"], row["revisions"], row["revision"]) == ("org/model", 2, second_rev)
    assert row["metrics"] == {"bleu": 12.5, "chrf": 31.25, "perplexity": 9.4877, "bits_per_byte": 1.625}
    header, line = format_list([row]).splitlines()
    assert "org/model" in line and second_rev[:12] in line
    assert line.split()[header.split().index("BPB")] == "1.625"

    info = hub.show("org/model", hub_path)
    assert [h["revision"] for h in info["history"]] == [second_rev, first_rev]
    assert [h["message"] for h in info["history"]] == ["second", "first"]
    assert info["main"] and not hub.show(f"org/model@{first_rev[:8]}", hub_path)["main"]
    text = format_show(info)
    assert "second" in text and first_rev[:12] in text and "bleu=12.5" in text

    # A revision holds the run's files, a card and a manifest; the files are read-only.
    revision_dir = hub.resolve(second, hub_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "eval_results.json",
                 "data_stats.json", "eval_samples.md", "README.md", hub.MANIFEST):
        assert (revision_dir / name).is_file(), name
    assert not os.access(revision_dir / "model.safetensors", os.W_OK) or os.geteuid() == 0
    assert (revision_dir / "model.safetensors").stat().st_mode & 0o222 == 0


def test_resolve_and_load_by_name_and_revision(tmp_path, hub_path):
    from lmkit import LmkitForCausalLM

    old = hub.push(make_source(tmp_path / "a", "learned", seed=1), "org/model", hub=hub_path)
    new = hub.push(make_source(tmp_path / "b", "learned", seed=2), "org/model", hub=hub_path)
    tokenizer = source_tokenizer()

    assert hub.resolve("org/model", hub_path) == hub.resolve(new, hub_path) == hub.resolve("org/model@main", hub_path)
    expected_old = logits(LmkitForCausalLM.from_pretrained(tmp_path / "a"), tokenizer)
    expected_new = logits(LmkitForCausalLM.from_pretrained(tmp_path / "b"), tokenizer)
    assert not torch.allclose(expected_old, expected_new)
    torch.testing.assert_close(logits(hub.load_model("org/model", hub_path), tokenizer), expected_new)
    old_prefix = old.split("@")[1][:7]
    torch.testing.assert_close(logits(hub.load_model(f"org/model@{old_prefix}", hub_path), tokenizer), expected_old)

    loaded_tokenizer = hub.load_tokenizer("org/model", hub_path)
    assert loaded_tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert loaded_tokenizer.pad_token == "<|pad|>" and loaded_tokenizer.eos_token == "<|endoftext|>"


def test_resolve_reads_env_hub_and_prefers_local_dirs(source, hub_path, monkeypatch):
    monkeypatch.setenv("LMKIT_HUB", str(hub_path))
    ref = hub.push(source, "org/model")
    assert hub.resolve("org/model").parents[2] == hub_path
    assert hub.resolve(str(source)) == source
    assert hub.hub_dir() == hub_path and hub.hub_dir("elsewhere") == Path.cwd() / "elsewhere"
    with pytest.raises(UserError, match="no model 'org/other'"):
        hub.resolve("org/other")
    revision = ref.split("@")[1]
    with pytest.raises(UserError, match="no such revision"):
        hub.resolve("org/model@" + ("1" if revision[0] == "0" else "0") + revision[1:])
    with pytest.raises(UserError, match="neither a local model directory nor a hub name"):
        hub.resolve("no/such/dir")
    with pytest.raises(UserError, match="revision"):
        hub.resolve("org/model@../../etc")
    empty = source.parent / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json or tokenizer.json"):
        hub.resolve(str(empty))


def test_delete_revision_then_model(tmp_path, hub_path):
    first = hub.push(make_source(tmp_path / "a"), "org/model", hub=hub_path).split("@")[1]
    second = hub.push(make_source(tmp_path / "b"), "org/model", hub=hub_path).split("@")[1]
    hub.push(make_source(tmp_path / "c"), "org/keep", hub=hub_path)

    hub.delete(f"org/model@{second}", hub_path)  # main's revision: main falls back to the newest remaining
    assert hub.resolve("org/model", hub_path).name == first
    assert (hub_path / "models--org--model" / "refs" / "main").read_text() == first
    assert snapshots(hub_path) == [first]
    with pytest.raises(UserError, match="no such revision"):
        hub.resolve(f"org/model@{second}", hub_path)

    hub.delete("org/model", hub_path)
    assert [r["name"] for r in hub.list_models(hub_path)] == ["org/keep"]
    assert not any(p.name.startswith(("models--org--model", ".trash")) for p in hub_path.iterdir())
    with pytest.raises(UserError, match="no model 'org/model'"):
        hub.delete("org/model", hub_path)


def test_gpt2_revision_loads_as_lmkit_model(source, hub_path):
    ref = hub.push(source, "org/model", hub=hub_path)
    tokenizer = source_tokenizer()
    model = hub.load_model(ref, hub_path)
    assert type(model).__name__ == "LmkitForCausalLM" and model.config.position_embedding_type == "learned"
    torch.testing.assert_close(logits(model, tokenizer), logits(GPT2LMHeadModel.from_pretrained(source), tokenizer))


def test_tokenizer_only_revision(tmp_path, hub_path):
    from transformers import AutoTokenizer

    directory = tmp_path / "tok"
    source_tokenizer().save_pretrained(directory)
    (directory / "tokenizer_stats.json").write_text(json.dumps({"kind": "char", "vocab_size": 31}))
    ref = hub.push(directory, "org/tok", hub=hub_path)
    revision_dir = hub.resolve("org/tok", hub_path)
    assert sorted(p.name for p in revision_dir.iterdir()) == sorted(
        ["README.md", hub.MANIFEST, "tokenizer.json", "tokenizer_config.json", "tokenizer_stats.json"])
    assert hub.load_tokenizer(ref, hub_path)(TEXT)["input_ids"] == source_tokenizer()(TEXT)["input_ids"]
    plain = AutoTokenizer.from_pretrained(revision_dir)  # the route the card documents for a tokenizer
    assert plain(TEXT)["input_ids"] == source_tokenizer()(TEXT)["input_ids"]
    card = (revision_dir / "README.md").read_text()
    assert "tokenizer-char" in yaml.safe_load(card.split("---\n")[1])["tags"] and "load_model" not in card
    assert f"models--org--tok/snapshots/{ref.split('@')[1]}" in card


# ---- model card ----


def test_model_card_header_and_sections(source, hub_path):
    ref = hub.push(source, "org/model", hub=hub_path)
    card = (hub.resolve(ref, hub_path) / "README.md").read_text()
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["pipeline_tag"] == "text-generation" and header["library_name"] == "transformers"
    assert "lmkit" in header["tags"] and len(header["tags"]) == len(set(header["tags"]))
    (index,) = header["model-index"]
    assert index["name"] == "org/model"
    metrics = {m["type"]: m["value"] for m in index["results"][0]["metrics"]}
    assert metrics == {"bleu": EVAL_RESULTS["eval_bleu"], "chrf": EVAL_RESULTS["eval_chrf"],
                       "perplexity": EVAL_RESULTS["eval_perplexity"],
                       "bits_per_byte": EVAL_RESULTS["eval_bits_per_byte"]}
    for section in ("## Data", "## Tokenizer", "## Architecture", "## Training recipe", "## Results",
                    "## Sample generations", "## How to load"):
        assert section in card, section
    assert "learning_rate: 0.001" in card and "| the | fox | fox |" in card
    assert ref.split("@")[1] in card  # the load snippet names this exact revision


def test_model_card_without_results_has_no_model_index(tmp_path):
    source = make_source(tmp_path / "run", eval_results=None)
    write_model_card(source, "org/model", "0" * 40, subfolder=None, snapshot_hint="models--org--model/snapshots/0")
    header = yaml.safe_load((source / "README.md").read_text().split("---\n")[1])
    assert "model-index" not in header and header["pipeline_tag"] == "text-generation"


def test_checkpoint_push_borrows_run_files_but_not_final_results(tmp_path, hub_path):
    run = make_source(tmp_path / "run")  # the run's final eval_results describe the final model, not the checkpoint
    checkpoint = make_source(run / "checkpoint-4", eval_results=None)
    for name in ("recipe.yaml", "data_stats.json", "eval_samples.md"):
        (checkpoint / name).unlink()
    (checkpoint / "optimizer.pt").write_bytes(b"training state, pickled")
    state = {"global_step": 4, "log_history": [
        {"step": 2, "eval_loss": 3.0}, {"step": 4, "loss": 2.9}, {"step": 4, "eval_loss": 2.75},
        {"step": 4, "eval_bleu": 7.5}, {"step": 6, "eval_loss": 1.0},
    ]}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))

    revision_dir = hub.resolve(hub.push(checkpoint, "org/model", hub=hub_path), hub_path)
    assert (revision_dir / "recipe.yaml").read_text() == (run / "recipe.yaml").read_text()
    assert (revision_dir / "data_stats.json").is_file()
    assert not (revision_dir / "eval_samples.md").exists() and not (revision_dir / "optimizer.pt").exists()
    results = json.loads((revision_dir / "eval_results.json").read_text())
    assert (results["eval_loss"], results["eval_bleu"], results["step"]) == (2.75, 7.5, 4)


# ---- plain transformers, no lmkit ----

PLAIN_LOAD = """
import json, sys
sys.path.append(sys.argv[1])  # the venv's site-packages, without running its .pth files (lmkit's is one)
try:
    import lmkit
    sys.exit("lmkit must not be importable here")
except ModuleNotFoundError:
    pass
from transformers import AutoModelForCausalLM, AutoTokenizer
hub, text, requests = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
out = []
for name, revision, subfolder in requests:
    kwargs = dict(cache_dir=hub, revision=revision, local_files_only=True)
    if subfolder:
        kwargs["subfolder"] = subfolder
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    ids = tokenizer(text, return_tensors="pt")
    out.append({"class": type(model).__name__, "ids": ids["input_ids"][0].tolist(),
                "logits": model(**ids).logits[0].tolist()})
print(json.dumps(out))
"""


def test_plain_transformers_loads_without_lmkit(tmp_path, hub_path):
    import transformers

    from lmkit import LmkitForCausalLM

    requests, expected, classes = [], [], []
    tokenizer = source_tokenizer()
    # GPT-2 loads from the revision itself; an lmkit model from its stock export (lmkit.exporting) in a subfolder.
    kinds = (("gpt2", GPT2LMHeadModel.from_pretrained, "", "GPT2LMHeadModel"),
             ("learned", LmkitForCausalLM.from_pretrained, "gpt2", "GPT2LMHeadModel"),
             ("sinusoidal", LmkitForCausalLM.from_pretrained, "gpt2", "GPT2LMHeadModel"),
             ("rope", LmkitForCausalLM.from_pretrained, "gpt-neox", "GPTNeoXForCausalLM"))
    for kind, load, expected_subfolder, stock_class in kinds:
        name = f"org/{kind}"
        old = hub.push(make_source(tmp_path / kind / "a", kind, seed=1), name, hub=hub_path).split("@")[1]
        hub.push(make_source(tmp_path / kind / "b", kind, seed=2), name, hub=hub_path)
        info = hub.show(name, hub_path)
        subfolder = info["transformers_subfolder"]
        assert subfolder == expected_subfolder
        if subfolder:  # the card documents the path tested here
            assert f'subfolder="{subfolder}"' in (Path(info["path"]) / "README.md").read_text()
        for revision, run in (("main", "b"), (old, "a")):
            requests.append([name, revision, subfolder])
            expected.append(logits(load(tmp_path / kind / run), tokenizer)[0])
            classes.append(stock_class)

    site_packages = str(Path(transformers.__file__).parents[1])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # -I: ignore PYTHON* env vars and the script's dir; -S: skip site, so the editable lmkit .pth is never read.
    command = [sys.executable, "-I", "-S", "-c", PLAIN_LOAD, site_packages, str(hub_path), TEXT, json.dumps(requests)]
    done = subprocess.run(command, cwd=outside, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])

    for request, result, want, stock_class in zip(requests, loaded, expected, classes, strict=True):
        assert result["class"] == stock_class, request
        assert result["ids"] == tokenizer(TEXT)["input_ids"]
        torch.testing.assert_close(torch.tensor(result["logits"]), want, rtol=1e-4, atol=1e-5)


def test_model_without_stock_equivalent_needs_lmkit_and_loads_with_it(tmp_path, hub_path):
    from transformers import AutoModelForCausalLM

    from lmkit import LmkitForCausalLM

    # GPT-NeoX always scales attention scores, so this rope model has no exact stock export (lmkit.exporting refuses).
    source = make_source(tmp_path / "run", "rope", scale_attn_weights=False)
    ref = hub.push(source, "org/model", hub=hub_path)
    revision_dir = hub.resolve(ref, hub_path)
    assert not (revision_dir / "gpt-neox").exists() and hub.show(ref, hub_path)["transformers_subfolder"] is None
    assert "import lmkit" in (revision_dir / "README.md").read_text()
    tokenizer = source_tokenizer()
    expected = logits(LmkitForCausalLM.from_pretrained(source), tokenizer)
    torch.testing.assert_close(logits(hub.load_model(ref, hub_path), tokenizer), expected)
    # `import lmkit` registered the Auto classes: the HF-cache route works too, with no trust_remote_code.
    auto = AutoModelForCausalLM.from_pretrained("org/model", cache_dir=hub_path, local_files_only=True)
    torch.testing.assert_close(logits(auto, tokenizer), expected)


# ---- integrity and safety ----


@pytest.mark.parametrize("tamper", ["modify", "add", "remove"])
def test_tampered_revision_is_refused(source, hub_path, tamper):
    revision_dir = hub.resolve(hub.push(source, "org/model", hub=hub_path), hub_path)
    target = revision_dir / ("extra.safetensors" if tamper == "add" else "config.json")
    if tamper == "modify":
        target.chmod(0o644)
        config = json.loads(target.read_text())
        target.write_text(json.dumps({**config, "n_layer": 2}))
    elif tamper == "add":
        target.write_bytes(b"not from the push")
    else:
        target.unlink()
    with pytest.raises(UserError, match=re.escape(str(target))):
        hub.resolve("org/model", hub_path)
    with pytest.raises(UserError, match="config.json|extra.safetensors"):
        hub.load_tokenizer("org/model", hub_path)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b/c", "", ".", "org/..", "org/.", "a--b/c", "org/na me", "org/"])
def test_rejected_names_write_nothing(source, hub_path, name):
    with pytest.raises(UserError, match="org/name"):
        hub.push(source, name, hub=hub_path)
    assert not hub_path.exists()
    with pytest.raises(UserError, match="hub.name"):
        hub.HubArgs(name=name)


def test_hub_args_validation():
    assert hub.HubArgs().push == "never" and hub.HubArgs(name="org/m", push="every_save").name == "org/m"
    with pytest.raises(UserError, match="hub.push must be one of never, end, every_save"):
        hub.HubArgs(name="org/m", push="always")
    with pytest.raises(UserError, match="hub.name is required"):
        hub.HubArgs(push="end")


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt"])
def test_pickle_weights_refused(source, hub_path, weights):
    torch.save({"w": torch.zeros(1)}, source / weights)
    with pytest.raises(UserError, match=f"{weights}: pickle weights are refused"):
        hub.push(source, "org/model", hub=hub_path)
    assert hub.list_models(hub_path) == [] and snapshots(hub_path) == []


def test_sharded_index_cannot_point_outside_the_revision(source, hub_path):
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../escape.safetensors"}}))
    with pytest.raises(UserError, match="must be a \\*.safetensors file name"):
        hub.push(source, "org/model", hub=hub_path)
    assert snapshots(hub_path) == [] and not (hub_path.parent / "escape.safetensors").exists()


def test_push_needs_safetensors_model_or_tokenizer(tmp_path, hub_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="nothing to push"):
        hub.push(tmp_path / "empty", "org/model", hub=hub_path)
    with pytest.raises(UserError, match="push source must be"):
        hub.push(tmp_path / "missing", "org/model", hub=hub_path)


# ---- crashes and concurrency (separate processes, started by conftest's SPAWN: fresh interpreters) ----


def _slow_push(source, hub_path):
    """A push that sleeps after each copied file, so that it can be killed in the middle of copying."""
    copy = publish._copy_file

    def slow_copy(src, dst):
        copy(src, dst)
        time.sleep(0.5)

    publish._copy_file = slow_copy  # this child's copy of the module only
    hub.push(source, "org/model", hub=hub_path)


def test_push_killed_midway_leaves_hub_as_it_was(tmp_path, hub_path):
    before = hub.push(make_source(tmp_path / "a", seed=1), "org/model", hub=hub_path).split("@")[1]
    source = make_source(tmp_path / "b", seed=2)

    process = SPAWN.Process(target=_slow_push, args=(source, hub_path))
    process.start()
    deadline = time.monotonic() + 120  # the child imports lmkit first
    staged = []
    while time.monotonic() < deadline and not any(staged):
        staged = [list(p.iterdir()) for p in (hub_path / "models--org--model" / "snapshots").glob(".*")]
        time.sleep(0.01)
    assert any(staged) and process.is_alive(), "the push never got under way"
    process.kill()  # SIGKILL: no cleanup handler runs
    process.join()
    assert process.exitcode == -signal.SIGKILL

    assert [r["revision"] for r in hub.list_models(hub_path)] == [before]
    assert [h["revision"] for h in hub.show("org/model", hub_path)["history"]] == [before]
    assert hub.resolve("org/model", hub_path).name == before  # verified: main is intact
    assert (hub_path / "models--org--model" / "refs" / "main").read_text() == before
    # The only trace is the hidden staging dir, which nothing lists or loads.
    assert [s for s in snapshots(hub_path) if not s.startswith(".")] == [before]


def _push_on_signal(source, hub_path, go, results):
    go.wait()
    results.put(hub.push(source, "org/model", hub=hub_path))


def test_concurrent_pushes_both_land(tmp_path, hub_path):
    go, results = SPAWN.Event(), SPAWN.Queue()
    sources = [make_source(tmp_path / f"run{i}", seed=i) for i in range(2)]
    processes = [SPAWN.Process(target=_push_on_signal, args=(s, hub_path, go, results)) for s in sources]
    for process in processes:
        process.start()
    go.set()  # both pushes start at the same moment
    refs = [results.get(timeout=60).split("@")[1] for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    assert len(set(refs)) == 2
    history = hub.show("org/model", hub_path)["history"]
    assert sorted(h["revision"] for h in history) == sorted(refs)
    assert history[0]["main"]  # main names the newest revision
    for revision in refs:
        hub.resolve(f"org/model@{revision}", hub_path)
