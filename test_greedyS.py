"""Static-tree speculative decoding: the draft fills the tree shape of a growmap, the target verifies the
whole tree in one forward pass. `--Mode baseline` runs the target alone on the same engine; `--Mode benchmark`
runs both, prompt by prompt, and splits each step's time into drafting, verification and bookkeeping.

Example (the original README's command, with hub models):
  python test_greedyS.py --model JackFram/llama-68m --target meta-llama/Llama-2-7b-hf --T 0.6 --P 0.9 \
      --start 0 --end 200 --Mode greedy --M 1024 --growmap ./growmaps/68m_7b-64.pt --dataset cnn
"""
from __future__ import annotations

from engine.drafters import StaticTreeDrafter
from engine.sampling import Sampling
from utils.calibration import add_calibration_flags, plan_static_run
from utils.cli import OneLineParser, decoding_parser, run_cli, validate_common
from utils.distributed.offload import target_loader
from utils.distributed.processes import start_processes
from utils.experiment import execute, load_text_prompts, sampled_children
from utils.original_flags import draft_top_p, report_ignored, static_tree_reasons


def build_parser() -> OneLineParser:
    parser = decoding_parser(__doc__, "test_greedyS")
    add_calibration_flags(parser)
    parser.set_defaults(growmap=None)  # no --growmap: the tree the calibration's search picks (utils/calibration)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    validate_common(args)
    report_ignored(parser, args, static_tree_reasons(sampled_children(args)))
    processes = start_processes(args.device)
    text = load_text_prompts(args)  # a bad dataset fails before the calibration or any model loads
    growmap, origin, kernels = plan_static_run(args, need_draft=True)  # baseline too: the plan the trees would run
    meta = {"growmap": {**origin, "size": growmap.size, "depth": growmap.max_depth,
                        "nodes_per_depth": growmap.nodes_per_depth()}}
    execute(args, "test_greedyS",
            lambda pair, sampling, sample_children: StaticTreeDrafter(
                pair.draft, growmap, Sampling(args.T, draft_top_p(args)), sample_children),
            growmap.size, meta, processes, target_loader(args, processes.device or args.device), kernels=kernels,
            text=text)


if __name__ == "__main__":
    run_cli(main)
