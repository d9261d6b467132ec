"""The README is the contract: every command it shows runs, in order, in a fast form.

Training commands get overrides appended that shorten them (a later override wins); everything else runs as written.
The commands run in a scratch directory laid out like the repository (recipes/, tokenizer_training/), with the hub in
a temporary directory ($LMKIT_HUB); make targets run in the repository. The tour reads the Debian corpora that
`make corpora` installs (`make test` calls it first).
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port  # tests/ is on sys.path under pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FORTUNES = Path("/usr/share/games/fortunes")
# A recipe's own time budget is dropped (a command's `--time` is shortened instead, see fast_form), so max_steps holds.
FAST_TRAINING = ["training.max_steps=4", "training.eval_steps=2", "training.save_steps=4", "training.logging_steps=2",
                 "eval.bleu_samples=4", "training.report_to=none", "budget.time=null"]


def readme_blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def readme_commands() -> list[str]:
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def fast_form(command: str) -> list[str]:
    argv = shlex.split(command)
    tool = argv[0]
    trains_a_model = "train" in argv and (tool != "lmkit" or argv[1] == "train")  # not `lmkit tokenizer train`
    if tool in ("lmkit", "accelerate", "torchrun", "lm_eval"):
        argv[0] = str(BIN / tool)
    if trains_a_model and "--time" in argv:
        # the budget fixes the step count: a shorter budget (one that still fits the tour corpus's data stage and
        # evaluation on a loaded machine), and the overrides before the option (argparse)
        at = argv.index("--time")
        argv[at + 1] = "60s"
        argv[at:at] = FAST_TRAINING
    elif trains_a_model:
        argv += FAST_TRAINING
    if argv[1:3] == ["tokenizer", "train"]:
        argv += ["max_chars=400000"]
    if argv[1:2] == ["eval"]:
        argv += ["--num-samples", "4"]
    return argv


README_SERVER = "127.0.0.1:8000"  # where the README's curl and openai examples reach `lmkit serve`


def start_readme_server(argv: list[str], cwd: Path, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """Start the README's `lmkit serve` in the background on a free port; return it and its host:port."""
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen([*argv, "--port", address.split(":")[1]], cwd=cwd, env=env, stdout=open(log, "w"),
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{address}/health", timeout=2) as response:
                if response.status == 200:
                    return process, address
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"README command did not start serving: {shlex.join(argv)}\n{log.read_text()[-3000:]}")


def test_readme_shows_the_two_setup_commands_first():
    commands = readme_commands()
    assert commands[:2] == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci, "CI runs the README's test command"


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("recipes", "tokenizer_training", "data"):  # data/: what `make chat-data` writes in the repository
        (work / name).symlink_to(REPO / name)
    missing = [name for name in ("computers", "chinese", "tang300") if not (FORTUNES / name).is_file()]
    if missing:
        pytest.fail(f"the README tour reads the Debian fortune files, {FORTUNES}/{missing[0]} is missing: run "
                    f"`make corpora` (as root) or `sudo apt-get install fortunes fortunes-zh`")
    env = {**os.environ, "LMKIT_HUB": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    env.pop("CI", None)
    env.pop("LMKIT_API_KEY", None)
    # `lmkit serve` runs in the background from where the README starts it until the end, on a free port that
    # replaces the README's 127.0.0.1:8000 in the commands and snippets after it
    server, address = None, README_SERVER
    try:
        for command in readme_commands():
            if command == "make test":
                continue  # this test is part of it
            if command.startswith("vllm "):
                continue  # serving an export with vLLM needs vLLM and a GPU, neither an lmkit dependency; test_export
                # checks that the exports load as the stock classes vLLM serves
            if command == "make demo":
                demo_args = " ".join(FAST_TRAINING + ["eval.bleu_samples=4"])
                argv = ["make", "-C", str(REPO), "demo", f"DEMO_RUN={tmp_path / 'demo-run'}", f"DEMO_ARGS={demo_args}"]
                cwd = REPO
            elif command.startswith("make "):
                argv, cwd = ["make", "-C", str(REPO), *shlex.split(command)[1:]], REPO
            else:
                argv, cwd = fast_form(command.replace(README_SERVER, address)), work
            if argv[1:2] == ["serve"]:
                assert server is None, "the README starts one server"
                server, address = start_readme_server(argv, cwd, env, tmp_path / "serve.log")
                continue
            done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, (f"README command failed: {command}\n"
                                          f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            if command == "make demo":
                assert "three continuations" in done.stdout
                assert "lmkit serve demo/zh-char" in done.stdout
            if argv[0] == "curl":
                answered = "data: {" in done.stdout or '"choices"' in done.stdout
                assert answered and '"error"' not in done.stdout, f"{command}\n{done.stdout[-2000:]}"

        for snippet in readme_blocks("python"):
            done = subprocess.run([sys.executable, "-c", snippet.replace(README_SERVER, address)], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"README snippet failed:\n{snippet}\n{done.stderr[-3000:]}"
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                raise
    if server is not None:
        assert code == 0, ("lmkit serve did not exit cleanly on SIGTERM:\n"
                           f"{(tmp_path / 'serve.log').read_text()[-3000:]}")
