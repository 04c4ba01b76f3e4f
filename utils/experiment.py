"""What every decoding script does between parsing flags and reporting: load the models, run the prompts
in the chosen mode, and summarise the per-step statistics."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from engine.cuda_graphs import graph_counts, with_cuda_graphs
from engine.decoder import (DecodeResult, Drafter, StepTimer, VerifierFn, autoregressive_generate, check_capacity,
                            speculative_generate)
from engine.drafters import DraftPrefix, teacher_forced_logits
from engine.growmap import Growmap, load_growmap
from engine.linear_paths import GGUF_PATHS, KernelPlan, apply_linear_path
from engine.model import TreeModel
from engine.prompt_lookup import with_prompt_lookup
from engine.sampling import Sampling
from utils.data import Prompt, next_turn
from utils.errors import UserError
from utils.gguf_weights import gguf_linears
from utils.models import (DEFAULT_TARGET, check_vocab_match, default_draft_for, is_feature_draft, layer_placement,
                          load_draft_vocab, load_feature_net, load_hf_model, load_tokenizer, resolve_model_path)
from utils.native_kernels import native_layer_step
from utils.report import wall_clock
from utils.run_log import SINGLE, Processes, check_resume, open_run, sweep


WARMUP_TOKENS = 4  # new tokens of the untimed warm-up call before timed runs


@dataclass(frozen=True)
class KernelChoice:
    """The dtype and linear-layer kernels each model runs with (picked by utils/calibration/), the one line
    saying so, and the record the result JSON keeps."""

    target: KernelPlan
    draft: KernelPlan
    line: str
    record: dict


@dataclass(frozen=True)
class TextPrompts:
    """A text run's tokenizer and prompts. Scripts load them first, before the calibration or any model, so a bad
    dataset (rows it cannot read, ids of an unknown tokenizer) fails in seconds, not after the models load."""

    tokenizer: object
    prompts: list[Prompt]


def load_text_prompts(args: argparse.Namespace) -> TextPrompts:
    """The --target's tokenizer and the prompts the data flags name (utils.data.prompts_from_args)."""
    from utils.data import prompts_from_args

    tokenizer = load_tokenizer(args.target)
    return TextPrompts(tokenizer, prompts_from_args(args, tokenizer))


def fixed_plan(args: argparse.Namespace, need_draft: bool) -> tuple[Growmap, dict, KernelChoice]:
    """A static-tree run without calibration: --growmap (or the shipped default) and both models in --dtype
    with plain kernels. utils/calibration's `plan_static_run` is the calibrated one (same signature)."""
    from utils.cli import resolve_dtype
    from utils.config import DEFAULTS

    path = args.growmap or DEFAULTS.growmap
    growmap = load_growmap(path)
    plan = KernelPlan(resolve_dtype(args.dtype, args.device))
    choice = KernelChoice(plan, plan, f"kernels: {plan.label} for both models (not calibrated)",
                          {"target": plan.label, "draft": plan.label, "calibrated": False})
    return growmap, {"path": path}, choice


@dataclass
class ModelPair:
    target: TreeModel
    draft: TreeModel | None
    tokenizer: object
    target_name: str
    draft_name: str | None
    eos_ids: set[int]


def eos_ids_of(tokenizer, hf_model) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often add one there)."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(hf_model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def use_linear_path(module: torch.nn.Module, path: str, target_spec: str | None, draft: bool = False) -> None:
    """`apply_linear_path`, with the target's GGUF blocks looked up for the "gguf" path (a draft's head may be
    the target's embedding; a draft's own layers are quantized to Q8_0 blocks there)."""
    apply_linear_path(module, path, gguf_linears(target_spec, module, quantize_rest=draft, path=path)
                      if path in GGUF_PATHS else None)


def with_native_layers(model: TreeModel, path: str) -> TreeModel:
    """On the "gguf" and "q8" paths, the model's decoder layers run as one native call each where they can
    (engine/native_layers.py); any other path, or layers it does not run, keep torch's ops."""
    if path in GGUF_PATHS:
        model.layer_step = native_layer_step(model.layers, model.num_heads, model.kv_heads, model.head_dim)
    return model


def load_draft(spec: str | None, target_spec: str | None, target: TreeModel, dtype: torch.dtype, device: str,
               max_len: int, linear_path: str = "plain") -> tuple[str, TreeModel]:
    """A draft for an already loaded target (full or subset vocabulary), as (name, TreeModel), its linear
    layers on `linear_path` (engine/linear_paths.py).

    spec None means the suite's own draft for the target; a vocabulary that does not match is refused.
    """
    target_name = target_spec or DEFAULT_TARGET
    name = spec or default_draft_for(target_spec)
    if name is None:
        raise UserError(f"no default draft for target {target_name}: pass --model (a hub id, a folder such as "
                        "./outputs/checkpoint-500/, or a .gguf file)")
    if is_feature_draft(name):
        from engine.feature_draft import FeatureDraftModel

        net, head_ids = load_feature_net(resolve_model_path(name), target.hf_model, dtype)
        use_linear_path(net.to(device), linear_path, target_spec, draft=True)
        return name, with_native_layers(FeatureDraftModel(net.to(device), max_len, None if head_ids is None
                                                          else torch.tensor(head_ids)), linear_path)
    vocab = load_draft_vocab(name)
    hf_model = load_hf_model(name, dtype, device)
    use_linear_path(hf_model, linear_path, target_spec, draft=True)
    if vocab is None:
        check_vocab_match(hf_model.lm_head.out_features, target.vocab_size, name, target_name)
        return name, with_native_layers(TreeModel(hf_model, max_len), linear_path)
    check_vocab_match(vocab.target_vocab_size, target.vocab_size, name, target_name)
    return name, with_native_layers(TreeModel(hf_model, max_len, input_map=vocab.input_map(),
                                              output_ids=torch.tensor(vocab.draft_to_target)), linear_path)


def load_pair(target: str | None, draft: str | None, need_draft: bool, dtype: torch.dtype, device: str,
              max_len: int, tokenizer=None, load_target: Callable | None = None,
              plans: tuple[KernelPlan, KernelPlan] | None = None, cuda_graphs: bool = False) -> ModelPair:
    """Target, tokenizer and (when needed) draft, as TreeModels with `max_len` cache slots each: both in
    `dtype` with plain kernels, or as `plans` says (target's plan, draft's plan; see utils/calibration/);
    `load_target(spec, dtype, device)` replaces the plain target load (--offloading, whose target keeps plain
    kernels: its weights are not all in memory to pack). With `cuda_graphs` on a CUDA device both replay CUDA
    graphs (engine/cuda_graphs.py), except an offloaded target, whose weights move during its forward."""
    target_plan, draft_plan = plans or (KernelPlan(dtype), KernelPlan(dtype))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(target)
    target_hf = (load_target or load_hf_model)(target, target_plan.dtype, device)
    if load_target is None:
        use_linear_path(target_hf, target_plan.linear_path, target)
    target_model = with_native_layers(TreeModel(target_hf, max_len), target_plan.linear_path)
    draft_name, draft_model = (load_draft(draft, target, target_model, draft_plan.dtype, device, max_len,
                                          draft_plan.linear_path) if need_draft else (None, None))
    target_model = with_cuda_graphs(target_model, cuda_graphs and load_target is None)
    draft_model = draft_model if draft_model is None else with_cuda_graphs(draft_model, cuda_graphs)
    return ModelPair(target_model, draft_model, tokenizer, target or DEFAULT_TARGET, draft_name,
                     eos_ids_of(tokenizer, target_hf))


def generator_for(device: str | torch.device, seed: int) -> torch.Generator:
    """A seeded generator on `device`: CUDA sampling needs a CUDA generator, and a fresh one per prompt keeps
    each prompt's draws independent of the others and of the warm-up."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class PromptRecord:
    prompt: Prompt
    result: DecodeResult
    baseline: DecodeResult | None = None
    later_turns: list[PromptRecord] = field(default_factory=list)  # a conversation's later turns (--turns all)
    references: dict[str, DecodeResult] = field(default_factory=dict)  # benchmark mode: other methods' runs


@dataclass
class PromptInputs:
    """What a prompt needs beyond its token ids (an image prompt, utils/llava/): the target's first-layer
    inputs [L, d] and the draft's own version of the prompt."""

    prompt_embeds: torch.Tensor | None = None
    draft_prefix: DraftPrefix | None = None


# (prompt, with_draft) -> its inputs; runs inside each timed call, so encoding the image is part of its time
Prepare = Callable[[Prompt, bool], PromptInputs]
# (prompt, max_new_tokens) -> a run of another method, timed alongside in benchmark mode (e.g. transformers')
Reference = Callable[[Prompt, int], DecodeResult]


@dataclass
class RunSettings:
    mode: str                 # greedy (speculative) | baseline | benchmark (both, alternating)
    sampling: Sampling
    verifier: str | VerifierFn
    max_new_tokens: int
    seed: int
    record_shapes: bool = False
    extra: dict = field(default_factory=dict)
    prepare: Prepare | None = None
    references: dict[str, Reference] = field(default_factory=dict)


def run_prompts(pair: ModelPair, drafter: Drafter | None, prompts: list[Prompt], settings: RunSettings,
                tree_size: int, on_record: Callable[[PromptRecord], None] | None = None,
                progress: bool = True) -> list[PromptRecord]:
    """Decode every prompt in the chosen mode, after one short warm-up so first-call costs stay out;
    `on_record` sees each prompt's record as soon as it is done."""
    for prompt in prompts:
        check_capacity(pair.target, len(prompt.ids), settings.max_new_tokens, tree_size)
    if not prompts:
        return []
    device = str(pair.target.device)
    references = settings.references if settings.mode == "benchmark" else {}

    def prepared(prompt: Prompt, with_draft: bool) -> tuple[PromptInputs, float]:
        if settings.prepare is None:
            return PromptInputs(), 0.0
        with wall_clock(device) as elapsed:
            inputs = settings.prepare(prompt, with_draft)
        return inputs, elapsed[0]

    def counted(result: DecodeResult, input_seconds: float) -> DecodeResult:
        result.seconds += input_seconds
        if result.time_split and input_seconds:
            result.time_split["input_encoding"] = input_seconds
        return result

    def speculative(prompt: Prompt, budget: int, timed: bool) -> DecodeResult:
        timer = StepTimer(device, enabled=timed)
        inputs, input_seconds = prepared(prompt, True)
        return counted(speculative_generate(pair.target, drafter, prompt.ids, budget, pair.eos_ids, settings.sampling,
                                            settings.verifier, generator_for(device, settings.seed + prompt.index),
                                            timer=timer, record_shapes=settings.record_shapes,
                                            prompt_embeds=inputs.prompt_embeds, draft_prefix=inputs.draft_prefix),
                       input_seconds)

    def baseline(prompt: Prompt, budget: int) -> DecodeResult:
        inputs, input_seconds = prepared(prompt, False)
        return counted(autoregressive_generate(pair.target, prompt.ids, budget, pair.eos_ids, settings.sampling,
                                               generator_for(device, settings.seed + prompt.index),
                                               prompt_embeds=inputs.prompt_embeds), input_seconds)

    warm = prompts[0]
    if settings.mode != "baseline":
        speculative(warm, WARMUP_TOKENS, False)
    if settings.mode != "greedy":
        baseline(warm, WARMUP_TOKENS)
    for reference in references.values():
        reference(warm, WARMUP_TOKENS)

    def decode(prompt: Prompt) -> PromptRecord:
        if settings.mode == "baseline":
            return PromptRecord(prompt, baseline(prompt, settings.max_new_tokens))
        if settings.mode == "greedy":
            return PromptRecord(prompt, speculative(prompt, settings.max_new_tokens, False))
        result = speculative(prompt, settings.max_new_tokens, True)
        others = {name: run(prompt, settings.max_new_tokens) for name, run in references.items()}
        return PromptRecord(prompt, result, baseline(prompt, settings.max_new_tokens), references=others)

    records = []
    for prompt in tqdm(prompts, desc=settings.mode, unit="prompt", dynamic_ncols=True, disable=not progress):
        record = answer = decode(prompt)
        # --turns all: each later turn is asked with the answers so far; the conversation is one record
        while (turn := next_turn(pair.tokenizer, answer.prompt, answer.result.output_ids)) is not None:
            fit_turn(pair.target, turn, settings.max_new_tokens, tree_size)
            answer = decode(turn)
            record.later_turns.append(answer)
        records.append(record)
        if on_record is not None:
            on_record(record)
    return records


def fit_turn(target: TreeModel, prompt: Prompt, max_new_tokens: int, tree_size: int) -> None:
    """A later turn's prompt (the conversation so far) still fits the KV cache."""
    try:
        check_capacity(target, len(prompt.ids), max_new_tokens, tree_size)
    except ValueError as exc:
        raise UserError(f"row {prompt.index} turn {prompt.turn + 1}: {exc}; raise --M") from exc


RESULT_FIELDS = ("output_ids", "target_steps", "accepted_per_step", "seconds", "time_split")
BASELINE = "baseline_"  # prefix of the benchmark baseline's fields in a row


def result_row(record: PromptRecord, tokenizer) -> dict:
    """The JSONL row of one prompt: what the streaming writer appends, what merges and resumes read back."""
    result = record.result
    row = {"index": record.prompt.index, "turn": record.prompt.turn, "kind": record.prompt.kind,
           "prompt_ids": record.prompt.ids,
           "output_ids": result.output_ids,
           "output_text": tokenizer.decode(result.output_ids, skip_special_tokens=True),
           **{key: getattr(result, key) for key in RESULT_FIELDS[1:]}}
    if result.tree_shapes:
        row["tree_shapes"] = result.tree_shapes
    if record.baseline is not None:
        row.update({BASELINE + key: getattr(record.baseline, key) for key in RESULT_FIELDS})
    if result.substitutions:  # only a lossy verifier substitutes
        row.update(substitutions=result.substitutions, after_substitution=result.after_substitution)
    for name, run in record.references.items():
        row.update({reference_prefix(name) + key: getattr(run, key) for key in RESULT_FIELDS})
    if record.prompt.image is not None:
        row["image"] = record.prompt.image
    if record.later_turns:
        row["later_turns"] = [result_row(turn, tokenizer) for turn in record.later_turns]
    return row


def turn_rows(rows: list[dict]) -> list[dict]:
    """Every turn's row: a conversation (--turns all) nests its later turns in its first turn's row."""
    return [turn for row in rows for turn in (row, *row.get("later_turns", ()))]


def reference_prefix(name: str) -> str:
    """Prefix of a benchmark reference's fields in a row ("transformers generate" -> "transformers_generate_")."""
    return name.replace(" ", "_") + "_"


def result_of_row(row: dict, prefix: str = "") -> DecodeResult:
    """The DecodeResult a row was made from (`prefix` BASELINE: the benchmark's baseline), for summaries."""
    return DecodeResult(**{key: row[prefix + key] for key in RESULT_FIELDS}, tree_shapes=row.get("tree_shapes", []))


def summarize(results: list[DecodeResult]) -> dict:
    """The figures DESIGN.md names, over all prompts."""
    new_tokens = sum(len(r.output_ids) for r in results)
    steps = sum(r.target_steps for r in results)
    seconds = sum(r.seconds for r in results)
    accepted = [a - 1 for r in results for a in r.accepted_per_step]  # drafted tokens accepted per step
    deepest = max(accepted, default=0)
    by_depth = [sum(a >= d for a in accepted) / max(len(accepted), 1) for d in range(1, deepest + 1)]
    split: dict[str, float] = {}
    for r in results:
        for phase, value in r.time_split.items():
            split[phase] = split.get(phase, 0.0) + value
    return {
        "prompts": len(results),
        "new_tokens": new_tokens,
        "target_steps": steps,
        "mean_accepted_tokens": new_tokens / max(steps, 1),
        "acceptance_by_depth": by_depth,
        "seconds": seconds,
        "seconds_per_token": seconds / max(new_tokens, 1),
        "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0,
        "time_split": split,
    }


def token_log_likelihoods(target: TreeModel, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """[len(output_ids)] the target's log-probability of each of `output_ids` after `prompt_ids`, in one forward."""
    ids = torch.tensor(prompt_ids + output_ids, device=target.device)
    rows = torch.arange(len(prompt_ids) - 1, ids.shape[0] - 1, device=target.device)
    logprobs = teacher_forced_logits(target, ids, rows).float().log_softmax(dim=-1)  # [len(output), V]
    return logprobs.gather(1, ids[len(prompt_ids):, None])[:, 0]


def mean_log_likelihood(target: TreeModel, prompt_ids: list[int], output_ids: list[int]) -> float:
    """The target's mean log-probability per token of `output_ids` after `prompt_ids`, in one forward."""
    return float(token_log_likelihoods(target, prompt_ids, output_ids).mean()) if output_ids else 0.0


def quality_row(target: TreeModel, prompt_ids: list[int], output_ids: list[int], reference_ids: list[int]) -> dict:
    """How a (possibly lossy) output compares with the target's own greedy output of the same prompt."""
    same = [i < len(reference_ids) and reference_ids[i] == token for i, token in enumerate(output_ids)]
    first = next((i for i, equal in enumerate(same) if not equal), None)
    if first is None and len(output_ids) != len(reference_ids):
        first = min(len(output_ids), len(reference_ids))
    return {"equal_tokens": sum(same), "first_difference": first,
            "log_likelihood": mean_log_likelihood(target, prompt_ids, output_ids),
            "reference_log_likelihood": mean_log_likelihood(target, prompt_ids, reference_ids)}


def summarize_quality(rows: list[dict], outputs: list[list[int]], references: list[list[int]]) -> dict:
    """Over all prompts: share of output tokens equal to the reference at their position, identical outputs,
    first differences, and the target's mean log-likelihood per token of both (token-weighted)."""
    tokens = sum(len(o) for o in outputs)
    ref_tokens = sum(len(r) for r in references)
    firsts = [row["first_difference"] for row in rows]
    return {"reference": "the target alone, greedy, same prompts and budget",
            "token_match": sum(row["equal_tokens"] for row in rows) / max(tokens, 1),
            "identical_outputs": sum(f is None for f in firsts),
            "first_difference": firsts,
            "log_likelihood": sum(row["log_likelihood"] * len(o) for row, o in zip(rows, outputs)) / max(tokens, 1),
            "reference_log_likelihood": sum(row["reference_log_likelihood"] * len(r)
                                            for row, r in zip(rows, references)) / max(ref_tokens, 1)}


def add_quality(pair: ModelPair, rows: list[dict], max_new_tokens: int, cache: dict[int, list[int]]) -> dict:
    """Quality figures of finished rows against the target-alone greedy output of each prompt: the benchmark
    baseline's, from `cache` (prompt index -> output, shared between runs on the same prompts), or decoded now
    (untimed). Each row gets its own under "quality"; returns the summary's."""
    references, figures = [], []
    for row in rows:
        index = int(row["index"])
        if index not in cache:
            cache[index] = row.get(BASELINE + "output_ids") or autoregressive_generate(
                pair.target, row["prompt_ids"], max_new_tokens, pair.eos_ids, Sampling(),
                generator_for(pair.target.device, 0)).output_ids
        references.append(cache[index])
        row["quality"] = quality_row(pair.target, row["prompt_ids"], row["output_ids"], cache[index])
        figures.append(row["quality"])
    return summarize_quality(figures, [row["output_ids"] for row in rows], references)


def sampled_children(args: argparse.Namespace) -> bool:
    """Whether this run's drafter samples children from the draft (speculative decoding with the specinfer
    verifier at T > 0) rather than taking its top-k."""
    from engine.verifiers import SAMPLED_CHILDREN

    return args.Mode != "baseline" and SAMPLED_CHILDREN["greedy" if args.T == 0 else args.verify]


def describe_args(args: argparse.Namespace) -> dict:
    return {key: value for key, value in vars(args).items()}


@dataclass
class Workload:
    """The models and prompts a decoding script runs, and what image prompts add (utils/llava/)."""

    pair: ModelPair
    prompts: list[Prompt]
    prepare: Prepare | None = None
    references: dict[str, Reference] = field(default_factory=dict)  # timed alongside in benchmark mode
    meta: dict = field(default_factory=dict)                         # added to the result JSON


def check_kv_slots(args: argparse.Namespace, prompt_len: int, tree_size: int) -> None:
    """--M must hold the longest prompt, the new tokens and one step's tree."""
    needed = prompt_len + args.max_new_tokens + tree_size
    if needed > args.M:
        raise UserError(f"--M {args.M} is too small: prompt ({prompt_len}) + new tokens ({args.max_new_tokens}) "
                        f"+ tree ({tree_size}) need {needed} KV slots")


def reference_summaries(rows: list[dict], names: list[str]) -> dict:
    """Per benchmark reference: its figures, speculative decoding's speedup over it, and on how many prompts
    the two outputs are the same."""
    spec = summarize([result_of_row(row) for row in rows])
    summaries = {}
    for name in names:
        figures = summarize([result_of_row(row, reference_prefix(name)) for row in rows])
        same = sum(row["output_ids"] == row[reference_prefix(name) + "output_ids"] for row in rows)
        summaries[name] = {**figures, "speedup": figures["seconds_per_token"] / max(spec["seconds_per_token"], 1e-12),
                           "same_output_prompts": same}
    return summaries


def execute(args: argparse.Namespace, script: str, make_drafter, tree_size: int, meta: dict,
            processes: Processes = SINGLE, load_target: Callable | None = None, verifier_override=None,
            quality: bool = False, references: dict[int, list[int]] | None = None,
            kernels: KernelChoice | None = None,
            load: Callable[[argparse.Namespace, torch.dtype, int], Workload] | None = None,
            text: TextPrompts | None = None) -> dict | None:
    """The body every decoding script shares: models, prompts, run, summary, result files; returns the summary
    (in the main process).

    make_drafter(pair, sampling, sample_children) -> Drafter builds the script's drafter; `meta` adds
    script-specific settings (growmap, tree budget, ...) to the result JSON. Rows stream to the result files
    as prompts finish (utils/run_log.py); `processes` splits the prompts of a launched sweep; `load_target`
    loads the target another way (--offloading). `verifier_override`, a verifier function with `name` and
    `lossless` attributes, replaces the named verifier (T = 0 only). `quality` (forced for a lossy verifier;
    T = 0 only) compares every output with the target's own greedy output, which `references` (prompt index ->
    output ids) caches across runs on the same prompts. `kernels` (utils/calibration/) sets each model's dtype
    and kernels, else both run in --dtype with plain kernels.
    `load(args, dtype, tree_size)` replaces the text prompts and pair with another workload (test_llava.py's
    image prompts; it checks --M itself). `text`: the prompts the script loaded first (`load_text_prompts`),
    else they are loaded here.
    """
    from engine.verifiers import LOSSLESS, SAMPLED_CHILDREN
    from utils.cli import resolve_dtype
    from utils.report import emit, format_summary, hardware, library_versions

    device = processes.device or args.device
    dtype = kernels.target.dtype if kernels else resolve_dtype(args.dtype, device)
    lookup = getattr(args, "lookup", 0) if args.Mode != "baseline" else 0
    tree_size += lookup
    flags = describe_args(args)
    if args.resume:
        check_resume(args.resume, script, flags)  # a wrong --resume fails before anything loads
    if load is None:
        check_kv_slots(args, args.prompt_len, tree_size)
        text = text if text is not None else load_text_prompts(args)
        tokenizer, prompts = text.tokenizer, text.prompts
        turns = 1 + max(len(p.later_turns) for p in prompts)
        if turns > 1 and turns * (args.prompt_len + args.max_new_tokens) + tree_size > args.M:
            raise UserError(f"--M {args.M} is too small for {turns}-turn conversations: each turn adds up to a "
                            f"prompt ({args.prompt_len}) and an answer ({args.max_new_tokens}) to the next turn's prompt")
    sampling = Sampling(args.T, args.P)
    verifier = "greedy" if sampling.greedy else args.verify
    lossless = LOSSLESS[verifier]
    sample_children = SAMPLED_CHILDREN[verifier]
    if verifier_override is not None and args.Mode != "baseline":
        if not sampling.greedy:
            raise UserError(f"the {verifier_override.name} verifier serves greedy decoding only: use --T 0")
        verifier, lossless = verifier_override, verifier_override.lossless
    name = verifier if isinstance(verifier, str) else verifier.name
    quality = (quality or not lossless) and sampling.greedy and args.Mode != "baseline"
    if kernels and processes.main:
        emit(kernels.line)
    plans = (kernels.target, kernels.draft) if kernels else None
    if load is None:
        workload = Workload(load_pair(args.target, args.model, args.Mode != "baseline", dtype, device, args.M,
                                      tokenizer, load_target, plans, cuda_graphs=args.cuda_graphs), prompts)
    else:
        workload = load(args, dtype, tree_size)
    # the result files exist from here on: a run that fails on its data or models leaves none behind
    # (validate_common checked --results-dir before anything loaded)
    log = processes.share(open_run(args.results_dir, args.resume, script, flags) if processes.main else None)
    pair, tokenizer, prompts = workload.pair, workload.pair.tokenizer, workload.prompts
    drafter = None if args.Mode == "baseline" else make_drafter(pair, sampling, sample_children)
    drafter = with_prompt_lookup(drafter, lookup, args.lookup_ngram)
    settings = RunSettings(args.Mode, sampling, verifier, args.max_new_tokens, args.seed,
                           record_shapes=getattr(args, "record_shapes", False), prepare=workload.prepare,
                           references=workload.references)
    header = {"script": script, "flags": flags, "target": pair.target_name, "draft": pair.draft_name,
              "dtype": str(dtype).removeprefix("torch."), "device": args.device, "versions": library_versions(),
              "hardware": hardware(), "seed": args.seed, "dataset": args.dataset, "range": [args.start, args.end],
              "verifier": name if args.Mode != "baseline" else "none (autoregressive)",
              "lossless": lossless, **meta,
              "prompt_lookup": {"max_tokens": lookup, "max_ngram": getattr(args, "lookup_ngram", None)},
              "processes": {"count": processes.world, "devices": processes.gather([device])},
              "offloading": layer_placement(pair.target.hf_model), "kernels": kernels.record if kernels else None,
              **workload.meta}

    def summary_of(rows: list[dict]) -> dict:
        summary = {**header, **summarize([result_of_row(row) for row in turn_rows(rows)])}
        summary["cuda_graph_calls"] = {"target": graph_counts(pair.target), "draft": graph_counts(pair.draft)}
        if args.Mode == "benchmark":
            summary["baseline"] = summarize([result_of_row(row, BASELINE) for row in turn_rows(rows)])
            summary["speedup"] = summary["baseline"]["seconds_per_token"] / max(summary["seconds_per_token"], 1e-12)
            if workload.references:
                summary["references"] = reference_summaries(rows, list(workload.references))
        if not lossless:
            summary["substitutions"] = sum(row.get("substitutions", 0) for row in rows)
            summary["after_substitution"] = sum(row.get("after_substitution", 0) for row in rows)
        return summary

    def work(mine: list[Prompt], append: Callable[[dict], None]) -> None:
        run_prompts(pair, drafter, mine, settings, tree_size, lambda record: append(result_row(record, tokenizer)),
                    progress=processes.main)

    swept = sweep(log, prompts, lambda prompt: prompt.index, work, summary_of, processes)
    if swept is None:
        return
    summary, rows = swept
    if quality:
        summary["quality"] = add_quality(pair, rows, args.max_new_tokens, {} if references is None else references)
        log.finish(summary, {int(row["index"]): row for row in rows}, partial=len(rows) < len(prompts))
    title = "autoregressive baseline" if args.Mode == "baseline" else f"speculative decoding ({name} verification)"
    if not lossless:
        title += ", LOSSY: output may differ from the target's own"
    emit(format_summary(title, summary))
    if not lossless:
        emit(f"  substitutions           {summary['substitutions']} accepted draft tokens overwritten; "
             f"{summary['after_substitution']} tokens emitted at or after one")
    if quality:
        q = summary["quality"]
        emit(f"  equals target alone     {100 * q['token_match']:.1f}% of tokens, {q['identical_outputs']}/"
             f"{len(rows)} outputs identical")
        emit(f"  target log-likelihood   {q['log_likelihood']:.3f} per token (target alone: "
             f"{q['reference_log_likelihood']:.3f})")
    if args.Mode == "benchmark":
        emit(format_summary("autoregressive baseline (same prompts, alternating)", summary["baseline"]))
        emit(f"  speedup                 {summary['speedup']:.2f}x")
        for name, figures in summary.get("references", {}).items():
            emit(format_summary(f"{name} (same prompts, alternating)", figures))
            emit(f"  speedup                 {figures['speedup']:.2f}x (speculative decoding vs {name})")
            emit(f"  same output             {figures['same_output_prompts']} of {figures['prompts']} prompts")
    if summary["offloading"] and summary["target_steps"]:
        places = ", ".join(f"{count} on {place}" for place, count in summary["offloading"].items())
        verify_ms = 1000 * summary["time_split"].get("verification", 0.0) / summary["target_steps"]
        emit(f"  offloaded target layers {places}; verification {verify_ms:.1f} ms per target step (trees up to "
             f"{tree_size} nodes; per tree size: python -m utils.growmap_tool latency --offloading)")
    emit(f"results: {log.json_path}")
    summary["results"] = str(log.json_path)
    return summary
