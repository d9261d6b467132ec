"""The benchmarks' real text: Debian's fortune files, which `make corpora` installs (packages fortunes, fortunes-zh).

Entries of a fortune file are separated by lines holding only `%`; the Chinese files colour titles and attributions
with ANSI codes, which are stripped here. Entries are read by `lmkit.data.corpus`, which imports neither torch nor
datasets.
"""

import re
import sys
from pathlib import Path

from lmkit.data.corpus import iter_documents

FORTUNES = Path("/usr/share/games/fortunes")
# Every English file of the packages fortunes and fortunes-min (~3.1 MB, ~15,000 entries).
ENGLISH = ["art", "ascii-art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education",
           "ethnic", "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie",
           "literature", "love", "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum", "people",
           "perl", "pets", "platitudes", "politics", "pratchett", "riddles", "science", "songs-poems", "sports",
           "startrek", "tao", "translate-me", "wisdom", "work", "zippy"]
# fortunes-zh: modern sayings and quotations (~2 MB, ~5,300 entries), and 300 Tang poems + 100 Song ci.
CHINESE_QUOTES = ["chinese"]
CHINESE_POEMS = ["tang300", "song100"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def require(names: list[str]) -> list[Path]:
    """The paths of these fortune files; exits with status 2 and says what to install when one is missing."""
    paths = [FORTUNES / name for name in names]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        print(f"{missing[0]} is missing: the benchmarks read the Debian packages fortunes and fortunes-zh.\n"
              "  run: make corpora   (as root; otherwise: sudo apt-get install fortunes fortunes-zh)",
              file=sys.stderr)
        sys.exit(2)
    return paths


def documents(names: list[str]) -> list[str]:
    """The entries of these fortune files, in order, read as a recipe with `doc_separator: "%"` reads them (lmkit's own
    reader), with the ANSI colour codes of some attribution lines taken out."""
    return [_ANSI.sub("", text) for text in iter_documents([str(p) for p in require(names)], doc_separator="%")]
