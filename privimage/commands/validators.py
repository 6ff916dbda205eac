"""argparse types shared by the commands: each value checked where it is parsed, with a message naming it.

argparse prints ``privimage CMD: error: argument --epsilon: inf is not a finite number > 0`` and exits with
code 2 when one of these raises ``ArgumentTypeError``.
"""

from __future__ import annotations

import argparse
import math
import re

__all__ = ["device", "epsilon", "non_negative_float", "positive_float", "positive_int", "rate", "seed",
           "unit_interval"]


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def epsilon(text: str) -> float:
    """A privacy budget ε: finite and > 0 (``inf`` would promise nothing)."""
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError as err:
        if text.strip().lower().lstrip("+") in ("inf", "infinity"):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0: an infinite epsilon is no privacy "
                                             f"at all") from None
        raise argparse.ArgumentTypeError(f"{err} (epsilon must be a finite number > 0)") from None


def non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not >= 0")
    return value


def unit_interval(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1)")
    return value


def rate(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def _integer(text: str, low: int, high: int, span: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text} is not an integer in {span}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1, 2 ** 53, "[1, 2**53]")


def seed(text: str) -> int:
    return _integer(text, 0, 2 ** 63 - 1, "[0, 2**63)")


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N (whether it exists is checked before anything runs: privimage.preflight)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,3})?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
    return text
