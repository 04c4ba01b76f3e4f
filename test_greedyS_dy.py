"""Dynamic-tree speculative decoding: each step the draft grows its tree best-first under a node budget
(EAGLE-2, arXiv 2406.16858; the original project's test_greedyS_dy.py) and the target verifies the whole tree
in one forward pass. Flags, modes and result files are those of test_greedyS.py, plus the tree's budget,
width, depth, score and decay; the per-prompt results record each step's tree shape (nodes per depth).
`--static` verifies the --growmap's static tree instead (test_greedyS.py's drafter), for the static-vs-dynamic
comparison in one script.

Example (the original's command: --growmap only sets the default budget and depth, here 64 nodes and 6):
  python test_greedyS_dy.py --model JackFram/llama-68m --target meta-llama/Llama-2-7b-hf --T 0.6 --P 0.9 \
      --start 0 --end 200 --Mode greedy --M 1024 --growmap ./growmaps/68m_7b-64.pt --dataset cnn --W 8
"""
from __future__ import annotations

import argparse

from engine.drafters import StaticTreeDrafter
from engine.dynamic_drafter import SCORES, DynamicTreeDrafter
from engine.growmap import load_growmap
from engine.sampling import Sampling
from utils.calibration import add_calibration_flags, choose_kernels, dynamic_step_rows, static_step_rows
from utils.cli import OneLineParser, decoding_parser, run_cli, validate_common, validate_tree_flags
from utils.config import DEFAULTS
from utils.distributed.offload import target_loader
from utils.distributed.processes import start_processes
from utils.experiment import execute, load_text_prompts, sampled_children
from utils.original_flags import NEGATIVE, TOP_K_CHILDREN, draft_top_p, report_ignored

STATIC = "--static verifies the --growmap's static tree"


def ignored_reasons(args: argparse.Namespace) -> dict[str, str]:
    """The flags this run does not use, and why."""
    reasons = {"negative": NEGATIVE}
    if not sampled_children(args):
        reasons["DP"] = TOP_K_CHILDREN
    if args.static:
        reasons |= {name: STATIC for name in ("B", "W", "D", "decay", "score")}
    elif args.score != "original":
        reasons["decay"] = "it weights --score original's logits; --score logprob has no decay"
    return reasons


def build_parser() -> OneLineParser:
    parser = decoding_parser(__doc__, "test_greedyS_dy", ", with tree_shapes")
    parser.add_argument("--score", default=DEFAULTS.score, choices=SCORES,
                        help="logprob = cumulative draft log-probability (EAGLE-2); original = the original's "
                             "depth-weighted cumulative logit (see --decay; not with --verify specinfer)")
    add_calibration_flags(parser)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    validate_common(args)
    report_ignored(parser, args, ignored_reasons(args))
    processes = start_processes(args.device)
    load_target = target_loader(args, processes.device or args.device)
    text = load_text_prompts(args)  # a bad dataset fails before the calibration or any model loads
    args.record_shapes = True
    draft_sampling = Sampling(args.T, draft_top_p(args))
    if args.static:
        growmap = load_growmap(args.growmap)
        meta = {"growmap": {"path": args.growmap, "size": growmap.size, "depth": growmap.max_depth,
                            "nodes_per_depth": growmap.nodes_per_depth()}, "static": True}
        kernels = choose_kernels(args, *static_step_rows(growmap, args.lookup), need_draft=True)
        execute(args, "test_greedyS_dy",
                lambda pair, sampling, sample_children: StaticTreeDrafter(pair.draft, growmap, draft_sampling,
                                                                          sample_children),
                growmap.size, meta, processes, load_target, kernels=kernels, text=text)
        return
    validate_tree_flags(args)
    meta = {"dynamic_tree": {"budget": args.B, "width": args.W, "max_depth": args.D, "score": args.score,
                             "decay": args.decay if args.score == "original" else None}}
    slots = DynamicTreeDrafter.slots_for(args.B, args.W, args.D)
    kernels = choose_kernels(args, *dynamic_step_rows(args.B, args.W, args.D, args.lookup), need_draft=True)
    execute(args, "test_greedyS_dy",
            lambda pair, sampling, sample_children: DynamicTreeDrafter(pair.draft, draft_sampling, sample_children,
                                                                       args.B, args.W, args.D, args.score, args.decay),
            slots, meta, processes, load_target, kernels=kernels, text=text)


if __name__ == "__main__":
    run_cli(main)
