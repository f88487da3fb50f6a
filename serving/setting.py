"""A setting declared once: its default, its help and its allowed values, on the dataclass field.

    temperature: float = setting(0.7, "0 = greedy", low=0.0, high=2.0)

Everything else is derived from that one declaration: `check` validates a whole config object
(and `check_value` one value, with the message a user sees), `add_flags` makes the command-line
flags (help and default included), and `limits` gives a page widget its minimum and maximum.
Used by serving's `GenerationSettings`/`ServingConfig` and training's configs.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields


class SettingError(ValueError):
    """A value outside what its setting allows; the message names the setting and the range."""


@dataclass(frozen=True)
class Allowed:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the low end itself is not allowed
    high_open: bool = False
    choices: tuple | None = None
    special: tuple = ()  # values allowed besides the range (-1 for "no limit", None for "unset")

    def admits(self, value) -> bool:
        if value in self.special:
            return True
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self.low is None and self.high is None  # a number's range, not a number
        if value != value:  # NaN compares false both ways: it would pass any range
            return self.low is None and self.high is None
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high
                                      or (self.high_open and value == self.high)):
            return False
        return True

    def describe(self) -> str:
        if self.choices is not None:
            text = ", ".join(str(c) for c in self.choices)
        elif self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            text = f"{'above' if self.low_open else 'at least'} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'below' if self.high_open else 'at most'} {_num(self.high)}"
        else:
            text = "any value"
        if self.special:
            text += " (or " + ", ".join(str(s) for s in self.special) + ")"
        return text


def _num(x: float) -> str:
    return f"{x:g}"


def setting(default=MISSING, help: str = "", *, default_factory=MISSING, low=None, high=None,
            low_open: bool = False, high_open: bool = False, choices=None, special=()):
    """A dataclass field with its help text and allowed values."""
    allowed = Allowed(low, high, low_open, high_open,
                      tuple(choices) if choices is not None else None, tuple(special))
    metadata = {"help": help, "allowed": allowed}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _field(klass, name: str):
    for f in fields(klass):
        if f.name == name:
            return f
    raise KeyError(name)


def allowed(klass, name: str) -> Allowed:
    return _field(klass, name).metadata.get("allowed", Allowed())


def help_of(klass, name: str) -> str:
    return _field(klass, name).metadata.get("help", "")


def limits(klass, name: str) -> tuple[float | None, float | None]:
    """(low, high) of a numeric setting, for a page widget's min and max."""
    a = allowed(klass, name)
    return a.low, a.high


def check_value(klass, name: str, value, *, prefix: str = "", error=SettingError,
                label: str | None = None):
    """`value` if setting `name` of `klass` allows it, else `error` saying what is allowed
    (naming it `label`, a flag say, else `prefix` + `name`)."""
    a = allowed(klass, name)
    if not a.admits(value):
        raise error(f"{label or prefix + name} must be {a.describe()}, not {value!r}.")
    return value


def check(obj, *, prefix: str = "", error=SettingError):
    """`obj` (a dataclass instance) if every declared setting allows its value."""
    for f in fields(obj):
        if "allowed" in f.metadata:
            check_value(type(obj), f.name, getattr(obj, f.name), prefix=prefix, error=error)
    return obj


def add_flags(parser, klass, names: list[str], *, rename: dict[str, str] | None = None,
              defaults: dict | None = None) -> None:
    """`--name` flags for these settings of `klass`, typed from the field, with its help, its
    allowed values and its default (`defaults` where this command's differs); a flag left out
    is None (the caller keeps the default)."""
    instance = klass()
    for name in names:
        f = _field(klass, name)
        shown = (rename or {}).get(name, name)
        flag = "--" + shown.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        default = (defaults or {}).get(name, getattr(instance, name))
        if kind == "bool":
            help = f"{f.metadata.get('help', '')} (default {default})"
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help)
            continue
        a = allowed(klass, name)
        constrained = a != Allowed()
        help = f"{f.metadata.get('help', '')} (" + (f"{a.describe()}; " if constrained else "") \
            + f"default {default!r})"
        convert = {"int": int, "float": float, "str": str, "int | None": int}.get(kind, str)
        parser.add_argument(flag, dest=name, type=flag_type(convert, a), default=None, help=help,
                            choices=a.choices, metavar=shown.upper())


def flag_type(convert, a: Allowed):
    """`convert` for argparse, then the setting's allowed values: a value outside them is a
    usage error naming the flag ("argument --max-new-tokens: must be in [1, 2048], not 0"),
    where it used to reach the command as the field's name. Choices are argparse's own."""
    def parse(text: str):
        value = convert(text)  # a ValueError: argparse's "invalid int value: 'x'"
        if a.choices is None and not a.admits(value):
            raise argparse.ArgumentTypeError(f"must be {a.describe()}, not {value!r}")
        return value
    parse.__name__ = convert.__name__
    return parse


def given(args: argparse.Namespace, names: list[str]) -> dict:
    """The flags of `add_flags` the user gave: {name: value}."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
