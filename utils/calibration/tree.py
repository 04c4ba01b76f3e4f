"""The default static tree from the calibration profile: Sequoia's hardware-aware search (arXiv 2402.12374,
section 3.2) over the default pair's shipped acceptance vectors and this machine's measured forward times,
instead of a growmap tuned on one machine."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.growmap import Growmap, load_growmap
from engine.tree_search import LatencyProfile, check_acceptance, choose_budget, sequoia_dp
from utils.calibration.choose import Profile, estimate_ms
from utils.config import DEFAULTS
from utils.models import REPO_ROOT

# measured for the default pair (growmaps/README.md): "acceptance" (deeper nodes) and "root_acceptance"
DEFAULT_PAIR_ACCEPTANCE = REPO_ROOT / "growmaps" / "acceptance" / "smollm2-feature-draft-T0.json"
SEARCH_BUDGET = 32   # largest tree considered (the profile's largest row count)
SEARCH_LEVELS = 12   # as the shipped default's search (--max-depth 12)
DRAFT_FRONTIER = 4   # rows of the draft step the search charges per level (growmap_tool latency's default)


def latency_for(profile: Profile, label: str, lookup: int) -> LatencyProfile:
    """The search's latency profile for target plan `label`: a tree of n nodes is verified together with up
    to `lookup` copied tokens (charged in full, to every size alike); the draft step in its fastest plan."""
    target = profile.target
    target_ms = {n: estimate_ms(target["rows"], target["ms"][label], n + lookup) for n in range(1, SEARCH_BUDGET + 1)}
    allowed = [plan.label for plan in profile.allowed]
    draft_ms = min(estimate_ms(profile.draft["rows"], profile.draft["ms"][name], DRAFT_FRONTIER)
                   for name in allowed if name in profile.draft["ms"])
    return LatencyProfile(target_ms, draft_ms)


def searched_growmap(profile: Profile, lookup: int, acceptance: list[float],
                     root_acceptance: list[float] | None) -> tuple[Growmap, dict]:
    """The tree with the least predicted time per token over every allowed target plan (the plan and the tree
    size decide each other: a plan fast for many rows favours a larger tree). The search does not model what
    prompt lookup adds to the accepted tokens, only what its rows cost."""
    table = sequoia_dp(acceptance, SEARCH_BUDGET, SEARCH_LEVELS, root_acceptance)
    best = None
    per_plan = {}
    for plan in profile.allowed:
        if plan.label not in profile.target["ms"]:
            continue
        # at least one drafted node: a speculative run's tree (budget 1 would be prompt lookup alone)
        choice = min((c for c in choose_budget(table, latency_for(profile, plan.label, lookup)).per_budget
                      if c.budget >= 2), key=lambda c: (c.ms_per_token, c.budget))
        per_plan[plan.label] = {"budget": choice.budget, "depth": choice.depth,
                                "predicted_tokens_per_step": round(choice.expected_tokens, 3),
                                "predicted_ms_per_token": round(choice.ms_per_token, 2)}
        if best is None or choice.ms_per_token < best[1].ms_per_token:
            best = (plan.label, choice)
    label, choice = best
    record = {"source": "hardware-aware search over the calibration profile",
              "acceptance": str(DEFAULT_PAIR_ACCEPTANCE),
              "target_plan": label, "size": choice.budget, "depth": choice.depth,
              "predicted_tokens_per_step": choice.expected_tokens, "per_target_plan": per_plan}
    return table.tree(choice.budget, choice.levels), record


def default_pair(args: argparse.Namespace) -> bool:
    return args.target is None and args.model is None


def shipped_acceptance(path: Path = DEFAULT_PAIR_ACCEPTANCE) -> tuple[list[float], list[float] | None]:
    """(acceptance, root acceptance) from an acceptance record written by `growmap_tool acceptance`."""
    record = json.loads(path.read_text())
    root = record.get("root_acceptance")
    return list(check_acceptance(record["acceptance"])), None if root is None else list(check_acceptance(root))


def pick_growmap(args: argparse.Namespace, profile: Profile) -> tuple[Growmap, dict]:
    """--growmap when given; else, for the default pair on a calibrated CPU, the searched tree; else the
    shipped default growmap."""
    if args.growmap is None and default_pair(args) and profile.calibrated and profile.draft is not None \
            and DEFAULT_PAIR_ACCEPTANCE.is_file():
        return searched_growmap(profile, args.lookup, *shipped_acceptance())
    path = args.growmap or DEFAULTS.growmap
    growmap = load_growmap(path)
    return growmap, {"path": path, "size": growmap.size, "depth": growmap.max_depth}
