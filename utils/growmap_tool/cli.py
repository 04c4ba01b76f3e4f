"""The command line of `python -m utils.growmap_tool`: one subcommand per module of this package."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from engine.growmap import GrowmapError
from engine.linear_paths import LINEAR_PATHS
from utils.cli import (OneLineParser, add_cuda_graph_flag, add_model_flags, add_offload_flags, add_prompt_flags,
                       finite_float)
from utils.errors import UserError
from utils.growmap_tool.build import cmd_build
from utils.growmap_tool.draw import cmd_inspect
from utils.growmap_tool.measure import DEFAULT_DRAFT_SIZES, DEFAULT_SIZES, cmd_acceptance, cmd_latency
from utils.growmap_tool.search import cmd_search
from utils.growmap_tool.vectors import LATENCY_HELP


DESCRIPTION = ("Build, search and inspect growmaps (static tree shapes), and measure what the search needs: "
               "`python -m utils.growmap_tool <command> --help`.")


def _add_acceptance(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--acceptance", required=required, metavar="VEC",
                        help="acceptance vector, .json (list or {\"acceptance\": [...]}) or .pt (1-D tensor); "
                             "index 0 is padding, p[k] = P(k-th child accepted)")
    parser.add_argument("--drop-last", action="store_true",
                        help="drop the vector's last entry (the 'none accepted' probability in Sequoia's files)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m utils.growmap_tool", description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{build,search,inspect,acceptance,latency}")

    build = commands.add_parser("build", help="build a chain, W chains of D, a k-ary tree, or a tree from parents")
    shapes = build.add_subparsers(dest="shape", required=True, metavar="{chain,wxd,kary,parents}")
    specs = {
        "chain": ("the root and a chain of K drafted tokens", [("k", "K", "drafted tokens")]),
        "wxd": ("W chains of D tokens under the root (the original's WxD-tree)",
                [("width", "W", "chains"), ("depth", "D", "tokens per chain")]),
        "kary": ("the complete K-ary tree of depth D", [("k", "K", "children per node"), ("depth", "D", "levels below the root")]),
    }
    for name, (help_text, positionals) in specs.items():
        sub = shapes.add_parser(name, help=help_text, description=help_text)
        for dest, metavar, arg_help in positionals:
            sub.add_argument(dest, metavar=metavar, type=int, help=arg_help)
    sub = shapes.add_parser("parents", help="a tree from its parent list",
                            description="A tree from its parent list; children keep their listed order (first = rank 1).")
    sub.add_argument("parents", help='parents of nodes 1..n-1, e.g. "0,0,1,1,2" (a leading -1 for the root is allowed)')
    for sub in shapes.choices.values():
        sub.add_argument("-o", "--output", required=True, help="growmap to write (.pt); a .json record goes beside it")
        _add_acceptance(sub, required=False)

    search = commands.add_parser(
        "search", help="Sequoia's optimal tree for an acceptance vector (optionally sized for measured latencies)",
        description="Sequoia's dynamic program (arXiv 2402.12374). Without --latency: the best tree of --budget "
                    "nodes. With --latency: the budget and depth minimising time per token over the measured budgets.")
    _add_acceptance(search, required=True)
    search.add_argument("--budget", type=int, help="nodes, root included (with --latency: the largest considered; "
                                                   "default the largest measured)")
    search.add_argument("--max-depth", type=int, default=10,
                        help="at most this many levels, root included (tree depth <= MAX_DEPTH - 1); default 10")
    search.add_argument("--latency", metavar="LAT", help=LATENCY_HELP)
    search.add_argument("--draft-ms", type=finite_float,
                        help="draft growth step time in ms (overrides the latency file)")
    search.add_argument("-o", "--output", required=True, help="growmap to write (.pt); a .json record goes beside it")

    inspect = commands.add_parser("inspect", help="validate a growmap and describe it (text tree, optional PNG)")
    inspect.add_argument("file", help="growmap .pt")
    inspect.add_argument("--png", help="also draw the tree to this PNG")
    inspect.add_argument("--max-lines", type=int, default=300, help="longest text tree to print (default 300)")
    _add_acceptance(inspect, required=False)
    _add_acceptance_command(commands)
    _add_latency_command(commands)
    return parser


def _add_acceptance_command(commands) -> None:
    from utils.config import DEFAULTS

    sub = commands.add_parser(
        "acceptance", help="measure Sequoia's acceptance vector of a draft/target pair (-> search --acceptance)",
        description="Walk along the target's own continuation of each prompt (greedy at T = 0, sampled at T > 0); "
                    "at each position draw W children from the draft (top-W at T = 0, sampled without replacement "
                    "at T > 0) and apply the verification rule. acceptance[k] = fraction of positions whose k-th "
                    "child was accepted (Sequoia, arXiv 2402.12374). Writes a .pt (1-D tensor, index 0 padding, "
                    "'none accepted' dropped) and a .json record beside it; both feed search --acceptance as they are.")
    add_model_flags(sub)
    add_prompt_flags(sub)
    sub.add_argument("--T", type=finite_float, default=DEFAULTS.T, help="temperature; 0 = greedy")
    sub.add_argument("--P", type=finite_float, default=DEFAULTS.P,
                     help="top-p nucleus mass in (0, 1], used when T > 0")
    sub.add_argument("--width", type=int, default=32, help="children drafted per position (ranks measured); default 32")
    sub.add_argument("--steps-per-prompt", type=int, default=DEFAULTS.max_new_tokens,
                     help=f"continuation tokens (positions) per prompt; default {DEFAULTS.max_new_tokens}")
    sub.add_argument("-o", "--output", required=True, help="vector to write (.pt); a .json record goes beside it")


def _add_latency_command(commands) -> None:
    sub = commands.add_parser(
        "latency", help="time the target per tree size and one draft step (-> search --latency)",
        description="Time one target forward over n tree tokens after --prefix cached tokens for each n in --sizes, "
                    "and one draft growth step for each frontier in --draft-sizes; medians after warm-up "
                    "(Sequoia's hardware-aware search, arXiv 2402.12374 section 3.2). Run it on an idle machine.")
    add_model_flags(sub)
    add_cuda_graph_flag(sub)
    sub.add_argument("--sizes", default=DEFAULT_SIZES, help=f"tree sizes n (root included) to time; 1 is always "
                                                            f"added; default {DEFAULT_SIZES}")
    sub.add_argument("--draft-sizes", default=DEFAULT_DRAFT_SIZES,
                     help=f"draft frontier sizes (nodes per growth step) to time; default {DEFAULT_DRAFT_SIZES}")
    sub.add_argument("--draft-frontier", type=int, default=4,
                     help="the frontier size whose time becomes draft_step_ms (added to --draft-sizes); default 4")
    sub.add_argument("--prefix", type=int, default=128, help="committed tokens already in the cache; default 128")
    sub.add_argument("--tree", choices=("random", "chain"), default="random",
                     help="random: node i's parent uniform in 0..i-1; chain: a line (default random)")
    sub.add_argument("--repeats", type=int, default=7, help="timed runs per size (median reported); default 7")
    sub.add_argument("--warmup", type=int, default=2, help="untimed runs per size first; default 2")
    sub.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the random trees and tokens")
    sub.add_argument("--kernel", choices=LINEAR_PATHS, default=LINEAR_PATHS[0],
                     help="linear-layer kernels of both models: plain torch, onednn (weights packed once) or gguf "
                          "(float32 over a GGUF target's 4-bit blocks; engine/linear_paths.py); default plain")
    sub.add_argument("-o", "--output", required=True, help="latency profile to write (.json)")
    add_offload_flags(sub)  # a profile of the offloaded target, for search --latency


def main(argv: Sequence[str] | None = None, target_loader=None) -> int:
    """`target_loader(args, device)`: how `latency --offloading` loads the target (utils/distributed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    handlers = {"build": cmd_build, "search": cmd_search, "inspect": cmd_inspect, "acceptance": cmd_acceptance,
                "latency": lambda args, argv: cmd_latency(args, argv, target_loader)}
    try:
        handlers[args.command](args, argv)
    except (UserError, GrowmapError) as exc:
        print(f"growmap_tool: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0

