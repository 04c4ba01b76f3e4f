"""Draft potential measured in advance: teacher-forced forwards of each draft and the target over the same
text, compared position by position (utils/potential/figures.py defines every figure). Nothing is decoded, so a
draft can be judged before any tree is tuned for it.

Per draft: potential score = mean smoothed KL(target || draft) per position, in nats (lower = stronger),
with its spread over prompts; top-1 agreement; expected acceptance of speculative sampling,
sum_x min(p, q) = 1 - TV; the target's mass outside the draft's vocabulary (subset-vocabulary drafts).
Several drafts are ranked by potential score, with the rank by expected acceptance beside it.

Example (three drafts on the default target, prompts and the target's own greedy continuations):
  python test_greedyS_logit.py --model ./draft-a ./draft-b JackFram/llama-68m --end 50 --continuations
"""
from __future__ import annotations

import argparse

from utils.cli import (OneLineParser, add_data_flags, add_model_flags, add_offload_flags, finite_float, resolve_dtype,
                       run_cli, validate_common)
from utils.config import DEFAULTS
from utils.data import prompts_from_args
from utils.distributed.offload import target_loader
from utils.distributed.processes import start_processes
from utils.errors import UserError
from utils.experiment import load_draft, load_pair
from utils.models import load_tokenizer
from utils.original_flags import NEGATIVE, add_original_flags, report_ignored
from utils.potential.report import report, score_prompts, scores_of_rows
from utils.report import emit, hardware, library_versions
from utils.run_log import check_resume, open_run, sweep

SCRIPT = "test_greedyS_logit"


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], epilog=f"Results: <results-dir>/{SCRIPT}-<time>.json "
                           "(+ .jsonl per prompt); the last output line is 'results: <path>'.")
    parser.add_argument("--model", nargs="+", default=[DEFAULTS.model],
                        help="one or more drafts: hub ids, local folders or .gguf files "
                             "(default: the suite's own draft for the target)")
    add_model_flags(parser, with_draft=False)
    add_data_flags(parser)
    add_offload_flags(parser)
    parser.add_argument("--T", type=finite_float, default=DEFAULTS.T,
                        help="temperature of the compared distributions; 0 (greedy) compares the plain softmax "
                             "(T = 1, no top-p), and top-1 agreement is then the acceptance the decoder sees")
    parser.add_argument("--P", type=finite_float, default=DEFAULTS.P,
                        help="top-p in (0, 1], applied to expected acceptance and outside mass when T > 0 "
                             "(never to the KL)")
    parser.add_argument("--M", type=int, default=DEFAULTS.M,
                        help="KV-cache slots: must hold prompt (+ continuation) tokens")
    parser.add_argument("--continuations", action="store_true",
                        help="also score the target's own greedy continuation of each prompt")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                        help="continuation length with --continuations")
    parser.add_argument("--Mode", default=DEFAULTS.Mode, help="accepted for the original's commands; nothing is "
                        "decoded here")
    add_original_flags(parser)
    return parser


NOT_DECODED = "nothing is decoded here: the potential score compares the draft's and the target's distributions"


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    validate_common(args)
    report_ignored(parser, args, {name: NOT_DECODED for name in ("Mode", "growmap", "DP", "B", "W", "D", "decay",
                                                                   "static")} | {"negative": NEGATIVE})
    names = [name for name in args.model if name is not None]
    if len(set(names)) != len(names):
        raise UserError("--model names the same draft twice")
    needed = args.prompt_len + (args.max_new_tokens if args.continuations else 0)
    if needed > args.M:
        raise UserError(f"--M {args.M} is too small: prompt ({args.prompt_len})"
                        + (f" + continuation ({args.max_new_tokens})" if args.continuations else "")
                        + f" need {needed} KV slots")


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    validate(args, parser)
    if args.resume:
        check_resume(args.resume, SCRIPT, vars(args))  # a wrong --resume fails before anything loads
    processes = start_processes(args.device)
    device = processes.device or args.device
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = load_tokenizer(args.target)
    prompts = prompts_from_args(args, tokenizer)
    pair = load_pair(args.target, None, False, dtype, device, args.M, tokenizer, target_loader(args, device))
    drafts = dict(load_draft(spec, args.target, pair.target, dtype, device, args.M) for spec in args.model)
    if len(drafts) != len(args.model):
        raise UserError("--model names the same draft twice")
    names = list(drafts)
    # opened once the data and models have loaded: a run that fails before its first prompt leaves no files
    log = processes.share(open_run(args.results_dir, args.resume, SCRIPT, vars(args)) if processes.main else None)
    header = {"script": SCRIPT, "flags": vars(args), "target": pair.target_name, "drafts": names,
              "dtype": str(dtype).removeprefix("torch."), "device": args.device, "versions": library_versions(),
              "hardware": hardware(), "seed": args.seed, "dataset": args.dataset, "range": [args.start, args.end],
              "processes": {"count": processes.world, "devices": processes.gather([device])}}

    def summary_of(rows: list[dict]) -> dict:
        if not rows:
            return {**header, "prompts": 0}
        return report(scores_of_rows(rows), names, args.T, args.P, {**header, "prompts": len(rows)})[0]

    def work(mine: list, append) -> None:
        score_prompts(mine, pair, drafts, args.T, args.P, args.max_new_tokens if args.continuations else 0, append,
                      progress=processes.main)

    swept = sweep(log, prompts, lambda prompt: prompt.index, work, summary_of, processes)
    if swept is None:
        return
    for line in report(scores_of_rows(swept[1]), names, args.T, args.P, {})[1]:
        emit(line)
    emit(f"results: {log.json_path}")


if __name__ == "__main__":
    run_cli(main)
