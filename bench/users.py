"""Simulated users for `bench/loop.py`: each a hidden preference written as a small function.

A user sees a reply and returns (liked, reasons), using the page's own reason chips. As people
do, a user states a reason only when the case is clear-cut (far over a length limit, a long
reply without anything it wants, what it wants there twice) and gives a bare thumb otherwise.
Some users also regenerate and pick the reply they like best. The concise user's word limit is
calibrated on the base model's own replies, so that the base model pleases it about a third of
the time.
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


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _factories(base_reply_lengths: list[int]) -> dict:
    return {"concise": lambda: concise(max(1, percentile(base_reply_lengths, 0.35))),
            "example": with_example, "structured": structured, "no_filler": no_filler,
            "bold": bold_terms, "tips": practical_tip}


USER_NAMES = tuple(sorted(_factories([1])))


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
