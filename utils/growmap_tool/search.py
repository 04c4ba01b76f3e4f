"""`search`: Sequoia's optimal tree for an acceptance vector, at a fixed budget or sized for the hardware
from a latency profile."""
from __future__ import annotations

import argparse
from typing import Sequence

from engine.tree_search import choose_budget, expected_accepted, sequoia_dp
from utils.errors import UserError
from utils.growmap_tool.output import check_size, command_line, out_path, positive, save_with_record, shape_summary
from utils.growmap_tool.vectors import load_latency, load_vectors


def _budget_table(choices, chosen) -> list[str]:
    lines = [f"{'budget':>6} {'depth':>5} {'tokens/step':>11} {'step ms':>9} {'ms/token':>9} {'speedup':>7}"]
    for c in choices:
        mark = "  <- chosen" if c == chosen else ""
        lines.append(f"{c.budget:>6} {c.depth:>5} {c.expected_tokens:>11.3f} {c.step_ms:>9.3f} "
                     f"{c.ms_per_token:>9.3f} {c.speedup:>7.2f}{mark}")
    return lines


def cmd_search(args: argparse.Namespace, argv: Sequence[str]) -> None:
    out = out_path(args.output)
    p, root_p, entries = load_vectors(args)
    levels = positive("--max-depth", args.max_depth)
    record: dict = {"made_by": command_line(argv), "method": "Sequoia dynamic program (arXiv 2402.12374)",
                    **entries, "max_levels": levels}
    if args.latency is None:
        if args.draft_ms is not None:
            raise UserError("--draft-ms needs --latency")
        if args.budget is None:
            raise UserError("search needs --budget N (or --latency to choose it)")
        budget = positive("--budget", args.budget)
        check_size(budget)
        table = sequoia_dp(p, budget, levels, root_p)
        growmap = table.tree(budget, levels)
        predicted = table.value(budget, levels)
        record.update(budget=budget, predicted_tokens_per_step=predicted,
                      best_by_budget={str(n): table.value(n, levels) for n in _report_budgets(budget)})
        print(f"budget {budget}, at most {levels} levels: predicted tokens per step {predicted:.3f}")
    else:
        profile = load_latency(args.latency, args.draft_ms)
        max_budget = args.budget if args.budget is not None else max(profile.target_ms)
        check_size(positive("--budget", max_budget))
        table = sequoia_dp(p, max_budget, levels, root_p)
        try:
            choice = choose_budget(table, profile)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        best = choice.best
        growmap = table.tree(best.budget, best.levels)
        predicted = best.expected_tokens
        rows = _budget_table(choice.per_budget, best)
        print(f"chosen: budget {best.budget}, depth {best.depth} ({best.levels} levels); "
              f"predicted tokens per step {predicted:.3f}, {best.ms_per_token:.3f} ms/token, "
              f"speedup {best.speedup:.2f}x over autoregressive")
        print("\n".join(rows))
        record.update(latency={"file": args.latency, "target_ms": {str(k): v for k, v in sorted(profile.target_ms.items())},
                               "draft_step_ms": profile.draft_step_ms},
                      budget=best.budget, levels=best.levels, predicted_tokens_per_step=predicted,
                      predicted_ms_per_token=best.ms_per_token, predicted_speedup=best.speedup,
                      per_budget=[vars(c) for c in choice.per_budget])
    assert abs(expected_accepted(growmap, p, root_p) - predicted) < 1e-9
    record["shape"] = shape_summary(growmap)
    record["parents"] = growmap.parents.tolist()
    save_with_record(growmap, out, record)


def _report_budgets(budget: int) -> list[int]:
    powers = [2 ** k for k in range(0, 13) if 2 ** k < budget]
    return powers + [budget]
