"""`python -m lmkit ...` (and `accelerate launch -m lmkit ...`) run the CLI."""

import sys

from lmkit.cli import main

sys.exit(main())
