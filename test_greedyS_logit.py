"""Draft potential measured in advance: teacher-forced forwards of each draft and the target over the same
text, compared position by position (utils/potential.py defines every figure). Nothing is decoded, so a
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
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from engine.decoder import autoregressive_generate
from engine.model import TreeModel
from engine.sampling import Sampling
from engine.tree_mask import causal_mask
from utils.cli import OneLineParser, add_data_flags, add_model_flags, resolve_dtype, run_cli, validate_common
from utils.config import DEFAULTS
from utils.data import Prompt, load_prompts
from utils.errors import UserError
from utils.experiment import ModelPair, load_draft, load_pair
from utils.models import load_tokenizer
from utils.potential import (DEFAULT_EPSILON, DraftPotential, PositionFigures, PromptFigures, distribution_sampling,
                             draft_potential, position_figures, prompt_figures, rank_drafts)
from utils.report import emit, hardware, library_versions, write_results

SCRIPT = "test_greedyS_logit"
GREEDY = Sampling(0.0, 1.0)


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], epilog=f"Results: <results-dir>/{SCRIPT}-<time>.json "
                           "(+ .jsonl per prompt); the last output line is 'results: <path>'.")
    parser.add_argument("--model", nargs="+", default=[DEFAULTS.model],
                        help="one or more drafts: hub ids, local folders or .gguf files "
                             "(default: the suite's own draft for the target)")
    add_model_flags(parser, with_draft=False)
    add_data_flags(parser)
    parser.add_argument("--T", type=float, default=DEFAULTS.T,
                        help="temperature of the compared distributions; 0 (greedy) compares the plain softmax "
                             "(T = 1, no top-p), and top-1 agreement is then the acceptance the decoder sees")
    parser.add_argument("--P", type=float, default=DEFAULTS.P,
                        help="top-p in (0, 1], applied to expected acceptance and outside mass when T > 0 "
                             "(never to the KL)")
    parser.add_argument("--M", type=int, default=DEFAULTS.M,
                        help="KV-cache slots: must hold prompt (+ continuation) tokens")
    parser.add_argument("--continuations", action="store_true",
                        help="also score the target's own greedy continuation of each prompt")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                        help="continuation length with --continuations")
    parser.add_argument("--Mode", default=DEFAULTS.Mode, help="ignored (accepted so the original's command runs)")
    parser.add_argument("--growmap", default=None, help="ignored (accepted so the original's command runs)")
    return parser


def validate(args: argparse.Namespace) -> None:
    validate_common(args)
    names = [name for name in args.model if name is not None]
    if len(set(names)) != len(names):
        raise UserError("--model names the same draft twice")
    needed = args.prompt_len + (args.max_new_tokens if args.continuations else 0)
    if needed > args.M:
        raise UserError(f"--M {args.M} is too small: prompt ({args.prompt_len})"
                        + (f" + continuation ({args.max_new_tokens})" if args.continuations else "")
                        + f" need {needed} KV slots")


def teacher_forced_logits(model: TreeModel, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits at every position of `ids` ([n] long, target ids): [n, model's own vocab]."""
    slots = torch.arange(ids.shape[0], device=model.device)
    return model.forward(ids, slots, slots, causal_mask(ids.shape[0], 0, model.device))


@dataclass
class PromptText:
    """The text scored for one prompt: its ids, then the target's continuation (possibly empty)."""

    prompt: Prompt
    continuation: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt.ids + self.continuation


def continuation_rows(text: PromptText) -> tuple[int, int]:
    """Rows whose context ends at the last prompt token or a generated one and that predict a generated
    token: exactly where speculative decoding drafts."""
    start = len(text.prompt.ids) - 1
    return start, start + len(text.continuation)


def score_prompt(text: PromptText, target: TreeModel, drafts: dict[str, TreeModel],
                 args: argparse.Namespace) -> dict[str, PositionFigures]:
    ids = torch.tensor(text.ids, dtype=torch.long, device=target.device)
    target_logits = teacher_forced_logits(target, ids)
    return {name: position_figures(target_logits, teacher_forced_logits(draft, ids), args.T, args.P,
                                   draft.output_ids, DEFAULT_EPSILON)
            for name, draft in drafts.items()}


def describe_distributions(temperature: float, top_p: float) -> str:
    sampling = distribution_sampling(temperature, top_p)
    greedy = " (T = 0: plain softmax; top-1 agreement is the greedy acceptance)" if temperature == 0 else ""
    return (f"distributions at T = {sampling.temperature:g}, top-p = {sampling.top_p:g}{greedy}; KL without top-p, "
            f"smoothed with eps = {DEFAULT_EPSILON:g}")


def format_potential(name: str, potential: DraftPotential) -> str:
    return "\n".join([
        f"draft {name}",
        f"  positions               {potential.positions} over {potential.prompts} prompts",
        f"  potential score         {potential.potential_score:.4f} nats per position (smoothed KL, lower is better)",
        f"  spread over prompts     std {potential.score_std:.4f}, min {potential.score_min:.4f}, "
        f"max {potential.score_max:.4f}",
        f"  top-1 agreement         {potential.top1_agreement:.4f}",
        f"  expected acceptance     {potential.expected_acceptance:.4f}",
        f"  target mass outside     {potential.outside_vocab_mass:.4f} (of the draft's vocabulary)"])


def format_ranking(potentials: dict[str, DraftPotential]) -> str:
    width = max(len(name) for name in potentials)
    lines = ["ranking (by potential score; rank by expected acceptance beside it)",
             f"  {'rank':>4}  {'draft':<{width}}  {'score':>8}  {'agree':>6}  {'accept':>6}  {'outside':>7}  "
             f"{'acc.rank':>8}"]
    for row in rank_drafts(potentials):
        p = row.potential
        lines.append(f"  {row.rank_by_score:>4}  {row.name:<{width}}  {p.potential_score:>8.4f}  "
                     f"{p.top1_agreement:>6.3f}  {p.expected_acceptance:>6.3f}  {p.outside_vocab_mass:>7.4f}  "
                     f"{row.rank_by_acceptance:>8}")
    return "\n".join(lines)


def summarise(per_prompt: list[dict[str, PromptFigures]], names: list[str]) -> dict[str, DraftPotential]:
    return {name: draft_potential([figures[name] for figures in per_prompt]) for name in names}


@dataclass
class Scores:
    """Per-prompt means for every draft: over all positions, and over continuation positions (when scored)."""

    whole: list[dict[str, PromptFigures]] = field(default_factory=list)
    continued: list[dict[str, PromptFigures]] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


def score_prompts(prompts: list[Prompt], pair: ModelPair, drafts: dict[str, TreeModel],
                  args: argparse.Namespace) -> Scores:
    scores = Scores()
    for prompt in tqdm(prompts, desc="potential", unit="prompt", dynamic_ncols=True):
        continuation = []
        if args.continuations:
            continuation = autoregressive_generate(pair.target, prompt.ids, args.max_new_tokens, pair.eos_ids,
                                                   GREEDY, torch.Generator(device=args.device)).output_ids
        text = PromptText(prompt, continuation)
        figures = score_prompt(text, pair.target, drafts, args)
        whole = {name: prompt_figures(f) for name, f in figures.items()}
        scores.whole.append(whole)
        row = {"index": prompt.index, "kind": prompt.kind, "prompt_ids": prompt.ids, "output_ids": continuation,
               "output_text": pair.tokenizer.decode(continuation, skip_special_tokens=True),
               "drafts": {name: f.as_dict() for name, f in whole.items()}}
        if continuation:
            start, stop = continuation_rows(text)
            continued = {name: prompt_figures(f.rows(start, stop)) for name, f in figures.items()}
            scores.continued.append(continued)
            row["continuation_drafts"] = {name: f.as_dict() for name, f in continued.items()}
        scores.rows.append(row)
    return scores


def main() -> None:
    args = build_parser().parse_args()
    validate(args)
    dtype = resolve_dtype(args.dtype, args.device)
    tokenizer = load_tokenizer(args.target)
    prompts = load_prompts(args.dataset, tokenizer, args.start, args.end, args.prompt_len)  # fail fast on bad data
    pair = load_pair(args.target, None, False, dtype, args.device, args.M, tokenizer)
    drafts = dict(load_draft(spec, args.target, pair.target, dtype, args.device, args.M) for spec in args.model)
    if len(drafts) != len(args.model):
        raise UserError("--model names the same draft twice")
    names = list(drafts)
    scores = score_prompts(prompts, pair, drafts, args)

    potentials = summarise(scores.whole, names)
    sampling = distribution_sampling(args.T, args.P)
    summary = {"script": SCRIPT, "flags": vars(args), "target": pair.target_name, "drafts": names,
               "dtype": str(dtype).removeprefix("torch."), "device": args.device, "versions": library_versions(),
               "hardware": hardware(), "seed": args.seed, "dataset": args.dataset, "range": [args.start, args.end],
               "prompts": len(prompts), "distribution": {"temperature": sampling.temperature, "top_p": sampling.top_p},
               "kl_epsilon": DEFAULT_EPSILON,
               "potential": {name: p.as_dict() for name, p in potentials.items()},
               "ranking": [{"draft": r.name, "rank_by_score": r.rank_by_score,
                            "rank_by_acceptance": r.rank_by_acceptance} for r in rank_drafts(potentials)]}
    emit(describe_distributions(args.T, args.P))
    emit("all positions (prompt" + (" + continuation)" if args.continuations else ")"))
    for name in names:
        emit(format_potential(name, potentials[name]))
    if scores.continued:
        continued = summarise(scores.continued, names)
        summary["continuation_potential"] = {name: p.as_dict() for name, p in continued.items()}
        emit("continuation positions only (where speculative decoding drafts)")
        for name in names:
            emit(format_potential(name, continued[name]))
    if len(names) > 1:
        emit(format_ranking(potentials))
    emit(f"results: {write_results(args.results_dir, SCRIPT, summary, scores.rows)}")


if __name__ == "__main__":
    run_cli(main)
