"""Answer extraction for multiple-choice replies (SPEC 7)."""

from __future__ import annotations

import re

LETTERS = "ABCDEFGH"
_OPTION = re.compile(r"^\s*\(?([A-H])[\).:]\s*(.+?)\s*$")


def parse_options(prompt: str) -> list[str]:
    """Option texts listed in a prompt as lines like '(A) red' or 'A. red', in letter order."""
    options = []
    for line in prompt.splitlines():
        match = _OPTION.match(line)
        if match and match.group(1) == LETTERS[len(options)]:
            options.append(match.group(2))
    return options


def parse_choice(reply: str, options: list[str]) -> str | None:
    """The chosen letter: the first option letter in the reply (after removing the word 'answer'), else the
    option whose text appears in the reply, else None (counted as unparsed, never guessed)."""
    letters = LETTERS[: len(options)] or LETTERS
    text = re.sub(r"answer", "", reply, flags=re.IGNORECASE)
    match = re.search(rf"\b([{letters}])\b", text)
    if match:
        return match.group(1)
    lowered = reply.lower()
    hits = [LETTERS[i] for i, option in enumerate(options) if option and option.lower() in lowered]
    return hits[0] if len(hits) == 1 else None
