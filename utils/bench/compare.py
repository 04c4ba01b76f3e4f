"""Side-by-side benchmark against what users would run instead: transformers' generate, assisted generation
and prompt lookup, and this suite's autoregressive baseline, static tree and dynamic tree, in one process on
the same prompts, target, draft, device and weights, prompt by prompt with the method order rotated.

Example:
  python -m utils.bench --growmap growmaps/68m_7b-64.pt --end 20 --max-new-tokens 128

Writes <results-dir>/bench-<time>.json (+ .jsonl per prompt, .png speedup chart); the last output line is
'results: <path>'. This module holds the flags, the statistics, the tie check, the table and the chart;
preparing and running the methods lives in utils/bench/methods.py.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from engine.growmap import Growmap
from engine.verifiers import VERIFIERS
from utils.bench.llama_cpp import LLAMA_CPP_LABEL
from utils.bench.methods import METHODS, PROMPT_LOOKUP_TOKENS, SUITE_METHODS, BenchSetup, DynamicShape, Run
from utils.cli import (OneLineParser, add_cuda_graph_flag, add_data_flags, add_lookup_flags, add_model_flags,
                       finite_float, run_cli, validate_common)
from utils.config import DEFAULTS
from utils.data import Prompt
from utils.errors import UserError
from utils.experiment import fixed_plan

TIE_TOLERANCE = 1e-4
FIGURE_KEYS = ("tokens_per_second", "ms_per_token", "mean_accepted_tokens", "speedup_vs_generate", "matches_generate")
DRAFT_METHODS = ("assisted", "static_tree", "dynamic_tree")


def spread(values: list[float]) -> dict[str, float]:
    """min, quartiles and max of `values` (all equal for a single value)."""
    q = np.percentile(np.asarray(values, dtype=float), [0, 25, 50, 75, 100])
    return dict(zip(("min", "q1", "median", "q3", "max"), (float(v) for v in q)))


def seconds_per_token(run: Run) -> float:
    return run.seconds / max(len(run.output_ids), 1)


def method_figures(runs: list[Run], reference: list[Run] | None) -> dict:
    """Per-method figures over prompts. Speedup is per prompt (same prompt, adjacent in time) against
    `reference` (generate's runs), then summarised: median and spread."""
    tokens_per_second = [1.0 / seconds_per_token(r) if r.seconds > 0 else 0.0 for r in runs]
    ms_per_token = [1000.0 * seconds_per_token(r) for r in runs]
    new_tokens = sum(len(r.output_ids) for r in runs)
    calls = sum(r.target_calls for r in runs)
    figures = {
        "tokens_per_second": spread(tokens_per_second)["median"],
        "tokens_per_second_spread": spread(tokens_per_second),
        "ms_per_token": spread(ms_per_token)["median"],
        "ms_per_token_spread": spread(ms_per_token),
        "mean_accepted_tokens": new_tokens / max(calls, 1),
        "new_tokens": new_tokens,
        "target_calls": calls,
        "seconds": sum(r.seconds for r in runs),
        "speedup_vs_generate": None,
        "speedup_spread": None,
    }
    if reference is not None:
        speedups = [seconds_per_token(ref) / seconds_per_token(run) for ref, run in zip(reference, runs)]
        figures["speedup_vs_generate"] = spread(speedups)["median"]
        figures["speedup_spread"] = spread(speedups)
    return figures


def first_divergence(reference: list[int], output: list[int]) -> int | None:
    """Index of the first token where `output` differs from `reference` (a length difference counts at
    the shorter length); None when they are equal."""
    for index, (a, b) in enumerate(zip(reference, output)):
        if a != b:
            return index
    return None if len(reference) == len(output) else min(len(reference), len(output))


def token_gap(logits: torch.Tensor, tokens: tuple[int | None, int | None]) -> float | None:
    """logits: [V] at the first differing position. How far the method's token scores below generate's there:
    the margin a divergence has to explain (a near-tie when tiny). None when one output had already ended.
    (The gap between the two best logits, reported before, measures tokens that need not be the two diverging
    ones: 0 for a tie between two others.)"""
    generate_token, method_token = tokens
    if generate_token is None or method_token is None:
        return None
    return float(logits[generate_token].float() - logits[method_token].float())


def is_near_tie(logits: torch.Tensor, tokens: tuple[int | None, int | None], tolerance: float) -> bool:
    """logits: [V] at the first differing position. A tie when both diverging tokens are among the best: each
    within `tolerance` of the maximum (so also within `tolerance` of each other)."""
    if None in tokens:
        return False
    best = float(logits.max())
    return all(best - float(logits[token]) <= tolerance for token in tokens)


@dataclass(frozen=True)
class Divergence:
    method: str
    dtype: str                 # the method's dtype: generate's reference and the tie check ran in it too
    prompt_index: int
    position: int
    generate_token: int | None
    method_token: int | None
    token_gap: float | None    # generate's token's logit minus the method's, in the teacher-forced check forward
    check_top_token: int       # the check forward's own best token (not generate's: that forward rounds differently)
    tie: bool


def describe_divergence(d: dict) -> str:
    """One report line for a Divergence as stored in the summary (asdict)."""
    kind = "near-tie (counted as a match)" if d["tie"] else "DIVERGENCE"
    if d["token_gap"] is None:
        detail = "one output ended there"
    else:
        detail = (f"in a teacher-forced check forward {d['method_token']} scores {d['token_gap']:.2e} below "
                  f"{d['generate_token']} (that forward's top token: {d['check_top_token']})")
    return (f"{kind}: {d['method']} prompt {d['prompt_index']} token {d['position']}: generate ({d['dtype']}) "
            f"{d['generate_token']}, {d['method']} {d['method_token']}; {detail}")


def find_divergences(method: str, dtype: str, prompt_ids: list[list[int]], prompt_indices: list[int],
                     reference: list[Run], runs: list[Run], next_logits: Callable[[list[int], list[int]], torch.Tensor],
                     tolerance: float = TIE_TOLERANCE) -> list[Divergence]:
    """Every prompt where `method`'s output differs from generate's, classified as tie or not with one
    teacher-forced target forward: next_logits(prompt_ids, generate's output before the difference) -> [V]."""
    found = []
    for ids, index, ref, run in zip(prompt_ids, prompt_indices, reference, runs):
        position = first_divergence(ref.output_ids, run.output_ids)
        if position is None:
            continue
        logits = next_logits(ids, ref.output_ids[:position])
        tokens = tuple(out[position] if position < len(out) else None for out in (ref.output_ids, run.output_ids))
        found.append(Divergence(method, dtype, index, position, tokens[0], tokens[1], token_gap(logits, tokens),
                                int(logits.argmax()), is_near_tie(logits, tokens, tolerance)))
    return found


def matches_generate(divergences: list[Divergence], greedy: bool) -> bool | None:
    """At T = 0: True when every output equals generate's or differs only at a near-tie; None at T > 0."""
    return all(d.tie for d in divergences) if greedy else None


def collect_figures(methods: list[str], setup: BenchSetup, runs: dict[str, list[Run]], prompts: list[Prompt],
                    greedy: bool, max_new_tokens: int) -> tuple[dict[str, dict], list[Divergence]]:
    """Figures per method; at T = 0 also the exactness check. Each method is compared with transformers'
    generate in the method's own dtype (the timed run when generate ran in it, else an untimed reference run
    made here), and each divergence is tie-checked by a teacher-forced target forward in that dtype."""
    from utils.bench.methods import next_token_logits

    timed_dtype = setup.dtypes["generate"]
    references = {timed_dtype: runs["generate"]}
    if greedy:
        for dtype in sorted(set(setup.dtypes.values()) - {timed_dtype, LLAMA_CPP_LABEL}):
            runner = setup.references[dtype][0]
            references[dtype] = [runner(prompt, max_new_tokens) for prompt in prompts]
    figures: dict[str, dict] = {}
    divergences: list[Divergence] = []
    for name in methods:
        if name in setup.skipped:
            figures[name] = {"skipped": setup.skipped[name], **dict.fromkeys(FIGURE_KEYS)}
            continue
        dtype = setup.dtypes[name]
        if dtype == LLAMA_CPP_LABEL:  # another engine: its tokens compared with generate's and the suite's
            figures[name] = {**method_figures(runs[name], runs["generate"]), "dtype": dtype,
                             **llama_cpp_matches(runs, name, len(prompts))}
            continue
        found = []
        if greedy:
            model = setup.references[dtype][1]
            found = find_divergences(name, dtype, [p.ids for p in prompts], [p.index for p in prompts],
                                     references[dtype], runs[name],
                                     lambda ids, prefix: next_token_logits(model, ids, prefix))
        divergences.extend(found)
        figures[name] = {**method_figures(runs[name], runs["generate"]), "dtype": dtype,
                         "matches_generate": matches_generate(found, greedy),
                         "exact_matches": len(prompts) - len(found) if greedy else None,
                         "matched_against": (f"generate in {dtype}" + ("" if dtype == timed_dtype else
                                                                       " (untimed reference run)")) if greedy else None}
    return figures, divergences


def llama_cpp_matches(runs: dict[str, list[Run]], name: str, count: int) -> dict:
    """Whether a llama.cpp method's greedy tokens equal generate's (float32 or --hf-dtype) and the suite baseline's
    (the suite's path: q8 or float32), as counts of identical outputs and the share of equal tokens."""
    def compare(other: str) -> dict | None:
        if other not in runs:
            return None
        pairs = list(zip(runs[name], runs[other]))
        equal = sum(a == b for x, y in pairs for a, b in zip(x.output_ids, y.output_ids))
        return {"identical_outputs": sum(x.output_ids == y.output_ids for x, y in pairs),
                "share_of_tokens_equal": round(equal / max(sum(len(y.output_ids) for _, y in pairs), 1), 4)}

    vs_generate = compare("generate")
    return {"matches_generate": vs_generate["identical_outputs"] == count if vs_generate else None,
            "exact_matches": vs_generate["identical_outputs"] if vs_generate else None,
            "matched_against": "generate, token by token", "vs_generate": vs_generate,
            "vs_suite_baseline": compare("baseline")}


def mark_numerics(figures: dict[str, dict], runs: dict[str, list[Run]], kernels: dict) -> None:
    """The suite's rows of a run on a lossy path (8-bit activations) say so, and whether their outputs equal the
    suite baseline's on that path (the exactness that holds there; 'matches' compares with float32 generate)."""
    if not kernels.get("lossy"):
        return
    for name in SUITE_METHODS:
        if name in figures and not figures[name].get("skipped"):
            figures[name]["numerics"] = kernels["target_numerics"]
            if "baseline" in runs:
                figures[name]["matches_suite_baseline"] = all(
                    a.output_ids == b.output_ids for a, b in zip(runs[name], runs["baseline"]))


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def format_table(methods: dict[str, dict]) -> str:
    """The on-screen table; a skipped method shows its reason."""
    header = (f"{'method':<14}{'tok/s':>9}{'[min-max]':>17}{'ms/tok':>9}{'acc/step':>10}{'speedup':>9}"
              f"{'[min-max]':>15}{'matches':>9}  dtype")
    lines = [header, "-" * len(header)]
    for name, fig in methods.items():
        if fig.get("skipped"):
            lines.append(f"{name:<14}skipped: {fig['skipped']}")
            continue
        tps = fig["tokens_per_second_spread"]
        speed = fig["speedup_spread"]
        speed_range = "-" if speed is None else f"[{speed['min']:.2f}-{speed['max']:.2f}]"
        tps_range = f"[{tps['min']:.1f}-{tps['max']:.1f}]"
        match = {None: "-", True: "yes", False: "NO"}[fig["matches_generate"]]
        lines.append(f"{name:<14}{fig['tokens_per_second']:>9.2f}{tps_range:>17}"
                     f"{fig['ms_per_token']:>9.2f}{fig['mean_accepted_tokens']:>10.2f}"
                     f"{_fmt(fig['speedup_vs_generate'], '.2f'):>9}{speed_range:>15}{match:>9}  {fig['dtype']}"
                     + (f" LOSSY: {fig['numerics']}; outputs = suite baseline's: "
                        f"{'yes' if fig.get('matches_suite_baseline') else 'NO'}" if fig.get("numerics") else "")
                     + (f" (outputs = suite baseline's: {fig['vs_suite_baseline']['identical_outputs']}, tokens "
                        f"equal {fig['vs_suite_baseline']['share_of_tokens_equal']:.0%})"
                        if fig.get("vs_suite_baseline") else ""))
    return "\n".join(lines)


def plot_speedups(methods: dict[str, dict], path: Path, title: str) -> Path:
    """Bar chart of the median per-prompt speedup over generate, error bars from min to max (Agg, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {name: fig for name, fig in methods.items() if fig.get("speedup_spread")}
    names = list(shown)
    medians = [shown[n]["speedup_vs_generate"] for n in names]
    low = [m - shown[n]["speedup_spread"]["min"] for n, m in zip(names, medians)]
    high = [shown[n]["speedup_spread"]["max"] - m for n, m in zip(names, medians)]
    figure, axes = plt.subplots(figsize=(1.4 * max(len(names), 3) + 2, 4))
    axes.bar(names, medians, yerr=[low, high], capsize=4, color="tab:blue")
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_ylabel("speedup over transformers generate (x)")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    tmp.replace(path)
    return path


def build_parser(add_flags: Callable | None = None) -> OneLineParser:
    parser = OneLineParser(prog="python -m utils.bench", description=__doc__.split("\n\n")[0],
                           epilog="Results: <results-dir>/bench-<time>.json (+ .jsonl, .png); "
                                  "the last output line is 'results: <path>'.")
    add_model_flags(parser)
    add_cuda_graph_flag(parser)
    add_data_flags(parser)
    parser.add_argument("--T", type=finite_float, default=DEFAULTS.T, help="temperature; 0 = greedy (exact)")
    parser.add_argument("--P", type=finite_float, default=DEFAULTS.P,
                        help="top-p nucleus mass in (0, 1], used when T > 0")
    parser.add_argument("--verify", default=DEFAULTS.verify, choices=VERIFIERS[1:],
                        help="the suite's verifier at T > 0 (T = 0 always verifies greedily)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, help="new tokens per prompt")
    parser.add_argument("--growmap", default=None,
                        help="static tree shape (.pt growmap); default: for the default pair on CPU, the "
                             f"hardware-aware search's tree for this machine's calibration profile, else {DEFAULTS.growmap}")
    parser.add_argument("--dynamic-budget", "--B", type=int, default=None,
                        help="dynamic tree node budget, root included (default: the growmap's size)")
    parser.add_argument("--dynamic-width", "--W", type=int, default=DEFAULTS.W,
                        help="dynamic tree expansion width (children per expanded node, nodes expanded per level; "
                             "test_greedyS_dy.py's --W)")
    parser.add_argument("--dynamic-depth", "--D", type=int, default=None,
                        help="dynamic tree depth limit (default: the growmap's depth)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}; generate always runs (the reference)")
    parser.add_argument("--assistant", default=None,
                        help="token-level draft for transformers' assisted generation (default: --model, or the "
                             "suite's token-level draft for the target when --model is a feature draft, which "
                             "transformers cannot run)")
    parser.add_argument("--hf-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="dtype of transformers' methods; auto = the faster of the two on the warm-up prompt, "
                             "per method")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=PROMPT_LOOKUP_TOKENS,
                        help="prompt_lookup_num_tokens for transformers' prompt lookup decoding")
    add_lookup_flags(parser)  # the suite's own prompt lookup on its static and dynamic trees
    if add_flags is not None:
        add_flags(parser)
    return parser


def parse_args(argv: list[str] | None = None, add_flags: Callable | None = None) -> argparse.Namespace:
    return build_parser(add_flags).parse_args(argv)


def selected_methods(spec: str) -> list[str]:
    """The --methods list in canonical order, generate first and always included."""
    asked = {name.strip() for name in spec.split(",") if name.strip()}
    unknown = sorted(asked - set(METHODS))
    if unknown:
        raise UserError(f"unknown --methods {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    return [name for name in METHODS if name in asked or name == "generate"]


def dynamic_shape(args: argparse.Namespace, growmap: Growmap) -> DynamicShape:
    """The dynamic tree's limits: the flags, or the static tree's size and depth (so both trees get the same
    node budget)."""
    budget = growmap.size if args.dynamic_budget is None else args.dynamic_budget
    depth = growmap.max_depth if args.dynamic_depth is None else args.dynamic_depth
    shape = DynamicShape(budget=budget, width=args.dynamic_width, max_depth=depth, score=DEFAULTS.score)
    if shape.budget < 2 or shape.width < 1 or shape.max_depth < 1:
        raise UserError(f"the dynamic tree needs --dynamic-budget >= 2, --dynamic-width >= 1 and --dynamic-depth "
                        f">= 1 (got {shape.budget}, {shape.width}, {shape.max_depth})")
    return shape


def main(argv: list[str] | None = None, plan_run: Callable = fixed_plan, add_flags: Callable | None = None) -> None:
    """The benchmark. `plan_run(args, need_draft) -> (growmap, origin, KernelChoice)` picks the static tree and
    each model's dtype and kernels: `python -m utils.bench` passes the calibrated one (utils/calibration) and
    its flags, `add_flags`; the default takes --growmap and --dtype as they are."""
    from tqdm import tqdm

    from engine.sampling import Sampling
    from engine.verifiers import LOSSLESS, SAMPLED_CHILDREN
    from utils.bench.methods import prepare_methods, run_alternating
    from utils.cli import quiet_transformers
    from utils.experiment import load_pair, load_text_prompts
    from utils.models import default_token_draft_for, load_hf_model
    from utils.report import emit, hardware, library_versions
    from utils.run_log import check_resume, launched_world_size, open_run, sweep

    args = parse_args(argv, add_flags)
    validate_common(args)
    if launched_world_size() > 1:
        raise UserError("the benchmark times its methods side by side in one process: run it without a launcher")
    methods = selected_methods(args.methods)
    if args.prompt_lookup_tokens < 1:
        raise UserError(f"--prompt-lookup-tokens must be >= 1, got {args.prompt_lookup_tokens}")
    quiet_transformers()
    sampling = Sampling(args.T, args.P)
    verifier = "greedy" if sampling.greedy else args.verify
    need_draft = any(m in DRAFT_METHODS for m in methods)
    text = load_text_prompts(args)  # a bad dataset fails before the calibration or any model loads
    growmap, origin, kernels = plan_run(args, need_draft)
    dynamic = dynamic_shape(args, growmap)
    emit(kernels.line)
    dtype = kernels.target.dtype
    if args.resume:
        check_resume(args.resume, "bench", vars(args))  # a wrong --resume fails before the models load
    max_len = args.prompt_len + args.max_new_tokens + max(growmap.size, dynamic.slots_bound()) + args.lookup + 1
    pair = load_pair(args.target, args.model, need_draft, dtype, args.device, max_len, text.tokenizer,
                     plans=(kernels.target, kernels.draft), cuda_graphs=args.cuda_graphs)
    prompts = text.prompts

    assistant_draft = None
    if "assisted" in methods and (args.assistant or pair.draft.uses_target_features):
        name = args.assistant or default_token_draft_for(args.target)
        if name is None:
            raise UserError("--model is a feature draft, which transformers' assisted generation cannot run: pass "
                            "--assistant with a token-level draft, or leave assisted out of --methods")
        assistant_draft = (name, load_hf_model(name, dtype, args.device))
    setup = prepare_methods(methods, pair, growmap, sampling, verifier, prompts[0], hf_dtype=args.hf_dtype,
                            seed=args.seed, lookup_tokens=args.prompt_lookup_tokens,
                            max_new_tokens=args.max_new_tokens, sample_children=SAMPLED_CHILDREN[verifier],
                            dynamic=dynamic, assistant_draft=assistant_draft, suite_lookup=args.lookup,
                            suite_lookup_ngram=args.lookup_ngram)
    for note in setup.notes:
        emit(f"note: {note}")
    log = open_run(args.results_dir, args.resume, "bench", vars(args))  # a run failing before this leaves no files
    header = {
        "script": "bench", "flags": vars(args), "methods_run": methods, "target": pair.target_name,
        "draft": pair.draft_name, "dtype": str(dtype).removeprefix("torch."), "kernels": kernels.record,
        "hf_dtype": setup.hf_dtype_choice,
        "device": args.device, "versions": {**library_versions(), "matplotlib": _version("matplotlib")},
        "hardware": hardware(), "seed": args.seed, "dataset": args.dataset, "range": [args.start, args.end],
        "sampling": {"temperature": args.T, "top_p": args.P}, "verifier": verifier, "lossless": LOSSLESS[verifier],
        "growmap": {**origin, "size": growmap.size, "depth": growmap.max_depth},
        "dynamic_tree_shape": asdict(dynamic),
        "suite_prompt_lookup": {"max_tokens": args.lookup, "max_ngram": args.lookup_ngram,
                                "note": "grafted onto static_tree and dynamic_tree"},
        "warmup_prompt": prompts[0].index, "assistant": setup.assistant, "notes": setup.notes,
        "tie_tolerance": TIE_TOLERANCE,
    }

    def summary_of(rows: list[dict]) -> dict:
        if len(rows) < len(prompts):  # figures and the tie check are made over the whole range only
            return header
        runs = {name: [Run(**row["outputs"][name]) for row in rows] for name in setup.runners}
        figures, divergences = collect_figures(methods, setup, runs, prompts, sampling.greedy, args.max_new_tokens)
        mark_numerics(figures, runs, kernels.record)
        return {**header, "divergences": [asdict(d) for d in divergences], "methods": figures}

    def work(mine: list[Prompt], append) -> None:
        bar = tqdm(total=len(mine), desc="bench", unit="prompt", dynamic_ncols=True)

        def done(prompt: Prompt, prompt_runs: dict[str, Run]) -> None:
            append({"index": prompt.index, "prompt_ids": prompt.ids,
                    "outputs": {name: asdict(prompt_runs[name]) for name in setup.runners}})
            bar.update(1)

        run_alternating(setup.runners, mine, args.max_new_tokens, done)
        bar.close()

    summary, _ = sweep(log, prompts, lambda prompt: prompt.index, work, summary_of)
    emit(format_table(summary["methods"]))
    for d in summary["divergences"]:
        emit(f"  {describe_divergence(d)}")
    title = (f"{pair.target_name} / draft {pair.draft_name}, T={args.T}, {len(prompts)} prompts x "
             f"{args.max_new_tokens} tokens, {args.device}")
    chart = plot_speedups(summary["methods"], log.json_path.with_suffix(".png"), title)
    emit(f"chart: {chart}")
    emit(f"results: {log.json_path}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    run_cli(main)
