"""Value parsers for command-line options and --config files: one copy, used by every `loralab` command.

Each takes the text of a flag (or a value read from a JSON / TOML file: a number, a bool, a list) and returns
the parsed value, or raises argparse.ArgumentTypeError with a message that says what is valid; argparse
prints it after the flag's name (`argument --r: expected a positive integer, got 0`) and exits with status 2.

A value from a file is taken as it is when it already has the right type: an integer option accepts 3 (not
3.5, not true), a number option accepts 3 or 3.5 (not true), a list option accepts ["q_proj", "v_proj"].
This module imports nothing but the standard library, so building the parser of any command stays light.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["positive_int", "nonnegative_int", "integer", "positive_float", "nonnegative_float", "finite_float",
           "fraction", "int_list", "index_list", "target_list", "name_list", "pattern_map", "bool_or_choice", "checked"]


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None


def _float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected {what} (finite), got {value!r}")
    return number


def integer(value) -> int:
    """Any integer: '-3', '0', 7."""
    return _int(value, "an integer")


def positive_int(value) -> int:
    """An integer >= 1."""
    number = _int(value, "a positive integer")
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


def nonnegative_int(value) -> int:
    """An integer >= 0."""
    number = _int(value, "a non-negative integer")
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {number}")
    return number


def finite_float(value) -> float:
    """Any finite number: '-1.5', '2e-4', 3."""
    return _float(value, "a number")


def positive_float(value) -> float:
    """A finite number > 0, such as a learning rate."""
    number = _float(value, "a positive number such as 2e-4")
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number such as 2e-4, got {value!r}")
    return number


def nonnegative_float(value) -> float:
    """A finite number >= 0."""
    number = finite_float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {number}")
    return number


def fraction(value) -> float:
    """A number in [0, 1), such as a dropout probability."""
    number = _float(value, "a number in [0, 1)")
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}")
    return number


def int_list(value) -> tuple[int, ...]:
    """'1,2,4' (or a list [1, 2, 4]) -> (1, 2, 4); every entry a positive integer."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return tuple(positive_int(p.strip() if isinstance(p, str) else p) for p in parts)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,2,4: {e}") from None


def index_list(value) -> tuple[int, ...]:
    """'0,1,5' (or a list [0, 1, 5], or one number 3) -> (0, 1, 5); every entry an integer >= 0 (layer indices)."""
    parts = value if isinstance(value, (list, tuple)) else [value] if isinstance(value, int) else str(value).split(",")
    try:
        return tuple(nonnegative_int(p.strip() if isinstance(p, str) else p) for p in parts)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,1,5: {e}") from None


def name_list(value) -> tuple[str, ...]:
    """Module names 'classifier, pooler' (or a list ["classifier", "pooler"]) -> ('classifier', 'pooler')."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = tuple(n for n in (v.strip() for v in value) if n)
    else:
        names = tuple(n for n in (v.strip() for v in value.split(","))) if isinstance(value, str) else ()
    if not names or not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated module names like classifier,pooler, got {value!r}")
    return names


def pattern_map(number: Callable) -> Callable:
    """A parser of {module-name regex: number}: 'q_proj=8,v_proj=4' (or a mapping {"q_proj": 8}), each
    number read by `number` (e.g. positive_int), such as LoraConfig's rank_pattern."""
    def parse_map(value):
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, str) and value.strip():
            items = [part.split("=", 1) if "=" in part else (part, None) for part in value.split(",")]
        else:
            items = None
        if not items or any(v is None or not str(k).strip() for k, v in items):
            raise argparse.ArgumentTypeError(f"expected name=number pairs like q_proj=8,v_proj=4, got {value!r}")
        return {str(k).strip(): number(v.strip() if isinstance(v, str) else v) for k, v in items}
    parse_map.__name__ = "pattern_map"
    return parse_map


def bool_or_choice(*names: str) -> Callable:
    """A parser of True / False (true, false, yes, no, 1, 0 as text) or one of `names`, e.g. init_lora_weights."""
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

    def parse_choice(value):
        if isinstance(value, bool) or value in names:
            return value
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        raise argparse.ArgumentTypeError(f"expected true, false or one of {', '.join(names)}, got {value!r}")
    parse_choice.__name__ = "choice"
    return parse_choice


def target_list(value) -> str | tuple[str, ...]:
    """'all-linear', or module names 'q_proj, v_proj' (or a list ["q_proj", "v_proj"]) -> ('q_proj', 'v_proj')."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = tuple(n for n in (v.strip() for v in value) if n)
    elif isinstance(value, str):
        names = tuple(n for n in (v.strip() for v in value.split(",")) if n)
    else:
        names = ()
    if not names:
        raise argparse.ArgumentTypeError(f"expected 'all-linear' or comma-separated module names like "
                                         f"q_proj,v_proj, got {value!r}")
    return "all-linear" if names == ("all-linear",) else names


def checked(parse: Callable) -> Callable:
    """An option parser from a function that raises ValueError with a message (e.g. estimate.parse_bytes)."""
    def parse_option(value):
        try:
            return parse(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse_option.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in some messages
    return parse_option
