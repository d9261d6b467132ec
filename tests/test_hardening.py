"""What users and accidents do to a hub, a run dir and a corpus: crafted and damaged manifests, SIGKILLs at random
points, full disks, read-only dirs, edited files, giant lines, umasks. Each test names the item of issue 11 it covers.
"""

import errno
import json
import multiprocessing
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmkit import cli, hub
from lmkit.hub import publish
from lmkit.errors import UserError

sys.path.insert(0, str(Path(__file__).parent / "hub"))
from test_hub import make_source  # noqa: E402 (the tests' tiny model runs)

LMKIT = [sys.executable, "-m", "lmkit"]
# Children that get killed start as fresh interpreters: fork() would copy the parent's locks (tqdm's cross-process
# write lock, OpenMP's pool) in whatever state its threads left them, and a child killed while holding tqdm's lock
# deadlocks the test process at its next progress bar (seen in CI), while forked torch ops segfaulted.
SPAWN = multiprocessing.get_context("spawn")
IS_ROOT = os.geteuid() == 0


def run_cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*LMKIT, *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def model_dir(hub_path: Path, name="org/model") -> Path:
    return hub_path / ("models--" + name.replace("/", "--"))


def rewrite_manifest(snapshot: Path, change) -> None:
    path = snapshot / hub.MANIFEST
    manifest = json.loads(path.read_text())
    path.chmod(0o644)
    path.write_text(json.dumps(change(manifest)))


@pytest.fixture
def hub_path(tmp_path) -> Path:
    return tmp_path / "hub"


# ---- 1. a crafted manifest cannot make the hub read or delete outside itself -------------------------------------


def test_crafted_manifest_revision_cannot_escape_the_hub(tmp_path, hub_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    good = hub.push(make_source(tmp_path / "a", seed=1), "org/model", hub=hub_path).split("@")[1]
    crafted = hub.push(make_source(tmp_path / "b", seed=2), "org/model", hub=hub_path).split("@")[1]
    snapshot = model_dir(hub_path) / "snapshots" / crafted
    # From the snapshot, 4 levels up is tmp_path: the manifest points at the victim.
    rewrite_manifest(snapshot, lambda m: {**m, "revision": f"{crafted}/../../../../victim"})

    shown = hub.show("org/model", hub_path)  # main falls back to the good revision
    assert shown["revision"] == good and all(str(victim) not in h["path"] for h in shown["history"])
    assert [r["revision"] for r in hub.list_models(hub_path)] == [good]
    for spec in ("org/model", f"org/model@{crafted}"):
        result = run_cli("hub", "delete", spec, "--yes", "--hub", hub_path)
        assert (victim / "precious.txt").read_text() == "keep me", result
    assert not model_dir(hub_path).exists()  # the whole model went, from its own folder


def test_manifest_naming_another_model_is_damaged(tmp_path, hub_path, caplog):
    revision = hub.push(make_source(tmp_path / "a"), "org/model", hub=hub_path).split("@")[1]
    snapshot = model_dir(hub_path) / "snapshots" / revision
    rewrite_manifest(snapshot, lambda m: {**m, "name": "other/model"})
    assert hub.list_models(hub_path) == []
    assert sum("damaged hub revision" in r.message for r in caplog.records) == 1
    with pytest.raises(UserError, match="no model 'org/model'"):
        hub.resolve("org/model", hub_path)


# ---- 2. commands given a snapshot path write outside the hub -----------------------------------------------------


@pytest.mark.slow
def test_eval_of_a_snapshot_path_writes_outside_the_hub(tmp_path, hub_path, fixtures):
    source = make_source(tmp_path / "run")  # 32 positions: blocks and prompts sized to fit
    (source / "recipe.yaml").write_text("data: {block_size: 16}\neval: {prompt_tokens: 4, max_new_tokens: 4}\n")
    ref = hub.push(source, "org/model", hub=hub_path)
    snapshot = hub.resolve(ref, hub_path)
    corpus = tmp_path / "eval.txt"
    corpus.write_text("the quick brown fox.\n" * 3 + "a lazy dog sat.\n")
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("eval", snapshot, "--data", corpus, "--num-samples", "2", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["output_dir"] == f"runs/eval/org--model-{ref.split('@')[1][:12]}"
    assert (work / report["output_dir"] / "eval_report.json").is_file()
    hub.resolve("org/model", hub_path)  # still verifies: nothing was added to the revision
    refused = run_cli("eval", snapshot, "--data", corpus, "--output", snapshot / "out", cwd=work)
    assert refused.returncode == 2 and "immutable" in refused.stderr and not (snapshot / "out").exists()


# ---- 7. a damaged manifest is skipped with one warning; show verifies; hub verify reports -------------------------


@pytest.mark.parametrize("damage", ["missing_field", "wrong_shape", "not_json", "files_wrong_type", "escaping_file"])
def test_one_damaged_manifest_does_not_break_the_hub(tmp_path, hub_path, damage):
    for i in range(2):
        hub.push(make_source(tmp_path / f"m{i}", seed=i), f"org/m{i}", hub=hub_path)
    damaged = hub.push(make_source(tmp_path / "x"), "org/m0", hub=hub_path).split("@")[1]
    snapshot = model_dir(hub_path, "org/m0") / "snapshots" / damaged
    path = snapshot / hub.MANIFEST
    path.chmod(0o644)
    manifest = json.loads(path.read_text())
    if damage == "missing_field":
        del manifest["created"]
    elif damage == "wrong_shape":
        manifest = [manifest]
    elif damage == "files_wrong_type":
        manifest["files"] = ["config.json"]
    elif damage == "escaping_file":
        manifest["files"]["../../../escape"] = {"sha256": "0" * 64, "size": 1}
    path.write_text("{not json" if damage == "not_json" else json.dumps(manifest))

    result = run_cli("hub", "list", "--hub", hub_path)
    assert result.returncode == 0, result.stderr
    assert "org/m0" in result.stdout and "org/m1" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "damaged hub revision" in line]
    assert len(warnings) == 1 and damaged in warnings[0]
    assert "Traceback" not in result.stderr

    verify = run_cli("hub", "verify", "--hub", hub_path)
    assert verify.returncode == 1
    assert f"DAMAGED  org/m0@{damaged}" in verify.stdout and "ok       org/m1@" in verify.stdout
    shown = run_cli("hub", "show", f"org/m0@{damaged}", "--hub", hub_path)
    assert shown.returncode == 2 and "no such revision" in shown.stderr
    # A damaged revision can still be deleted by its full id.
    assert run_cli("hub", "delete", f"org/m0@{damaged}", "--yes", "--hub", hub_path).returncode == 0
    assert run_cli("hub", "verify", "--hub", hub_path).returncode == 0


def test_show_verifies_what_it_shows(tmp_path, hub_path):
    ref = hub.push(make_source(tmp_path / "a"), "org/model", hub=hub_path)
    results = hub.resolve(ref, hub_path) / "eval_results.json"
    results.chmod(0o644)
    results.write_text(json.dumps({"eval_loss": 0.01, "eval_bleu": 99.0}))  # tampered results
    with pytest.raises(UserError, match="modified after push"):
        hub.show("org/model", hub_path)
    verify = run_cli("hub", "verify", "org/model", "--hub", hub_path)
    assert verify.returncode == 1 and "eval_results.json: file modified after push" in verify.stdout


def test_verify_reports_a_bad_ref(tmp_path, hub_path):
    hub.push(make_source(tmp_path / "a"), "org/model", hub=hub_path)
    (model_dir(hub_path) / "refs" / "main").write_text("f" * 40)
    rows = hub.verify(None, hub_path)
    assert [r["ok"] for r in rows] == [True, False] and "refs/main" in rows[1]["problem"]


# ---- 9. leftovers: gc removes a killed push's staging dir, never a live one's -------------------------------------


def _when_ready(target, args, ready):
    ready.set()  # unpickling this call imported this module, lmkit, torch: the time to the kill starts now
    target(*args)


def _push_until_killed(source, hub_path, started):
    copy = publish._copy_file

    def slow_copy(src, dst):
        copy(src, dst)
        started.set()
        time.sleep(30)

    publish._copy_file = slow_copy
    hub.push(source, "org/model", hub=hub_path)


def test_gc_removes_a_killed_push_leftovers_but_not_a_live_push(tmp_path, hub_path):
    hub.push(make_source(tmp_path / "a"), "org/model", hub=hub_path)
    source = make_source(tmp_path / "b", seed=3)
    snapshots = model_dir(hub_path) / "snapshots"
    processes = []
    for _ in range(2):
        started = SPAWN.Event()
        process = SPAWN.Process(target=_push_until_killed, args=(source, hub_path, started))
        process.start()
        assert started.wait(120)
        processes.append(process)
    killed, live = processes
    staged = {p.name for p in snapshots.glob(".*")}
    assert len(staged) == 2
    killed.kill()
    killed.join()
    try:
        assert hub.gc(hub_path) == []  # both younger than the grace period
        removed = hub.gc(hub_path, grace_seconds=0)
        assert len([p for p in removed if p.parent == snapshots]) == 1
        assert len(list(snapshots.glob(".*"))) == 1 and live.is_alive()  # the live push's dir stays
    finally:
        live.kill()
        live.join()
    assert len([p for p in hub.gc(hub_path, grace_seconds=0) if p.parent == snapshots]) == 1
    assert list(snapshots.glob(".*")) == [] and not list((hub_path / ".locks").glob("*/push-*"))
    assert run_cli("hub", "verify", "--hub", hub_path).returncode == 0


def test_gc_command_runs(tmp_path, hub_path):
    hub.push(make_source(tmp_path / "a"), "org/model", hub=hub_path)
    leftover = model_dir(hub_path) / "snapshots" / f".{'a' * 40}.tmp-xyz"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    old = time.time() - 7200
    os.utime(leftover / "config.json", (old, old))
    os.utime(leftover, (old, old))
    result = run_cli("hub", "gc", "--hub", hub_path)
    assert result.returncode == 0 and f"removed {leftover}" in result.stdout and not leftover.exists()


# ---- 6. permissions follow the umask, atomic writes included ------------------------------------------------------


def test_atomic_writes_follow_the_umask(tmp_path):
    from lmkit.atomic import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_directory(tmp_path / "d") as staging:
            (staging / "inner").write_text("y")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def _modes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_pushed_model_and_export_are_readable_by_others(tmp_path, hub_path):
    old = os.umask(0o022)
    try:
        ref = hub.push(make_source(tmp_path / "run", "learned"), "org/model", hub=hub_path)
        result = run_cli("export", ref, "--output", tmp_path / "export", "--hub", hub_path)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr[-2000:]
    # Revision files are read-only by design (0444), directories 0755; the ref and the export 0644/0755.
    for rel, mode in _modes(model_dir(hub_path)).items():
        is_dir = (model_dir(hub_path) / rel).is_dir()
        expected = 0o755 if is_dir else (0o644 if rel.startswith("refs/") else 0o444)
        assert mode == expected, (rel, oct(mode))
    for rel, mode in _modes(tmp_path / "export").items():
        assert mode == (0o755 if (tmp_path / "export" / rel).is_dir() else 0o644), (rel, oct(mode))


# ---- 4. caches are keyed by content ------------------------------------------------------------------------------


def test_read_cache_sees_an_in_place_edit_that_keeps_size_and_mtime(tmp_path):
    from lmkit.data import DataArgs, prepare_splits

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


# ---- 3 and 9. --resume compares the run's identity; a finished run is not re-published ------------------------------

TINY_RUN = """
data: {{files: [{corpus}], block_size: 32}}
tokenizer: {{train: {{kind: char, vocab_size: 3000, min_frequency: 1}}}}
model: {{n_layer: 1, n_head: 2, n_embd: 16, n_positions: 64}}
eval: {{bleu_samples: 4, prompt_tokens: 8, max_new_tokens: 8}}
hub: {{dir: {hub}, name: org/tiny, push: end}}
training: {{output_dir: {out}, max_steps: 4, save_steps: 2, eval_strategy: "no", logging_steps: 2,
           per_device_train_batch_size: 8, report_to: none, seed: 7, disable_tqdm: true}}
"""


def _tree(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


@pytest.mark.slow
def test_resume_refuses_immutable_changes_records_mutable_ones_and_does_not_republish(tmp_path, fixtures, hub_path):
    from lmkit.recipe import load_recipe
    from lmkit.training import train

    recipe = tmp_path / "run.yaml"
    recipe.write_text(TINY_RUN.format(corpus=fixtures / "zh-poetry.jsonl", hub=hub_path, out=tmp_path / "run"))
    train(load_recipe(recipe))
    run = tmp_path / "run"
    assert (run / "lmkit_run.json").is_file() and len(hub.list_models(hub_path)) == 1
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (run, run / "heldout", run / "tokenizer", run / "checkpoint-4"):  # 6. the umask, not 0700/0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, path
    for path in (run / "model.safetensors", run / "recipe.yaml", run / "heldout" / "test.jsonl",
                 run / "checkpoint-4" / "model.safetensors", run / "lmkit_run.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    before = _tree(run)

    other = tmp_path / "other.jsonl"
    other.write_text((fixtures / "zh-quotes.jsonl").read_text())
    refused = run_cli("train", recipe, f"data.files=[{other}]", "training.seed=8", "model.n_embd=32", "--resume")
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "data.files: the corpus content differs" in line and "training.seed: 7 -> 8" in line
    assert "model.n_embd: 16 -> 32" in line and "Traceback" not in refused.stderr
    assert _tree(run) == before, "nothing in the run dir may change before the error"

    # The corpus is compared by content, whatever its path.
    corpus_copy = tmp_path / "copy.jsonl"
    corpus_copy.write_text((fixtures / "zh-poetry.jsonl").read_text())
    moved = run_cli("train", recipe, f"data.files=[{corpus_copy}]", "--resume")
    assert moved.returncode == 0 and "already finished" in moved.stdout, moved.stderr[-3000:]  # same content: fine

    finished = run_cli("train", recipe, "--resume")
    assert finished.returncode == 0 and "already finished" in finished.stdout, finished.stderr[-3000:]
    assert len(hub.show("org/tiny", hub_path)["history"]) == 1  # not re-published
    assert _tree(run) == before

    more = run_cli("train", recipe, "training.max_steps=6", "training.logging_steps=1", "--resume")
    assert more.returncode == 0, more.stderr[-3000:]
    history = [json.loads(line) for line in (run / "run_history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "finished", "resume", "finished"]
    assert history[2]["changed"] == {"training.max_steps": {"was": 4, "now": 6},
                                     "training.logging_steps": {"was": 2, "now": 1}}
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 6
    assert len(hub.show("org/tiny", hub_path)["history"]) == 2  # a longer run is a new model: published once


# ---- 8. OS errors and damaged inputs: one error line naming the path and the cause, exit 2 --------------------------


def _damaged_corpus(tmp_path: Path, kind: str) -> Path:
    import gzip

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
    from lmkit.data import DataArgs, prepare_splits

    path = _damaged_corpus(tmp_path, kind)
    with pytest.raises(UserError, match=f"{path}: cannot read: .*damaged") as caught:
        prepare_splits(DataArgs(files=[str(path)]), seed=0)
    assert "\n" not in str(caught.value)


def test_damaged_corpus_through_the_cli(tmp_path):
    path = _damaged_corpus(tmp_path, "truncated_gz")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RUN.format(corpus=path, hub=tmp_path / "hub", out=tmp_path / "run"))
    result = run_cli("train", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert str(path) in line and "ended before the end-of-stream marker" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["not_json", "no_weight_map", "missing_shard"])
def test_damaged_sharded_index_is_one_clear_error(tmp_path, hub_path, damage):
    source = make_source(tmp_path / "run")
    index = source / "model.safetensors.index.json"
    (source / "model.safetensors").rename(source / "model-00001-of-00001.safetensors")
    content = {"not_json": "{\"weight_map\": {", "no_weight_map": json.dumps({"metadata": {}}),
               "missing_shard": json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})}[damage]
    index.write_text(content)
    for call in (lambda: hub.push(source, "org/model", hub=hub_path), lambda: hub.load_model(str(source))):
        with pytest.raises(UserError, match=f"{index}: damaged sharded-weights index"):
            call()
    assert hub.list_models(hub_path) == []


def _cli_error(capsys, argv) -> str:
    capsys.readouterr()  # what came before (progress bars of the setup)
    assert cli.main([str(a) for a in argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_full_disk_during_push_is_one_line_and_leaves_the_hub_as_it_was(tmp_path, hub_path, monkeypatch, capsys):
    before = hub.push(make_source(tmp_path / "a"), "org/model", hub=hub_path)
    copies = []

    def copy_until_full(src, dst):
        copies.append(dst)
        if len(copies) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())

    monkeypatch.setattr(publish, "_copy_file", copy_until_full)
    line = _cli_error(capsys, ["push", make_source(tmp_path / "b", seed=1), "--name", "org/model", "--hub", hub_path])
    assert line == f"error: {copies[2]}: No space left on device"
    assert [r["revision"] for r in hub.list_models(hub_path)] == [before.split("@")[1]]
    assert not list((model_dir(hub_path) / "snapshots").glob(".*"))  # the staging dir was removed


def _read_only(monkeypatch, directory: Path) -> None:
    """Make `directory` read-only; as root (CI containers) permissions do not stop writes, so the refusal the kernel
    would give is simulated where lmkit asks for it."""
    directory.chmod(0o555)
    if IS_ROOT:
        import tempfile

        from lmkit import atomic

        real_access, real_mkdtemp = os.access, tempfile.mkdtemp
        monkeypatch.setattr(atomic.os, "access", lambda p, mode: False if Path(p) == directory else
                            real_access(p, mode))

        def mkdtemp(*args, dir=None, **kwargs):
            if dir is not None and directory in [Path(dir), *Path(dir).parents]:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return real_mkdtemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)


def test_read_only_hub_push_is_one_line(tmp_path, hub_path, monkeypatch, capsys):
    hub.push(make_source(tmp_path / "a"), "org/model", hub=hub_path)
    snapshots = model_dir(hub_path) / "snapshots"
    _read_only(monkeypatch, snapshots)
    try:
        line = _cli_error(capsys, ["push", tmp_path / "a", "--name", "org/model", "--hub", hub_path])
    finally:
        snapshots.chmod(0o755)
    assert line.startswith(f"error: {snapshots}") and "Permission denied" in line


def test_unwritable_or_file_output_dirs_fail_before_the_data_stage(tmp_path, fixtures, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    recipe.write_text(TINY_RUN.format(corpus=fixtures / "zh-poetry.jsonl", hub=tmp_path / "hub", out=blocker / "run"))
    line = _cli_error(capsys, ["validate", recipe])
    assert f"training.output_dir {blocker / 'run'} is under {blocker}, which is a file" in line
    read_only = tmp_path / "ro"
    read_only.mkdir()
    _read_only(monkeypatch, read_only)
    recipe.write_text(TINY_RUN.format(corpus=fixtures / "zh-poetry.jsonl", hub=tmp_path / "hub", out=read_only / "run"))
    line = _cli_error(capsys, ["train", recipe])
    assert f"{read_only} is not writable" in line and not (read_only / "run").exists()
    read_only.chmod(0o755)
    line = _cli_error(capsys, ["export", tmp_path, "--output", blocker / "export"])
    assert f"--output {blocker / 'export'} is under {blocker}, which is a file" in line


# ---- 5. giant lines are split or cut, counted and warned about ----------------------------------------------------


def test_a_giant_line_becomes_documents_of_bounded_size(tmp_path, caplog):
    from lmkit.data import DataArgs, prepare_splits
    from lmkit.data.corpus import MAX_DOCUMENT_CHARS

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


def test_tokenizer_training_cuts_giant_words(tmp_path, caplog):
    from lmkit.data.corpus import MAX_WORD_CHARS
    from lmkit.tokenization import TokenizerSpec, train_tokenizer

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


# ---- fault injection: SIGKILL at random points of push, export and checkpoint saves -------------------------------

KILLS = 6  # random kill points per operation (seeded: a failure names its delay)


def _push_child(source, hub_path):
    hub.push(source, "org/model", hub=hub_path)


def _kill_after(target, args, delay: float) -> None:
    ready = SPAWN.Event()
    process = SPAWN.Process(target=_when_ready, args=(target, args, ready))
    process.start()
    assert ready.wait(120), "the child process did not start"
    process.join(delay)
    if process.is_alive():
        process.kill()
    process.join(30)


def test_push_killed_at_random_points_leaves_a_consistent_hub(tmp_path, hub_path):
    source = make_source(tmp_path / "run", "learned")  # learned positions: the push also exports gpt2/
    first = hub.push(source, "org/model", hub=hub_path).split("@")[1]
    started = time.monotonic()
    hub.push(source, "org/model", hub=hub_path)
    duration = time.monotonic() - started
    rng = random.Random(11)
    for _ in range(KILLS):
        delay = rng.uniform(0, duration * 1.2)
        _kill_after(_push_child, (source, hub_path), delay)
        rows = hub.verify(None, hub_path)
        assert rows and all(r["ok"] for r in rows), (delay, rows)
        assert first in [h["revision"] for h in hub.show("org/model", hub_path)["history"]], delay
        hub.load_model("org/model", hub_path)  # main always names a complete, verified revision
    hub.gc(hub_path, grace_seconds=0)
    snapshots = model_dir(hub_path) / "snapshots"
    assert not list(snapshots.glob(".*")) and not list((hub_path / ".locks").glob("*/push-*"))


def _export_child(model, output):
    from lmkit.exporting import export_model

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
        _kill_after(_export_child, (source, output), delay)
        if output.exists():  # all or nothing: a complete export loads
            GPT2LMHeadModel.from_pretrained(output)
            assert (output / "tokenizer.json").is_file(), delay
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f"export-{i}")] in ([], [f"export-{i}"])


@pytest.mark.slow
def test_training_killed_at_random_points_keeps_only_complete_checkpoints(tmp_path, fixtures, hub_path):
    from safetensors.torch import load_file

    from lmkit.run_dir import RunDir

    recipe = tmp_path / "run.yaml"
    recipe.write_text(TINY_RUN.format(corpus=fixtures / "zh-poetry.jsonl", hub=hub_path, out=tmp_path / "run")
                      .replace("save_steps: 2", "save_steps: 1").replace("push: end", "push: never"))
    rng = random.Random(13)
    run = RunDir(tmp_path / "run")
    for attempt in range(2):
        process = subprocess.Popen([*LMKIT, "train", str(recipe), *(["--resume"] if attempt else [])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not any(run.path.glob("checkpoint-*")):  # killed somewhere among the checkpoint saves
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))
        process.kill()
        process.wait()
        for checkpoint in run.complete_checkpoints():
            load_file(str(checkpoint / "model.safetensors"))
            json.loads((checkpoint / "trainer_state.json").read_text())
    finished = run_cli("train", recipe, "--resume")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert run.is_finished and not run.incomplete_checkpoints()
    load_file(str(run.path / "model.safetensors"))


def test_which_recipe_changes_resume_allows():
    from lmkit import resume

    before = {"data": {"files": ["a.txt"], "num_proc": None, "block_size": 64}, "model": {"n_embd": 16},
              "training": {"output_dir": "runs/x", "max_steps": 10, "seed": 1}, "hub": {"push": "never"}}
    after = {"data": {"files": ["moved/a.txt"], "num_proc": 4, "block_size": 64},
             "model": {"n_embd": 16, "n_layer": 2}, "training": {"output_dir": "/abs/runs/x", "max_steps": 20,
                                                                 "seed": 1, "logging_steps": 500},
             "hub": {"push": "end"}}
    changes = resume.recipe_changes(before, after)
    # Keys absent from one side mean their defaults: logging_steps 500 is TrainingArguments' default.
    assert set(changes) == {"data.files", "data.num_proc", "model.n_layer", "training.max_steps", "hub.push"}
    assert [key for key in changes if resume._is_immutable(key)] == ["model.n_layer"]
    assert resume._is_immutable("training.seed") and resume._is_immutable("data.block_size")
    assert not resume._is_immutable("training.eval_steps") and not resume._is_immutable("eval.bleu_samples")
