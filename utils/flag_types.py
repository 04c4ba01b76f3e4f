"""argparse value types shared by every parser (utils/cli.py and utils/original_flags.py both use them)."""
from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """argparse type for real-valued flags: nan and inf are refused at parse time (as one line, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value
