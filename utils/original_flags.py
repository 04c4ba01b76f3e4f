"""The original project's flags on every script, as its README and sweep scripts pass them.

The original's scripts all take `--model --target --dataset --growmap --start --end --T --P --DP --M --Mode --B --W
--D --decay --negative --static --offloading`. `decoding_parser` (utils/cli.py) gives every decoding script the
ones it lacks through `add_original_flags`; a flag that means nothing to a script is accepted and named in one
note line (`report_ignored`), never an argparse error. What each means here (README, "The original flags"):

  --DP        the draft's top-p: the nucleus of the draft distribution q that children are *sampled* from (only
              `--verify specinfer` at `--T > 0` samples them; top-k children ignore it). Values >= 1 leave q
              untruncated, as the original's default 1.1 did. Default: --P, the suite's behaviour before the flag.
  --B --W --D the dynamic tree's node budget, expansion width and depth limit (test_greedyS_dy.py).
  --decay     the original dynamic-tree score's decay: each path node's logit is weighted 1 - decay * depth
              (`--score original`; the original hard-codes 0.09 there, the default here; its argparse default 0.85
              was never read).
  --negative  declared by the original and handed to its tree functions, which never read it: it changes
              nothing there, so it changes nothing here either.
  --static    also never read by the original; by its name, test_greedyS_dy.py --static verifies the --growmap's
              static tree instead of growing one (the static-vs-dynamic comparison in one script). The other
              scripts' trees are already static or absent.
  --offloading  loads the target through accelerate's big-model dispatch (`utils.cli.add_offload_flags`,
              utils/distributed/offload.py).
"""
from __future__ import annotations

import argparse
import sys

from utils.config import DEFAULTS
from utils.errors import UserError
from utils.flag_types import finite_float

NEGATIVE = "the original project declared it but never read it, so it changes nothing"
STATIC_SHAPE = "static trees take their shape from --growmap"
TOP_K_CHILDREN = "children are the draft's top-k; only --verify specinfer at --T > 0 samples them from the draft"


def add_original_flags(parser: argparse.ArgumentParser) -> None:
    """--growmap --DP --B --W --D --decay --negative --static, each with its default in --help (--offloading is
    `utils.cli.add_offload_flags`)."""

    parser.add_argument("--growmap", default=DEFAULTS.growmap,
                        help="static tree shape (.pt growmap file); the dynamic tree's default --B and --D are its "
                             "size and depth. Not given, test_greedyS.py and the benchmark run the tree the "
                             "hardware-aware search picks from this machine's calibration profile (default pair on "
                             "CPU; utils/calibration)")
    parser.add_argument("--DP", type=finite_float, default=None,
                        help="draft top-p: nucleus mass of the draft distribution that children are sampled from "
                             "(--verify specinfer at --T > 0); >= 1 = no top-p on the draft, as the original's 1.1 "
                             "(default: --P)")
    parser.add_argument("--B", type=int, default=None,
                        help=f"dynamic tree: node budget, root included (default: the --growmap's size; "
                             f"{DEFAULTS.B} for the default growmap)")
    parser.add_argument("--W", type=int, default=None,
                        help=f"dynamic tree: children per expanded node, nodes expanded per level (default: {DEFAULTS.W})")
    parser.add_argument("--D", type=int, default=None,
                        help=f"dynamic tree: depth limit, draft forwards per step (default: the --growmap's depth; "
                             f"{DEFAULTS.D} for the default growmap)")
    parser.add_argument("--decay", type=finite_float, default=None,
                        help=f"dynamic tree, --score original: each path node's logit is weighted 1 - decay * depth "
                             f"(default: {DEFAULTS.decay}, the value the original's score hard-codes)")
    parser.add_argument("--negative", action="store_true",
                        help="accepted for the original's commands; the original never read it, nor does this suite")
    parser.add_argument("--static", action="store_true",
                        help="test_greedyS_dy.py: verify the --growmap's static tree instead of growing a dynamic "
                             "one; the other scripts' trees are already static or absent")


def given(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> bool:
    """Whether flag `name` was set to something other than its default."""
    return hasattr(args, name) and getattr(args, name) != parser.get_default(name)


def report_ignored(parser: argparse.ArgumentParser, args: argparse.Namespace, reasons: dict[str, str]) -> list[str]:
    """One stderr line per flag in `reasons` that was given: '--B ignored: <reason>'. Returns the lines."""
    lines = [f"--{name} ignored: {reason}" for name, reason in reasons.items() if given(parser, args, name)]
    for line in lines:
        sys.stderr.write(f"note: {line}\n")
    return lines


def draft_top_p(args: argparse.Namespace) -> float:
    """--DP, or --P when it is not given."""
    return args.P if args.DP is None else args.DP


def validate_original_flags(args: argparse.Namespace) -> None:
    """--DP must be positive (values >= 1 mean no top-p on the draft)."""
    if args.DP is not None and args.DP <= 0:
        raise UserError(f"--DP must be > 0 (values >= 1 leave the draft untruncated), got {args.DP}")


def static_tree_reasons(sample_children: bool) -> dict[str, str]:
    """What a static-tree script (test_greedyS.py and its variants) ignores."""
    reasons = {"B": STATIC_SHAPE, "W": STATIC_SHAPE, "D": STATIC_SHAPE,
               "decay": "it weights test_greedyS_dy.py's --score original; " + STATIC_SHAPE,
               "static": "this script's tree is always static", "negative": NEGATIVE}
    if not sample_children:
        reasons["DP"] = TOP_K_CHILDREN
    return reasons
