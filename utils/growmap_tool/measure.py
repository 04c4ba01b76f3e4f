"""`acceptance` and `latency`: measure a draft/target pair's positional acceptance vector along the target's
own continuations, and the hardware's target and draft forward times per tree size."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from engine.linear_paths import LINEAR_PATHS, KernelPlan, path_available
from engine.model import to_target_vocab
from engine.tree_search import sequoia_dp
from utils.errors import UserError
from utils.growmap_tool.output import MAX_NODES, command_line, out_path, positive
from utils.report import write_json
from utils.timing import DRAFT_TOPK, draft_call, target_call, time_round_robin, tree_inputs


DEFAULT_SIZES = "1,2,4,8,16,32,64,128,256"


DEFAULT_DRAFT_SIZES = "1,2,4,8"




SEQUOIA_BUDGETS = (16, 32, 64, 128)  # budgets whose best predicted tokens/step the acceptance record quotes


SEQUOIA_LEVELS = 10


def load_models(args: argparse.Namespace, max_len: int, target_loader=None, cuda_graphs: bool = False):
    """(ModelPair, device, dtype) for --target/--model/--device/--dtype, each model with max_len cache slots;
    target_loader(args, device) -> a load_pair target loader or None (--offloading: utils/distributed, handed
    in by the entry point, since one subsystem does not import another); with `cuda_graphs` on CUDA the models
    replay CUDA graphs (never an offloaded target)."""
    from utils.cli import quiet_transformers, resolve_device, resolve_dtype
    from utils.experiment import load_pair

    quiet_transformers()  # as utils.cli.run_cli: keep stderr to our own lines
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if getattr(args, "offloading", False) and target_loader is None:
        raise UserError("--offloading is served by `python -m utils.growmap_tool`")
    load_target = target_loader(args, device) if target_loader is not None else None
    path = getattr(args, "kernel", LINEAR_PATHS[0])  # latency only: the linear kernels to time (engine/linear_paths.py)
    plan = KernelPlan(dtype, path)
    if not path_available(path, dtype, device):
        raise UserError(f"--kernel {path} cannot run {plan.label.split('/')[0]} on {device} here: pass --kernel plain")
    pair = load_pair(args.target, args.model, True, dtype, device, max_len, load_target=load_target, plans=(plan, plan),
                     cuda_graphs=cuda_graphs)
    return pair, device, dtype


def _environment(device: str, dtype: torch.dtype) -> dict:
    """Where a measurement ran: device, dtype, threads, hardware, library versions and the date."""
    from utils.report import hardware, library_versions

    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "hardware": hardware(), "versions": library_versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def in_target_vocab(model, logits: torch.Tensor) -> torch.Tensor:
    """A TreeModel's logits [r, own V] -> [r, V] over the target vocabulary (-inf on tokens a
    vocabulary-subset draft cannot propose)."""
    return to_target_vocab(logits, model.output_ids, model.target_vocab_size, float("-inf"))


class PromptCounts(NamedTuple):
    """Acceptance counts [W + 2] of one prompt, per regime."""
    deep: torch.Tensor          # plain draft: every node's children; feature draft: non-root nodes' children (self-fed)
    root: torch.Tensor | None   # a feature draft's root children, fed the target's real features; else None


def prompt_counts(pair, prompt_ids: list[int], steps: int, width: int, sampling,
                  generator: torch.Generator) -> PromptCounts:
    """Acceptance counts [W + 2] along the target's own continuation (<= `steps` tokens) of one prompt.

    Position t has context prompt + continuation[:t]; one teacher-forced forward of each model over
    prompt + continuation[:-1] gives every position's distribution at once. A feature draft is measured
    twice on the same continuation: deep (self-fed, as every node below depth 1 runs) and root (the target's
    features, as the root's children run). Each regime takes its own draws from `generator` (at T > 0 the
    children are sampled), deep first, so a plain draft's counts and every deep count stay as they were.
    """
    from engine.acceptance import acceptance_counts
    from engine.decoder import autoregressive_generate
    from engine.drafters import teacher_forced_logits

    device = pair.target.device
    continuation = autoregressive_generate(pair.target, prompt_ids, steps, pair.eos_ids, sampling, generator).output_ids
    tokens = torch.tensor(prompt_ids + continuation[:-1], dtype=torch.long, device=device)  # [L]
    rows = torch.arange(len(prompt_ids) - 1, tokens.shape[0], device=device)               # [len(continuation)]
    # one target forward gives its logits and the features a feature draft reads ([L, d], or [L, k * d] for
    # a draft of k fused layers)
    target_logits, features = teacher_forced_logits(pair.target, tokens, rows, return_hidden=True,
                                                    hidden_layers=pair.draft.target_layers)

    def counts(draft_logits: torch.Tensor) -> torch.Tensor:                                # [n, own V]
        return acceptance_counts(target_logits, in_target_vocab(pair.draft, draft_logits), width, sampling,
                                 generator)

    if not pair.draft.uses_target_features:
        return PromptCounts(counts(teacher_forced_logits(pair.draft, tokens, rows)), None)
    # fed the target's features (the root's children), then its own predictions (every deeper node)
    fed, predicted = teacher_forced_logits(pair.draft, tokens, rows, features, return_hidden=True)
    # deep first: the draws' order
    deep = counts(teacher_forced_logits(pair.draft, tokens, rows, predicted_features=predicted))
    return PromptCounts(deep, counts(fed))


def _check_measure_flags(args: argparse.Namespace) -> None:
    if args.T < 0:
        raise UserError(f"--T must be >= 0, got {args.T}")
    if not 0.0 < args.P <= 1.0:
        raise UserError(f"--P must be in (0, 1], got {args.P}")
    if args.start < 0 or args.start >= args.end:
        raise UserError(f"need 0 <= --start < --end, got {args.start} and {args.end}")
    positive("--prompt-len", args.prompt_len)


def cmd_acceptance(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Sequoia's acceptance vector of a draft/target pair (arXiv 2402.12374, section 3.1), measured."""
    from tqdm import tqdm

    from engine.acceptance import acceptance_vector, none_fraction
    from engine.decoder import check_capacity
    from engine.sampling import Sampling
    from utils.data import prompts_from_args
    from utils.experiment import generator_for

    out = out_path(args.output)
    _check_measure_flags(args)
    width = positive("--width", args.width)
    steps = positive("--steps-per-prompt", args.steps_per_prompt)
    pair, device, dtype = load_models(args, args.prompt_len + steps)
    if width > pair.target.vocab_size:
        raise UserError(f"--width {width} exceeds the vocabulary ({pair.target.vocab_size} tokens)")
    prompts = prompts_from_args(args, pair.tokenizer)
    sampling = Sampling(args.T, args.P)
    counts = torch.zeros(width + 2, dtype=torch.long)
    root_counts = torch.zeros(width + 2, dtype=torch.long) if pair.draft.uses_target_features else None
    for prompt in tqdm(prompts, desc="acceptance", unit="prompt", dynamic_ncols=True):
        try:
            check_capacity(pair.target, len(prompt.ids), steps, 0)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        measured = prompt_counts(pair, prompt.ids, steps, width, sampling, generator_for(device, args.seed + prompt.index))
        counts += measured.deep
        if root_counts is not None:
            root_counts += measured.root
    vec = acceptance_vector(counts)  # [W + 1], index 0 padding, 'none accepted' dropped
    none = none_fraction(counts)
    root_vec = None if root_counts is None else acceptance_vector(root_counts)
    table = sequoia_dp(vec.tolist(), max(SEQUOIA_BUDGETS), SEQUOIA_LEVELS, None if root_vec is None else root_vec.tolist())
    best = {str(n): table.value(n, SEQUOIA_LEVELS) for n in SEQUOIA_BUDGETS}
    root_entries = {} if root_vec is None else {
        "root_acceptance": root_vec.tolist(), "root_none_accepted": none_fraction(root_counts),
        "root_counts": root_counts.tolist()}
    record = {
        "description": "Positional acceptance vector: acceptance[k] = fraction of positions where the k-th drafted "
                       "child was accepted. Index 0 is padding; the 'none accepted' fraction is none_accepted "
                       "(Sequoia's vector = acceptance + [none_accepted])." + ("" if root_vec is None else FEATURE_REGIMES),
        "made_by": command_line(argv), "method": "Sequoia (arXiv 2402.12374): along the target's own continuation",
        "target": pair.target_name, "draft": pair.draft_name, "dataset": args.dataset, "range": [args.start, args.end],
        "prompts": len(prompts), "prompt_len": args.prompt_len, "steps_per_prompt": steps,
        "positions": int(counts.sum()), "T": args.T, "P": args.P, "width": width, "seed": args.seed,
        "rule": "greedy: child == target argmax" if sampling.greedy else
                "SpecInfer/Sequoia: children sampled without replacement from the draft, accept min(1, p/q)",
        "acceptance": vec.tolist(), "none_accepted": none, "counts": counts.tolist(), **root_entries,
        "counts_layout": "[0 (padding), accepted at rank 1..W, none accepted]",
        f"sequoia_best_tokens_per_step_{SEQUOIA_LEVELS}_levels": best,
        **_environment(device, dtype),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vec, out)
    write_json(out.with_suffix(".json"), record)
    print(f"{record['positions']} positions over {len(prompts)} prompts; "
          + ("" if root_vec is None else "deep (nodes below depth 1, self-fed features): ") + _vector_line(vec, none))
    if root_vec is not None:
        print("root (the root's children, the target's features): " + _vector_line(root_vec, record["root_none_accepted"]))
    print("Sequoia's best tree at 10 levels: " + ", ".join(f"{n} nodes {v:.3f}" for n, v in best.items()) + " tokens/step")
    print(f"wrote {out} and {out.with_suffix('.json')}")


FEATURE_REGIMES = (
    " A feature draft is measured in two regimes on the same positions. acceptance / none_accepted / counts (and the "
    ".pt): deep, the draft fed its own predicted feature of the previous position, as every tree node below depth "
    "1 runs. root_acceptance / root_none_accepted / root_counts: root, the draft fed the target's real feature, as "
    "the root's children run. search, build and inspect score the root's children with root_acceptance and every "
    "other node with acceptance; so do the sequoia_best figures.")


def _vector_line(vec: torch.Tensor, none: float) -> str:
    """p[1..8], the ranks' sum and the 'none accepted' fraction of an acceptance vector, in one line."""
    shown = " ".join(f"{x:.4f}" for x in vec[1:9].tolist())
    return f"p[1..{min(vec.shape[0] - 1, 8)}] = {shown}; ranks sum {float(vec.sum()):.4f}, none accepted {none:.4f}"


def parse_sizes(text: str, flag: str) -> list[int]:
    """ "1,2,4,..." -> sorted distinct positive sizes (each at most MAX_NODES)."""
    try:
        sizes = sorted({int(x) for x in text.replace(" ", "").split(",") if x != ""})
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > MAX_NODES:
        raise UserError(f"{flag} sizes must lie in 1..{MAX_NODES}, got {text!r}")
    return sizes


def cmd_latency(args: argparse.Namespace, argv: Sequence[str], target_loader=None) -> None:
    """Sequoia's hardware profile (arXiv 2402.12374, section 3.2): target forward time per tree size, draft step time."""
    from engine.cuda_graphs import graph_counts
    from engine.drafters import append_tokens
    from utils.models import layer_placement

    out = Path(args.output)
    if out.suffix != ".json":
        raise UserError(f"output must be a .json file: {args.output}")
    sizes = sorted(set(parse_sizes(args.sizes, "--sizes")) | {1})  # n = 1 (autoregressive) is always needed
    draft_sizes = sorted(set(parse_sizes(args.draft_sizes, "--draft-sizes")) | {positive("--draft-frontier", args.draft_frontier)})
    repeats, warmup = positive("--repeats", args.repeats), args.warmup
    if warmup < 0 or args.prefix < 0:
        raise UserError("--warmup and --prefix must be >= 0")
    if args.threads is not None:
        torch.set_num_threads(positive("--threads", args.threads))
    pair, device, dtype = load_models(args, args.prefix + max(sizes + draft_sizes), target_loader, args.cuda_graphs)
    generator = torch.Generator().manual_seed(args.seed)
    vocab = pair.target.vocab_size
    prefix_ids = torch.randint(0, vocab, (args.prefix,), generator=generator).to(device)
    calls = {}
    for model, kind, kind_sizes, make in ((pair.target, "target", sizes, target_call),
                                          (pair.draft, "draft", draft_sizes, draft_call)):
        if args.prefix:
            append_tokens(model, prefix_ids, 0, last_logits=False,
                          prev_features=model.placeholder_features(args.prefix))
        for n in kind_sizes:
            calls[f"{kind}:{n}"] = make(model, tree_inputs(n, args.prefix, vocab, args.tree, generator, device))
    timings = time_round_robin(calls, repeats, warmup, device)
    per = {kind: {key.split(":")[1]: ms for key, ms in timings.items() if key.startswith(kind + ":")}
           for kind in ("target", "draft")}
    median = {kind: {n: statistics.median(ms) for n, ms in rows.items()} for kind, rows in per.items()}
    record = {
        "description": "target_ms[n]: one target forward over a tree of n tokens (root included) after `prefix` "
                       "cached tokens; draft_step_ms: one draft growth step (forward over draft_frontier nodes + "
                       f"top-{DRAFT_TOPK}). Medians of `repeats` timed runs after `warmup` untimed ones, sizes "
                       "interleaved round-robin. Read by `growmap_tool search --latency`.",
        "made_by": command_line(argv), "target": pair.target_name, "draft": pair.draft_name,
        "target_ms": median["target"], "draft_step_ms": median["draft"][str(args.draft_frontier)],
        "draft_frontier": args.draft_frontier, "draft_ms": median["draft"],
        "timings_ms": per, "prefix": args.prefix, "tree": args.tree, "repeats": repeats, "warmup": warmup,
        "seed": args.seed, "offloading": layer_placement(pair.target.hf_model),
        "cuda_graph_calls": {"target": graph_counts(pair.target), "draft": graph_counts(pair.draft)},
        **_environment(device, dtype),
        "kernel": args.kernel,
    }
    write_json(out, record)
    print(f"{'tokens':>6} {'target ms':>10} {'min':>8} {'max':>8}")
    for n, ms in per["target"].items():
        print(f"{n:>6} {median['target'][n]:>10.3f} {min(ms):>8.3f} {max(ms):>8.3f}")
    print("draft step ms by frontier: " + ", ".join(f"{n}: {v:.3f}" for n, v in median["draft"].items())
          + f"; draft_step_ms = {record['draft_step_ms']:.3f} (frontier {args.draft_frontier})")
    noisy = [f"{kind} {n}" for kind, rows in per.items() for n, ms in rows.items() if median[kind][n] > 1.25 * min(ms)]
    if noisy:
        print(f"note: median more than 25% above the fastest run for {', '.join(noisy)}: the machine looks busy; "
              "rerun on an idle one (or with more --repeats)")
    graphs = "CUDA graphs" if record["cuda_graph_calls"]["target"] is not None else "eager"
    print(f"wrote {out} ({record['device']}, {record['dtype']}, {record['threads']} threads, {graphs})")

