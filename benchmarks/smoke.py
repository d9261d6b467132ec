"""`--smoke`, which every benchmark takes: the same run at tiny sizes, in seconds, printing the same figure lines.

Nothing else runs the benchmarks, so without it they rot unseen (one stopped starting after a rename); CI runs each
with `--smoke` (tests/test_benchmarks.py). Smoke figures measure nothing: the sizes are far too small to compare.
"""

import argparse
import sys
from pathlib import Path

# Committed corpora (tests/fixtures/README.md): the benchmarks that train on a recipe's corpus read these in smoke
# mode, a few hundred KB where the Debian files are megabytes, so the data stage takes a second, not tens.
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def add_smoke(parser: argparse.ArgumentParser, **sizes) -> None:
    """Adds `--smoke` to `parser`; given it, `sizes` (option dest -> value) replace those options' defaults, so an
    option given on the command line still wins and the run takes the very code path of a full one."""
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: the check CI runs")
    if "--smoke" in sys.argv[1:]:
        parser.set_defaults(**sizes)
