"""Answer extraction for multiple-choice replies (SPEC 7)."""

from __future__ import annotations

import re

LETTERS = "ABCDEFGH"
# A letter stands alone where no word character touches it but a Chinese, Japanese or Korean one: not \b, for which
# those are word characters too, so that "答案是B" (the answer is B) would name no option. Accented Latin, Greek,
# Cyrillic or Vietnamese letters are word characters ("Día", "chạy" hold no letter D or C of their own).
_WORD = r"[^\W\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"


def _alone(needle: str) -> str:
    """A pattern of `needle` as a whole word of the reply: at an end that is not Chinese, Japanese or Korean, no
    other word character may touch it but those (English option text within a Chinese reply stands alone); at a
    Chinese end, no word character at all, so that the option 是 (yes) is not found in 不是 (is not)."""
    before = f"(?<!{_WORD})" if re.fullmatch(_WORD, needle[0]) else r"(?<!\w)"
    after = f"(?!{_WORD})" if re.fullmatch(_WORD, needle[-1]) else r"(?!\w)"
    return before + re.escape(needle) + after


_OPTION = re.compile(r"^\s*\(?([A-H])[\).:]\s*(.+?)\s*$")


def parse_options(prompt: str) -> list[str]:
    """Option texts listed in a prompt as lines like '(A) red' or 'A. red', in letter order."""
    options = []
    for line in prompt.splitlines():
        if len(options) == len(LETTERS):  # H is the last letter
            break
        match = _OPTION.match(line)
        if match and match.group(1) == LETTERS[len(options)]:
            options.append(match.group(2))
    return options


def _named(lower: str) -> str:
    """After "option": a letter; "a" only where it ends a clause ("the best option a hiker has" is the article)."""
    named = [rf"([{lower[1:]}])\b"] if len(lower) > 1 else []
    return "(?:" + "|".join([*named, r"(a)(?=\s*(?:[.,;:!)]|$))"]) + ")"


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s%]", " ", text.lower()).split())


def parse_choice(reply: str, options: list[str]) -> str | None:
    """The chosen letter: the first option letter in the reply (after removing the word 'answer'), else the
    option whose text appears in the reply, else None (counted as unparsed, never guessed).

    A reply that is one option's whole text names that option first, whatever letters it holds (EgoSchema's
    options read "C picks up ...", C being the camera wearer). A lowercase letter names an option alone ("b",
    "(c)."), in parentheses, after "option" or ending the reply after "is" ("the answer is b."); within words it
    does not ("a dog"). A capital letter next to Chinese characters stands alone ("答案是B"), as does an option's
    English text; an option's Chinese text must not touch other Chinese text (是, yes, is not in 不是). An option's
    text (less a final period) appears only as whole words ("no" is not in "know", "1" not in "10"), and an
    occurrence inside a longer option's occurrence does not count ("red" in "dark red"); two options left: unparsed."""
    whole = [letter for letter, option in zip(LETTERS, options, strict=False) if _plain(option) == _plain(reply)]
    if len(whole) == 1 and len(_plain(reply)) > 1:  # a lone letter is a letter ("(B)"), whatever an option reads
        return whole[0]
    letters = LETTERS[: len(options)] or LETTERS
    lower = letters.lower()
    text = re.sub(r"answer", "", reply, flags=re.IGNORECASE)
    match = (
        re.search(rf"(?<!{_WORD})([{letters}])(?!{_WORD})", text)
        or re.fullmatch(rf"\W*([{lower}])\W*", text)
        or re.search(rf"\(([{lower}])\)|\boption\s+{_named(lower)}|\bis:?\s+([{lower}])\W*$", text, re.IGNORECASE)
    )
    if match:
        return next(group for group in match.groups() if group).upper()
    lowered = reply.lower()
    spans = {}
    for letter, option in zip(LETTERS, options, strict=False):
        # less a final period: Video-MME's options end their sentence, where a reply may go on
        needle = option.strip().rstrip(".").rstrip().lower()
        if needle:
            found = [m.span() for m in re.finditer(_alone(needle), lowered)]
            if found:
                spans[letter] = found
    covered = [(start, end) for found in spans.values() for start, end in found]

    def inside_another(start: int, end: int) -> bool:
        return any(a <= start and end <= b and (a, b) != (start, end) for a, b in covered)

    hits = [letter for letter, found in spans.items() if not all(inside_another(*span) for span in found)]
    return hits[0] if len(hits) == 1 else None
