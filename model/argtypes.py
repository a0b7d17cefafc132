"""argparse `type=` checks for numeric flags, so a bad value is argparse's one-line usage error
(`error: argument --top_p: must be in (0, 1], got -1`) instead of a traceback deep in the model.

    ap.add_argument("--max_new_tokens", type=int_range(1), default=512)
    ap.add_argument("--top_p", type=float_range(0, 1, low_open=True), default=0.85)
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_range(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An int in [low, high] (either bound may be None: unbounded)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_describe(low, high, False, False)}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


def float_range(low: float | None = None, high: float | None = None, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval [low, high] (`low_open` / `high_open` exclude that end); never nan or inf."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {_describe(low, high, low_open, high_open)}, got {text}")
        return value
    parse.__name__ = "float"
    return parse


def int_multiple(step: int, low: int | None = None) -> Callable[[str], int]:
    """A whole number that is a multiple of `step` (and >= low when given)."""
    base = int_range(low)

    def parse(text: str) -> int:
        value = base(text)
        if value % step:
            raise argparse.ArgumentTypeError(f"must be a multiple of {step}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0, low_open=True)
non_negative_float = float_range(0)
port_int = int_range(1, 65535)
seed_int = int_range(0, 2**32 - 1)  # what every random generator in use (torch, numpy, random) accepts
# A MiniMind width for a freshly built model: 8 attention heads whose size is even (rotary embedding pairs).
model_width = int_multiple(16, 16)
