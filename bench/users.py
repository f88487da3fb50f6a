"""Simulated users for `bench/loop.py`: each a hidden preference written as a small function.

A user sees a reply and returns (liked, reasons), using the page's own reason chips. As people
do, a user states a reason only when the case is clear-cut (far over a length limit, a long
reply without anything it wants, what it wants there twice) and gives a bare thumb otherwise.
Some users also regenerate and pick the reply they like best, and one edits: `tips_edits`
wants what `tips` wants and, on a third of the prompts, edits a reply it dislikes into one it
likes by adding a tip at its end (the page's "edit" button: a pair, the edit over the original).
The tip's words stand in for the user's own: the bench asks the serving model for a reply
ending in a tip (`edit_request`) and takes the first sentence holding a tip word from it. The
concise user's word limit is calibrated on the base model's own replies, so that the base model
pleases it about a third of the time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

FILLER = re.compile(r"^\s*(sure|great question|certainly|of course|absolutely|i'd be happy|"
                    r"i would be happy|hello|hi\b|what a|good question|thanks for)", re.I)
EXAMPLE = re.compile(r"\b(for example|for instance|e\.g\.|such as|imagine)\b", re.I)
LIST_LINE = re.compile(r"^\s*([-*•]|\d+[.)])\s+\S", re.M)
BOLD = re.compile(r"\*\*[^*\n]+\*\*")
LONG_WORDS = 100  # a reply this long without what the user wants earns a stated reason
TIP = re.compile(r"\b(tip|remember|keep in mind|note that|make sure)\b", re.I)


def words(text: str) -> int:
    return len(text.split())


@dataclass
class SimUser:
    name: str
    describe: str
    judge: Callable[[str], tuple[bool, list[str]]]
    regenerate_share: float = 0.0  # share of prompts where the user also regenerates and picks
    edit_share: float = 0.0  # share of prompts where the user edits a reply it dislikes
    edit_request: str = ""  # asks the serving model for the words the user adds in an edit
    addition: Callable[[str], str | None] | None = None  # those words, from that reply

    def edited(self, reply: str, addition: str | None) -> str | None:
        """`reply` with `addition` at its end when that makes a reply this user likes."""
        if not addition or addition.strip() in reply:
            return None
        text = f"{reply.rstrip()}\n\n{addition.strip()}"
        return text if self.judge(text)[0] else None


def concise(limit_words: int) -> SimUser:
    def judge(reply: str):
        n = words(reply)
        if 0 < n <= limit_words:
            return True, (["clear"] if n <= limit_words / 2 else [])
        return False, (["too verbose"] if n > 1.5 * limit_words else [])
    return SimUser("concise", f"likes replies of at most {limit_words} words", judge, 0.25)


def _wanted(count: int, reply: str, up: str, down: str) -> tuple[bool, list[str]]:
    """Liked when what the user wants is there (a reason when it is there twice or more);
    disliked when not (a reason when the reply is long without it)."""
    if count:
        return True, ([up] if count >= 2 else [])
    return False, ([down] if words(reply) > LONG_WORDS else [])


def with_example() -> SimUser:
    def judge(reply: str):
        return _wanted(len(EXAMPLE.findall(reply)), reply, "thorough", "not helpful")
    return SimUser("example", "likes replies with a concrete example", judge)


def structured() -> SimUser:
    def judge(reply: str):
        lines = len(LIST_LINE.findall(reply))
        return _wanted(lines // 2, reply, "clear", "bad style")  # a list: two lines or more
    return SimUser("structured", "likes replies structured as a list", judge, 0.25)


def no_filler() -> SimUser:
    def judge(reply: str):
        if not reply.strip() or FILLER.search(reply):
            return False, ["bad style"]  # blatant: always said
        return True, []
    return SimUser("no_filler", 'dislikes filler openings ("Sure!", "Great question")', judge)


def bold_terms() -> SimUser:
    def judge(reply: str):
        return _wanted(len(BOLD.findall(reply)), reply, "clear", "bad style")
    return SimUser("bold", "likes key terms in **bold** (Markdown)", judge, 0.25)


def practical_tip() -> SimUser:
    def judge(reply: str):
        return _wanted(len(TIP.findall(reply)), reply, "thorough", "not helpful")
    return SimUser("tips", 'likes a practical tip or reminder ("tip", "remember", "keep in mind", '
                           '"note that", "make sure")', judge)


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MARKER = re.compile(r"^\s*([-*•]|\d+[.)])\s+")


def tip_sentence(text: str, max_words: int = 40) -> str | None:
    """The first sentence of `text` that holds a tip word (list markers and emphasis
    dropped), if it is at most `max_words` long."""
    for line in text.splitlines():
        for sentence in SENTENCE_END.split(MARKER.sub("", line).replace("**", "").strip()):
            if TIP.search(sentence) and 3 <= words(sentence) <= max_words:
                return sentence.strip()
    return None


def tips_edits() -> SimUser:
    user = practical_tip()
    user.name = "tips_edits"
    user.describe += "; edits a third of the replies it dislikes by adding one"
    user.edit_share = 0.34
    user.edit_request = ('End your answer with one practical tip on its own line, starting '
                         'with "Tip:".')
    user.addition = tip_sentence
    return user


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _factories(base_reply_lengths: list[int]) -> dict:
    return {"concise": lambda: concise(max(1, percentile(base_reply_lengths, 0.35))),
            "example": with_example, "structured": structured, "no_filler": no_filler,
            "bold": bold_terms, "tips": practical_tip, "tips_edits": tips_edits}


USER_NAMES = tuple(sorted(_factories([1])))
RULES = tuple(n for n in USER_NAMES if n != "tips_edits")  # tips_edits reads replies as tips does


def unknown_users(names: list[str]) -> str | None:
    """A message naming the users that do not exist (None: all do), for a command line to
    refuse before it spends minutes on the base model's replies."""
    unknown = [n for n in names if n not in USER_NAMES]
    return f"unknown users {unknown}; choose from {list(USER_NAMES)}" if unknown else None


def make_users(names: list[str], base_reply_lengths: list[int]) -> list[SimUser]:
    """The users named, the concise one calibrated at the 35th percentile of base lengths."""
    if message := unknown_users(names):
        raise ValueError(message)
    factories = _factories(base_reply_lengths)
    return [factories[n]() for n in names]
