"""What users and accidents do to a hub: crafted and damaged manifests, SIGKILLs at random points of a push, full
disks, read-only dirs, edited files, umasks. Each test names the item of issue 11 it covers."""

import errno
import json
import os
import random
import stat
import time
from pathlib import Path

import pytest
from conftest import (  # tests/ is on sys.path under pytest
    KILLS,
    SPAWN,
    kill_after,
    make_read_only,
    make_source,
    one_error_line,
    run_cli,
)

from lmkit import hub
from lmkit.errors import UserError
from lmkit.hub import publish


def model_dir(hub_path: Path, name="org/model") -> Path:
    return hub_path / ("models--" + name.replace("/", "--"))


def rewrite_manifest(snapshot: Path, change) -> None:
    path = snapshot / hub.MANIFEST
    manifest = json.loads(path.read_text())
    path.chmod(0o644)
    path.write_text(json.dumps(change(manifest)))


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


# ---- 6. permissions follow the umask (atomic writes: tests/test_atomic.py) ------------------------------------------


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


# ---- 8. OS errors and damaged inputs: one error line naming the path and the cause, exit 2 ------------------------


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
    argv = ["push", make_source(tmp_path / "b", seed=1), "--name", "org/model", "--hub", hub_path]
    line = one_error_line(capsys, argv)
    assert line == f"error: {copies[2]}: No space left on device"
    assert [r["revision"] for r in hub.list_models(hub_path)] == [before.split("@")[1]]
    assert not list((model_dir(hub_path) / "snapshots").glob(".*"))  # the staging dir was removed


def test_read_only_hub_push_is_one_line(tmp_path, hub_path, monkeypatch, capsys):
    hub.push(make_source(tmp_path / "a"), "org/model", hub=hub_path)
    snapshots = model_dir(hub_path) / "snapshots"
    make_read_only(monkeypatch, snapshots)
    try:
        line = one_error_line(capsys, ["push", tmp_path / "a", "--name", "org/model", "--hub", hub_path])
    finally:
        snapshots.chmod(0o755)
    assert line.startswith(f"error: {snapshots}") and "Permission denied" in line


# ---- fault injection: SIGKILL at random points of a push --------------------------------------------------------


def _push_child(source, hub_path):
    hub.push(source, "org/model", hub=hub_path)


def test_push_killed_at_random_points_leaves_a_consistent_hub(tmp_path, hub_path):
    source = make_source(tmp_path / "run", "learned")  # learned positions: the push also exports gpt2/
    first = hub.push(source, "org/model", hub=hub_path).split("@")[1]
    started = time.monotonic()
    hub.push(source, "org/model", hub=hub_path)
    duration = time.monotonic() - started
    rng = random.Random(11)
    for _ in range(KILLS):
        delay = rng.uniform(0, duration * 1.2)
        kill_after(_push_child, (source, hub_path), delay)
        rows = hub.verify(None, hub_path)
        assert rows and all(r["ok"] for r in rows), (delay, rows)
        assert first in [h["revision"] for h in hub.show("org/model", hub_path)["history"]], delay
        hub.load_model("org/model", hub_path)  # main always names a complete, verified revision
    hub.gc(hub_path, grace_seconds=0)
    snapshots = model_dir(hub_path) / "snapshots"
    assert not list(snapshots.glob(".*")) and not list((hub_path / ".locks").glob("*/push-*"))


def test_outputs_anywhere_in_a_hub_are_refused_before_any_work(tmp_path, hub_path, fixtures, capsys):
    """Nothing but push, delete and gc writes in a hub: not a new run in the hub dir, not a made-up snapshot folder,
    not an export into a directory laid out as a hub."""
    ref = hub.push(make_source(tmp_path / "run"), "org/model", hub=hub_path)
    corpus = fixtures / "en-fortunes.jsonl"
    for argv, key in (
        (["train", "--data", corpus, "--time", "30s", "--output", hub_path / "newrun", "hub.dir=" + str(hub_path)],
         "training.output_dir"),
        (["train", "--data", corpus, "--time", "30s", "--output",
          tmp_path / "elsewhere" / "models--org--name" / "snapshots" / "x"], "training.output_dir"),
        (["export", ref, "--hub", hub_path, "--output", hub_path / "exp"], "--output"),
        (["export", ref, "--hub", hub_path, "--output", tmp_path / "other-hub" / "exp"], None),
    ):
        if key is None:  # a directory becomes a hub once it holds a model: then it is refused too
            (tmp_path / "other-hub" / "models--a--b" / "snapshots").mkdir(parents=True)
            key = "--output"
        err = one_error_line(capsys, argv)
        assert err.startswith(f"error: {key} ") and "inside the hub" in err, err
    assert not (hub_path / "newrun").exists() and not (hub_path / "exp").exists()
    assert sorted(p.name for p in hub_path.iterdir() if p.name.startswith("models--")) == ["models--org--model"]
