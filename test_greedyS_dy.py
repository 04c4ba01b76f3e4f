"""Dynamic-tree speculative decoding: each step the draft grows its tree best-first under a node budget
(EAGLE-2, arXiv 2406.16858; the original project's test_greedyS_dy.py) and the target verifies the whole tree
in one forward pass. Flags, modes and result files are those of test_greedyS.py, plus the tree's budget,
width, depth and score; the per-prompt results record each step's tree shape (nodes per depth).

Example (the original's command: --growmap only sets the default budget and depth, here 64 nodes and 6):
  python test_greedyS_dy.py --model JackFram/llama-68m --target meta-llama/Llama-2-7b-hf --T 0.6 --P 0.9 \
      --start 0 --end 200 --Mode greedy --M 1024 --growmap ./growmaps/68m_7b-64.pt --dataset cnn --W 8
"""
from __future__ import annotations

import argparse

from engine.dynamic_drafter import SCORES, DynamicTreeDrafter, check_score
from engine.verifiers import SAMPLED_CHILDREN
from utils.cli import decoding_parser, run_cli, validate_common
from utils.config import DEFAULTS, tree_limits
from utils.distributed.offload import target_loader
from utils.distributed.processes import start_processes
from utils.errors import UserError
from utils.experiment import execute


def validate_tree_flags(args: argparse.Namespace) -> None:
    if args.B < 2:
        raise UserError(f"--B must be >= 2 (the root and one drafted node), got {args.B}")
    if args.W < 1:
        raise UserError(f"--W must be >= 1, got {args.W}")
    if args.D < 1:
        raise UserError(f"--D must be >= 1, got {args.D}")
    verifier = "greedy" if args.T == 0 else args.verify
    try:
        check_score(args.score, SAMPLED_CHILDREN[verifier])
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def main() -> None:
    parser = decoding_parser(__doc__, "test_greedyS_dy", ", with tree_shapes")
    parser.add_argument("--growmap", default=DEFAULTS.growmap,
                        help="accepted for the original's commands: only supplies the default --B and --D (its size "
                             "and depth)")
    parser.add_argument("--B", type=int, default=None,
                        help=f"node budget, root included (default: the --growmap's size; {DEFAULTS.B} for the default)")
    parser.add_argument("--W", type=int, default=DEFAULTS.W, help="children per expanded node, nodes expanded per level")
    parser.add_argument("--D", type=int, default=None,
                        help=f"depth limit, draft forwards per step (default: the --growmap's depth; {DEFAULTS.D} for "
                             "the default)")
    parser.add_argument("--score", default=DEFAULTS.score, choices=SCORES,
                        help="logprob = cumulative draft log-probability (EAGLE-2); original = the original's "
                             "depth-weighted cumulative logit (not with --verify specinfer)")
    args = parser.parse_args()
    validate_common(args)
    processes = start_processes(args.device)
    args.B, args.D = tree_limits(args.growmap, args.B, args.D)
    validate_tree_flags(args)
    args.record_shapes = True
    meta = {"dynamic_tree": {"budget": args.B, "width": args.W, "max_depth": args.D, "score": args.score}}
    slots = DynamicTreeDrafter.slots_for(args.B, args.W, args.D)
    execute(args, "test_greedyS_dy",
            lambda pair, sampling, sample_children: DynamicTreeDrafter(pair.draft, sampling, sample_children, args.B,
                                                                       args.W, args.D, args.score),
            slots, meta, processes, target_loader(args, processes.device or args.device))


if __name__ == "__main__":
    run_cli(main)
