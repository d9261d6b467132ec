"""`lmkit --help` start-up time, cold processes, against the floor: a bare `python -c pass` and `import torch`.

The CLI must print usage without importing torch or transformers (seconds on a small machine). Run:
    python benchmarks/bench_cli.py [--repeats 5] [--smoke]
It prints the median wall time of each command over fresh processes and the ratio to the bare interpreter.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from smoke import add_smoke

LMKIT = str(Path(sys.executable).parent / "lmkit")
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "lmkit --help": [LMKIT, "--help"],
    "lmkit train --help": [LMKIT, "train", "--help"],
    "lmkit hub show --help": [LMKIT, "hub", "show", "--help"],
    "lmkit validate --help": [LMKIT, "validate", "--help"],
}


def wall_time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    add_smoke(parser, repeats=1)
    args = parser.parse_args()
    times = {name: statistics.median(wall_time(argv) for _ in range(args.repeats)) for name, argv in COMMANDS.items()}
    floor = times["python -c pass"]
    print(f"{'command':<28} {'median s':>9} {'x bare python':>14}")
    for name, seconds in times.items():
        print(f"{name:<28} {seconds:9.3f} {seconds / floor:14.1f}")


if __name__ == "__main__":
    main()
