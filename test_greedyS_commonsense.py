"""Common-sense token verification on static trees: a follower table (the ids that most often follow each
token id) used two ways, each run beside the plain tree on the same prompts. `--commonsense substitute` is the
original project's rule (LOSSY: when no child carries the target's token but that token commonly follows the
node's token, the first child's token is overwritten and accepted); `augment` grafts the followers as extra
children before verification (lossless); `all` (the default) runs plain, substitute, augment and the plain tree
of augment's node count, and prints them side by side with their quality figures against the target alone.

Example (the original's flags; its Llama-2 table with a Llama-2-tokenizer pair):
  python test_greedyS_commonsense.py --model JackFram/llama-68m --target meta-llama/Llama-2-13b-hf --T 0 \\
      --start 0 --end 200 --Mode greedy --M 1024 --growmap ./growmaps/68m_7b-64.pt --dataset cnn \\
      --followers ../shared/original/sorted_followers_top12.txt --commonsense substitute
"""
from __future__ import annotations

import argparse

from engine.commonsense import FollowerAugmentDrafter, SubstituteVerifier
from engine.drafters import StaticTreeDrafter
from engine.growmap import load_growmap
from engine.sampling import Sampling
from utils.cli import OneLineParser, decoding_parser, run_cli, validate_common
from utils.commonsense.runs import VARIANTS, plan_runs, side_by_side
from utils.commonsense.table import default_followers, load_followers, target_vocab_size
from utils.config import DEFAULTS
from utils.errors import UserError
from utils.distributed.offload import target_loader
from utils.experiment import execute, load_text_prompts, sampled_children
from utils.original_flags import draft_top_p, report_ignored, static_tree_reasons
from utils.report import emit
from utils.run_log import new_run

SCRIPT = "test_greedyS_commonsense"


def validate(args: argparse.Namespace, tree_size: int) -> None:
    if args.augment < 1 or args.augment_width < 1:
        raise UserError(f"--augment and --augment-width must be >= 1, got {args.augment} and {args.augment_width}")
    nodes = -(-args.augment // args.augment_width)
    if nodes > tree_size:
        raise UserError(f"--augment {args.augment} at --augment-width {args.augment_width} needs {nodes} tree nodes "
                        f"to hang followers on, but the growmap has {tree_size}")
    if args.T > 0 and args.commonsense != "augment":
        raise UserError(f"--commonsense {args.commonsense} runs the substitute rule, which serves greedy "
                        "verification only: use --T 0, or --commonsense augment at T > 0")
    if args.T > 0 and args.verify == "specinfer" and args.Mode != "baseline":
        raise UserError("--commonsense augment grafts follower tokens the draft did not sample, which specinfer "
                        "verification cannot take: use --verify match")


def build_parser() -> OneLineParser:
    parser = decoding_parser(__doc__, SCRIPT, "; one file per run, and the side-by-side table")
    parser.add_argument("--followers", default=DEFAULTS.followers,
                        help="follower table: .pt (python -m utils.commonsense build) or the original's text format "
                             "(default: the table shipped for the default target)")
    parser.add_argument("--commonsense", default=DEFAULTS.commonsense, choices=VARIANTS,
                        help="substitute = the original's rule (lossy, T = 0 only); augment = followers as extra "
                             "children (lossless); all = both, plus the plain tree of augment's node count")
    parser.add_argument("--augment", type=int, default=DEFAULTS.augment,
                        help="augment: follower nodes added per step at most (counted in --M)")
    parser.add_argument("--augment-width", type=int, default=DEFAULTS.augment_width,
                        help="augment: followers per node; nodes are taken in drafting order from the root")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    validate_common(args)
    report_ignored(parser, args, static_tree_reasons(sampled_children(args)))
    growmap = load_growmap(args.growmap)
    validate(args, growmap.size)
    followers_path = args.followers or default_followers(args.target)
    followers, table_meta = load_followers(followers_path, target_vocab_size(args.target))
    base_meta = {"followers": {"path": str(followers_path), "k": followers.shape[1], "built_from": table_meta}}
    load_target = target_loader(args, args.device)
    text = load_text_prompts(args)  # once for every run, before any model loads
    if args.Mode == "baseline":
        execute(args, SCRIPT, None, growmap.size, base_meta, load_target=load_target, text=text)
        return
    references: dict[int, list[int]] = {}
    runs = plan_runs(args.commonsense, growmap, args.augment, args.augment_width)
    summaries = []
    for run in runs:
        def make_drafter(pair, sampling, sample_children, run=run):
            drafter = StaticTreeDrafter(pair.draft, run.growmap, Sampling(args.T, draft_top_p(args)), sample_children)
            return FollowerAugmentDrafter(drafter, followers, args.augment, args.augment_width) if run.extra_nodes \
                else drafter

        meta = base_meta | {"commonsense": run.name, "growmap": {"path": args.growmap, "size": run.growmap.size,
                                                                 "depth": run.growmap.max_depth,
                                                                 "nodes_per_depth": run.growmap.nodes_per_depth()},
                            "augment": {"max_nodes": run.extra_nodes, "width": args.augment_width}}
        emit(f"--- {run.name} ---")
        verifier = SubstituteVerifier(followers) if run.name == "substitute" else None
        summaries.append(execute(args, f"{SCRIPT}-{run.name}", make_drafter, run.growmap.size + run.extra_nodes,
                                 meta, load_target=load_target, verifier_override=verifier, quality=True,
                                 references=references, text=text))
    table = side_by_side(runs, summaries)
    emit("\n" + table)
    keys = ("lossless", "tree_size", "mean_accepted_tokens", "tokens_per_second", "quality", "substitutions",
            "after_substitution", "results")
    rows = [{"run": run.name, "tree_size": run.growmap.size + run.extra_nodes}
            | {key: summary[key] for key in keys if key in summary} for run, summary in zip(runs, summaries)]
    log = new_run(args.results_dir, SCRIPT, vars(args))
    path = log.finish({"script": SCRIPT, "flags": vars(args), "table": table, "runs": rows}, dict(enumerate(rows)),
                      partial=False)
    emit(f"results: {path}")


if __name__ == "__main__":
    run_cli(main)
