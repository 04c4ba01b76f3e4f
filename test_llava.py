"""Tree speculative decoding for LLaVA: image + text prompts, lossless. The target is any transformers LLaVA
(LlavaForConditionalGeneration + AutoProcessor); transformers' own image path builds the prefill's input
embeddings and the language model decodes on the suite's engine, static growmap trees or (--dynamic) the
dynamic tree of test_greedyS_dy.py. The draft is a LLaVA (its own vision tower and image prefix), a text-only
Llama-family LM with the target's tokenizer (its prefix is the prompt without the image), or the target's
feature draft. --Mode benchmark also times the target alone and transformers' generate / assisted generation.

With no --target it runs offline on a LLaVA built here from the embedded SmolLM2-135M-Instruct with a small,
random vision tower (untrained vision tower: the image content is ignored) on a few generated images.

Example (the original's pair, hub ids):
  python test_llava.py --target llava-hf/llava-1.5-7b-hf --model anthonycmu/llava-1.5-160m \\
      --image-dir ./coco/test2015 --start 0 --end 200 --T 0 --M 1024 --growmap ./growmaps/68m_7b-64.pt
"""
from __future__ import annotations

from functools import partial

from engine.drafters import StaticTreeDrafter
from engine.dynamic_drafter import DynamicTreeDrafter
from engine.growmap import load_growmap
from engine.sampling import Sampling
from utils.cli import (OneLineParser, add_decoding_flags, add_dynamic_tree_flags, add_lookup_flags, add_model_flags,
                       add_results_flags, run_cli, validate_common, validate_tree_flags)
from utils.bench.methods import hf_runner, subset_vocab_assistant
from utils.config import DEFAULTS
from utils.errors import UserError
from utils.experiment import execute, sampled_children
from utils.llava.prefill import load_llava_workload
from utils.llava.reference import TransformersMethods
from utils.original_flags import NEGATIVE, TOP_K_CHILDREN, add_original_flags, draft_top_p, report_ignored

NOT_OFFLOADED = "a LLaVA target loads whole onto --device (offloading serves the text scripts' targets)"


def parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], conflict_handler="resolve",
                           epilog="Results: <results-dir>/test_llava-<time>.json (+ .jsonl per prompt, with its "
                                  "image); the last output line is 'results: <path>'.")
    add_model_flags(parser, target_help="LLaVA target: hub id or local folder (default: SmolLM2-135M-Instruct with a "
                                        "random vision tower, built offline: the image content is ignored)",
                    draft_help="draft: a LLaVA, a text-only causal LM with the target's tokenizer, or a feature draft "
                               "folder (default: the suite's feature draft, for the default target only)")
    parser.add_argument("--image-dir", default=None,
                        help="folder of images, each decoded with --prompt (every non-hidden file, sorted); with "
                             "--dataset, where its image paths resolve (default: generated images)")
    parser.add_argument("--dataset", default=None,
                        help="a .json/.jsonl file of {image, prompt} rows or LLaVA-Instruct rows {id, image, "
                             "conversations} (e.g. the original's instruct150k_subset.json)")
    parser.add_argument("--prompt", default=DEFAULTS.llava_prompt,
                        help="prompt for --image-dir images; must hold the processor's image placeholder")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip (and report) images that are missing or unreadable instead of stopping")
    parser.add_argument("--start", type=int, default=DEFAULTS.start, help="first image/row index (inclusive)")
    parser.add_argument("--end", type=int, default=DEFAULTS.llava_end, help="last image/row index (exclusive)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed; prompt i uses seed + i")
    add_results_flags(parser)
    add_decoding_flags(parser)
    parser.set_defaults(max_new_tokens=DEFAULTS.llava_max_new_tokens)
    add_lookup_flags(parser)
    parser.add_argument("--dynamic", action="store_true", help="grow a dynamic tree each step (test_greedyS_dy.py)")
    add_original_flags(parser)  # every flag of the original's scripts; this script's own definitions follow
    add_dynamic_tree_flags(parser)
    parser.add_argument("--growmap", default=DEFAULTS.growmap,
                        help="static tree shape (.pt growmap); with --dynamic it only sets the default --B and --D")
    parser.add_argument("--offloading", action="store_true",
                        help=f"accepted for the original's commands: {NOT_OFFLOADED}")
    return parser


def ignored_reasons(args) -> dict[str, str]:
    """The original flags this run does not use, each with the reason its note line gives."""
    reasons = {"negative": NEGATIVE, "offloading": NOT_OFFLOADED,
               "static": "the tree is static unless --dynamic" if not args.dynamic else "--dynamic grows the tree"}
    if not sampled_children(args):
        reasons["DP"] = TOP_K_CHILDREN
    if not (args.dynamic and args.score == "original"):
        reasons["decay"] = "it weights --dynamic --score original only"
    return reasons


def main() -> None:
    flags = parser()
    args = flags.parse_args()
    validate_common(args)
    if args.static and args.dynamic:
        raise UserError("--static (verify the --growmap's tree) and --dynamic (grow one) contradict each other: "
                        "pass one of them")
    report_ignored(flags, args, ignored_reasons(args))
    draft_sampling = Sampling(args.T, draft_top_p(args))
    if args.dynamic:
        validate_tree_flags(args)
        args.record_shapes = True
        meta = {"dynamic_tree": {"budget": args.B, "width": args.W, "max_depth": args.D, "score": args.score}}
        size = DynamicTreeDrafter.slots_for(args.B, args.W, args.D)

        def make_drafter(pair, sampling, sample_children):
            return DynamicTreeDrafter(pair.draft, draft_sampling, sample_children, args.B, args.W, args.D, args.score,
                                      args.decay)
    else:
        growmap = load_growmap(args.growmap)
        meta = {"growmap": {"path": args.growmap, "size": growmap.size, "depth": growmap.max_depth,
                            "nodes_per_depth": growmap.nodes_per_depth()}}
        size = growmap.size

        def make_drafter(pair, sampling, sample_children):
            return StaticTreeDrafter(pair.draft, growmap, draft_sampling, sample_children)
    methods = TransformersMethods(hf_runner, subset_vocab_assistant)
    execute(args, "test_llava", make_drafter, size, meta, load=partial(load_llava_workload, methods=methods))


if __name__ == "__main__":
    run_cli(main)
