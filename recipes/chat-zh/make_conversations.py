"""Conversations about Tang poems, for recipes/chat-zh: a jsonl of {"messages": [...], "group": poem} records.

    python recipes/chat-zh/make_conversations.py [--fortunes /usr/share/games/fortunes/tang300] [--output PATH]

Each poem of the fortune file (Debian package fortunes-zh: entries separated by `%` lines, a title line 《…》, an
author line 作者：…, then the poem) gives three conversations: a request naming the poem's title and poet answered
with the poem; the poem answered with its poet and title; and a two-exchange conversation (recite it, then who wrote
it). A seeded third of them open with a system message. The group is the poem, so a poem's three conversations stay
on one side of the train/test split. `make chat-data` writes data/chat-zh.jsonl with it; tests/fixtures/zh-chat.jsonl
was made by the same functions from tests/fixtures/zh-poetry.jsonl.
"""

import argparse
import json
import random
import re
from pathlib import Path

TANG300 = Path("/usr/share/games/fortunes/tang300")
SYSTEM = "你是一位熟悉唐诗的助手。"
# Poems up to this many characters (newlines included): an eight-line 七律 is 71, so with the chat template's text
# every conversation fits the 128 positions of the demo model (recipes/quickstart-zh).
MAX_CHARS = 72
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_poems(path: Path) -> list[dict]:
    """{title, author, text} of each entry of a fortune file of poems (ANSI colours out)."""
    text = _ANSI.sub("", path.read_text(encoding="utf-8"))
    poems = []
    for entry in re.split(r"(?m)^%\s*$", text):
        lines = [line.strip() for line in entry.strip().splitlines() if line.strip()]
        if len(lines) >= 3:
            poems.append({"title": lines[0], "author": lines[1], "text": "\n".join(lines[2:])})
    return poems


def _name(poem: dict) -> tuple[str, str]:
    """(title without 《》, poet without the 作者： prefix)."""
    title = poem["title"].split(":", 1)[-1].strip().strip("《》")
    author = re.sub(r"^作者[:：]", "", poem["author"]).split("（")[0].strip()
    return title, author


def conversations(poems: list[dict], seed: int = 0, max_chars: int | None = None) -> list[dict]:
    """Three conversations per poem (see the module docstring), a seeded third with a system message; poems longer
    than `max_chars` characters are left out."""
    rng = random.Random(seed)
    records = []
    for poem in poems:
        if max_chars is not None and len(poem["text"]) > max_chars:
            continue
        title, author = _name(poem)
        group = f"{author}《{title}》"
        recite = [{"role": "user", "content": f"请背诵{author}的《{title}》。"},
                  {"role": "assistant", "content": poem["text"]}]
        name_it = [{"role": "user", "content": f"这首诗的作者和题目是什么？\n{poem['text']}"},
                   {"role": "assistant", "content": f"这是{author}的《{title}》。"}]
        two_turns = [{"role": "user", "content": f"请背诵《{title}》。"},
                     {"role": "assistant", "content": poem["text"]},
                     {"role": "user", "content": "这首诗是谁写的？"},
                     {"role": "assistant", "content": f"{author}。"}]
        for messages in (recite, name_it, two_turns):
            if rng.random() < 1 / 3:
                messages = [{"role": "system", "content": SYSTEM}] + messages
            records.append({"messages": messages, "group": group})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    print(f"{path}: {len(records)} conversations")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fortunes", type=Path, default=TANG300, help="the poems (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("data/chat-zh.jsonl"), help="default: %(default)s")
    parser.add_argument("--max-chars", type=int, default=MAX_CHARS,
                        help="leave out longer poems (default: %(default)s, up to the eight-line 律诗)")
    args = parser.parse_args()
    if not args.fortunes.is_file():
        raise SystemExit(f"{args.fortunes} is missing: run `make corpora` (installs the Debian package fortunes-zh)")
    write_jsonl(args.output, conversations(read_poems(args.fortunes), max_chars=args.max_chars))


if __name__ == "__main__":
    main()
