"""The runs test_greedyS_commonsense.py makes and the side-by-side table it prints.

Every variant runs on the same prompts as its plain counterpart:
- plain: the growmap's tree, greedy/sample-match verification (the figures "without the rule");
- substitute: the same tree, the original's substitution rule (lossy, T = 0 only);
- augment: the same tree plus up to --augment follower nodes per step (lossless);
- plain+N: the growmap with the same N extra nodes at the same places filled by the draft's next-ranked
  children, i.e. the plain tree of augment's total node count, so augment's gain is not just "more nodes".
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.growmap import Growmap, add_children
from engine.commonsense import augment_counts

VARIANTS = ("substitute", "augment", "all")


@dataclass(frozen=True)
class Run:
    name: str               # plain | substitute | augment | plain+N
    growmap: Growmap        # the draft's tree shape
    extra_nodes: int = 0    # follower nodes grafted per step at most (augment)


def plan_runs(variant: str, growmap: Growmap, budget: int, width: int) -> list[Run]:
    """The runs of one command, plain first."""
    runs = [Run("plain", growmap)]
    if variant in ("substitute", "all"):
        runs.append(Run("substitute", growmap))
    if variant in ("augment", "all"):
        counts = augment_counts(budget, width)
        runs.append(Run("augment", growmap, budget))
        runs.append(Run(f"plain+{budget}", add_children(growmap, counts)))
    return runs


def side_by_side(runs: list[Run], summaries: list[dict]) -> str:
    """A markdown table of the runs' figures (the README's table is this output)."""
    head = ("| run | lossless | tree nodes (max) | accepted tokens / step | tokens / s | tokens equal to target alone "
            "| identical outputs | target log-lik / token (target alone) | substitutions (tokens after) |")
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run, summary in zip(runs, summaries):
        quality = summary.get("quality") or {}
        match = f"{100 * quality['token_match']:.1f}%" if quality else "-"
        identical = f"{quality['identical_outputs']}/{summary['prompts']}" if quality else "-"
        loglik = (f"{quality['log_likelihood']:.3f} ({quality['reference_log_likelihood']:.3f})" if quality else "-")
        subs = (f"{summary['substitutions']} ({summary['after_substitution']})" if "substitutions" in summary
                else "-")
        lines.append(f"| {run.name} | {'yes' if summary['lossless'] else 'NO (lossy)'} | "
                     f"{run.growmap.size + run.extra_nodes} | {summary['mean_accepted_tokens']:.3f} | "
                     f"{summary['tokens_per_second']:.1f} | {match} | {identical} | {loglik} | {subs} |")
    return "\n".join(lines)
