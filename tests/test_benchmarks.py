"""Every benchmark still runs: `benchmarks/bench_*.py --smoke` (tiny sizes, seconds) exits 0 and prints its figures.

Nothing else runs the benchmarks, and the README's figures come from them; one stopped starting after a rename and
nobody noticed. The smoke figures are not checked against anything (the sizes are far too small to compare), only
that each line a full run is read for is there, with numbers in it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((REPO / "benchmarks").glob("bench_*.py"))
NUMBER = r"\d+(?:\.\d+)?"
# The lines each benchmark is run for (its ratio or figure), as regular expressions matched against whole lines.
FIGURES = {
    "bench_budget.py": [rf"\| {load} \| {NUMBER} s \| {NUMBER} s \| {NUMBER} \| \d+ \| (\d+|None) \| \d+ \| "
                        rf"{NUMBER} \| {NUMBER} \|" for load in ("quiet", "start")]
    + [rf"re-run of run 1's recipe\.yaml: {NUMBER} s, max \|weight difference\| = \S+"],
    "bench_cli.py": [rf"lmkit --help\s+{NUMBER}\s+{NUMBER}"],
    "bench_data.py": [rf"ratio data stage / bare \(tokens/s, incl\. reading\): {NUMBER}; "
                      rf"tokenize\+pack only vs bare: {NUMBER}"],
    "bench_export.py": [rf"{kind}\s+\w+\s+{NUMBER}\s+\S+\s+(True|False)\s+{NUMBER}"
                        for kind in ("learned", "sinusoidal", "rope")],
    "bench_giant_lines.py": [rf"{label}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}"
                             for label in (r"wall time \(s\)", r"peak anon \(MB\)")],
    "bench_model.py": [rf"train {precision} ratio lmkit/hf-gpt2: {NUMBER}" for precision in ("fp32", "bf16")]
    + [rf"generate ratio lmkit/hf-gpt2: {NUMBER}"],
    "bench_serve.py": [rf"lmkit serve vs in-process one-at-a-time generate: \d+ clients {NUMBER}x.*",
                       rf"lmkit serve with logprobs 5, \d+ clients: {NUMBER}x the throughput of plain requests.*",
                       rf"lmkit serve beside 2 abusive clients, \d+ normal ones: {NUMBER}x their throughput.*"],
    "bench_sizing.py": [rf"\| en \| \w+ \| \*\*{NUMBER} \(\d+ steps\)\*\* \|.*"],
    "bench_task.py": [rf"{method}: BLEU {NUMBER} = {NUMBER} x the base model's .*" for method in ("full", "lora")],
    "bench_tokenizer.py": [rf"\s*lmkit / bare time ratio: {NUMBER}  \(target < 1\.15\)"],
    "bench_training.py": [rf".* = {NUMBER} training steps", rf"\[2\] tokens/s, .* ratio 2p/1p {NUMBER}"],
}


@pytest.mark.slow
# One worker runs them one after another (`make test` distributes with --dist loadgroup): each takes every core, and
# two side by side would break the budgeted ones, whose smoke budgets fit a machine shared with ordinary tests only.
@pytest.mark.xdist_group("benchmarks")
@pytest.mark.parametrize("script", BENCHMARKS, ids=[path.name for path in BENCHMARKS])
def test_benchmark_smoke(script, tmp_path):
    assert script.name in FIGURES, f"{script.name}: add the lines it is run for to FIGURES"
    # What the benchmarks write goes to temporary directories (tempfile, $HF_DATASETS_CACHE, $LMKIT_HUB): here all of
    # it lands under tmp_path (conftest points the caches and the hub there too), none of it in the repository.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script), "--smoke"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{script.name} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    lines = done.stdout.splitlines()
    for figure in FIGURES[script.name]:
        assert any(re.fullmatch(figure, line) for line in lines), f"no line matches {figure!r}:\n{done.stdout[-3000:]}"


def test_every_benchmark_has_its_figures_listed():
    # The slow test above fails for an unlisted benchmark only in CI; this says so in `make test-fast` as well.
    assert sorted(FIGURES) == [path.name for path in BENCHMARKS]


def test_the_sizing_table_takes_each_rungs_best_weight_decay(monkeypatch):
    """`bench_sizing.py --weight-decays 0.1,0.3`: every rung runs at each, and the size grid's table compares the
    automatic run with each rung's best (the automatic run chooses its weight decay, the rungs are given one)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_sizing

    jobs = bench_sizing.jobs(["en"], ["5m"], ["0.3M", "0.8M"], side=False, weight_decays=[0.1, 0.3])
    assert [(job["rung"], job["wd"]) for job in jobs] == [("0.3M", 0.1), ("0.3M", 0.3), ("0.8M", 0.1), ("0.8M", 0.3)]
    assert "wd" not in bench_sizing.jobs(["en"], ["5m"], ["0.3M"], side=False)[0], "the rung's own by default"

    def row(rung, wd, bits):
        return {"grid": "size", "corpus": "en", "budget": "5m", "rung": rung, "wd": wd, "bits_per_byte": bits,
                "steps": 100}

    auto = {"grid": "auto", "corpus": "en", "budget": "5m", "bits_per_byte": 2.1,
            "model": {"n_layer": 4, "n_head": 4, "n_embd": 128}}
    table = bench_sizing.table([row("0.3M", 0.1, 2.2), row("0.3M", 0.3, 2.0), row("0.8M", 0.1, 2.05),
                                row("0.8M", 0.3, 2.3), auto])
    line = next(line for line in table.splitlines() if line.startswith("| en | 5m |"))
    assert "**2.000 (100 steps, wd 0.3)**" in line and "2.050 (100 steps, wd 0.1)" in line
    assert "2.200" not in line and "2.300" not in line and line.endswith("| 2.100 (0.8M) | 1.050 |")
