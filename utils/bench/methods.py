"""The methods `python -m utils.bench` compares, each as a `Runner(prompt, max_new_tokens) -> Run`.

transformers' methods (`generate`, `assisted`, `prompt_lookup`) run the plain transformers model; this
suite's (`baseline`, `static_tree`, `dynamic_tree`) run the engine over the same weights. Every runner is
timed the same way (wall clock around the whole call, CUDA synchronised) and counts its target forwards.

A draft over a vocabulary subset (draft_vocab.json) cannot be a transformers assistant as it is: its
embedding takes its own ids and its head scores its own tokens. `subset_vocab_assistant` wraps a copy of
it so that it speaks the target's vocabulary: the embedding looks target ids up through the input map, and
the head computes the draft's own (subset) logits and scatters them into a full-vocabulary row filled with
-inf, so tokens outside the subset are never proposed. The wrapper's matmul is the subset head's; its extra
cost is writing a target-vocabulary row per token, which `forward_ms` measures so reports stay honest.
"""
from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from engine.decoder import Drafter, autoregressive_generate, speculative_generate
from engine.drafters import StaticTreeDrafter
from engine.dynamic_drafter import DynamicTreeDrafter
from engine.growmap import Growmap
from engine.linear_paths import plain_copy
from engine.prompt_lookup import with_prompt_lookup
from engine.sampling import Sampling
from utils.data import Prompt
from utils.experiment import WARMUP_TOKENS, ModelPair, generator_for
from utils.models import DraftVocab, load_draft_vocab
from utils.report import wall_clock

HF_METHODS = ("generate", "assisted", "prompt_lookup")
SUITE_METHODS = ("baseline", "static_tree", "dynamic_tree")
METHODS = HF_METHODS + SUITE_METHODS + ("llama_cpp", "llama_cpp_lookup")  # utils/bench/llama_cpp.py
HF_DTYPES = ("float32", "bfloat16")
PROMPT_LOOKUP_TOKENS = 10


@dataclass
class Run:
    """One method on one prompt."""

    output_ids: list[int]   # new tokens only, EOS included if emitted
    seconds: float
    target_calls: int       # target forward passes (prefill included for transformers' methods)


Runner = Callable[[Prompt, int], Run]


@dataclass(frozen=True)
class DynamicShape:
    """Limits of the dynamic tree: node budget (root included), expansion width, depth limit, and the score
    that ranks its nodes."""

    budget: int
    width: int
    max_depth: int
    score: str

    def slots_bound(self) -> int:
        """The cache slots one step writes from the root's slot on (the drafter's own bound)."""
        return DynamicTreeDrafter.slots_for(self.budget, self.width, self.max_depth)


@contextmanager
def _count_calls(model: nn.Module) -> Iterator[list[int]]:
    """Count the top-level forward calls of `model` inside the block (a forward hook, removed at exit)."""
    calls = [0]

    def hook(module, args, output) -> None:
        calls[0] += 1

    handle = model.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


class MappedEmbedding(nn.Module):
    """Target-vocabulary ids -> the draft's own ids (input map) -> the draft's embedding rows."""

    def __init__(self, embed: nn.Embedding, input_map: torch.Tensor) -> None:
        super().__init__()
        self.embed = embed
        self.register_buffer("input_map", input_map.to(embed.weight.device), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(self.input_map[input_ids])


class ScatteredHead(nn.Module):
    """The draft's subset head, its logits scattered into a target-vocabulary row filled with -inf."""

    def __init__(self, head: nn.Linear, draft_to_target: torch.Tensor, target_vocab_size: int) -> None:
        super().__init__()
        self.head = head
        self.target_vocab_size = target_vocab_size
        self.register_buffer("draft_to_target", draft_to_target.to(head.weight.device), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        own = self.head(hidden)                                                   # [..., draft vocab]
        full = own.new_full((*own.shape[:-1], self.target_vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_to_target, own)                   # [..., target vocab]


def subset_vocab_assistant(draft_hf: nn.Module, vocab: DraftVocab) -> nn.Module:
    """A copy of a subset-vocabulary draft that transformers accepts as `assistant_model`: same weights,
    target-vocabulary ids in, target-vocabulary logits out (see the module docstring)."""
    assistant = copy.deepcopy(draft_hf)
    assistant.model.embed_tokens = MappedEmbedding(assistant.model.embed_tokens, vocab.input_map())
    assistant.lm_head = ScatteredHead(assistant.lm_head, torch.tensor(vocab.draft_to_target),
                                      vocab.target_vocab_size)
    assistant.config.vocab_size = vocab.target_vocab_size
    return assistant


def in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` with torch's plain linear kernels (sharing its weights) when already in `dtype`, else a
    converted copy (the original stays untouched): transformers' methods run as users would run them."""
    plain = plain_copy(model)
    if next(model.parameters()).dtype == dtype:
        return plain
    return copy.deepcopy(plain).to(dtype)


@torch.inference_mode()
def forward_ms(model: nn.Module, prompt_ids: list[int], steps: int = 8) -> float:
    """Median milliseconds of one-token forwards after a prefill of `prompt_ids` (transformers cache)."""
    device = next(model.parameters()).device
    out = model(torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        with wall_clock(device) as elapsed:
            out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        times.append(elapsed[0] * 1000)
    return statistics.median(times)


def sampling_kwargs(sampling: Sampling) -> dict:
    """transformers' flags for the same distribution as the suite's: greedy, or temperature + top-p only."""
    if sampling.greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}


def hf_runner(target_hf: nn.Module, sampling: Sampling, eos_ids: set[int], seed: int, **method: object) -> Runner:
    """transformers' generate on `target_hf`; `method` adds the method's flags (assistant_model=...,
    prompt_lookup_num_tokens=...). Sampling is seeded with seed + prompt index, like the suite."""
    eos = sorted(eos_ids)
    device = next(target_hf.parameters()).device
    flags = {**sampling_kwargs(sampling), **method}
    if eos:
        flags.update(eos_token_id=eos, pad_token_id=eos[0])

    def run(prompt: Prompt, max_new_tokens: int) -> Run:
        ids = torch.tensor([prompt.ids], device=device)
        # an image prompt (utils/llava/): the model's own image path runs inside the timed call
        images = {} if prompt.pixel_values is None else {"pixel_values": prompt.pixel_values.to(device, target_hf.dtype)}
        torch.manual_seed(seed + prompt.index)
        with _count_calls(target_hf) as calls, wall_clock(device) as elapsed:
            out = target_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     **images, **flags)
        return Run(out[0, ids.shape[1]:].tolist(), elapsed[0], calls[0])

    return run


def suite_runner(pair: ModelPair, drafter: Drafter | None, sampling: Sampling, verifier: str, seed: int) -> Runner:
    """The suite's autoregressive baseline (drafter None) or speculative decoding with `drafter`."""
    device = pair.target.device

    def run(prompt: Prompt, max_new_tokens: int) -> Run:
        generator = generator_for(str(device), seed + prompt.index)
        with wall_clock(device) as elapsed:
            if drafter is None:
                result = autoregressive_generate(pair.target, prompt.ids, max_new_tokens, pair.eos_ids, sampling,
                                                 generator)
            else:
                result = speculative_generate(pair.target, drafter, prompt.ids, max_new_tokens, pair.eos_ids,
                                              sampling, verifier, generator)
        return Run(result.output_ids, elapsed[0], result.target_steps)

    return run


@torch.inference_mode()
def next_token_logits(target_hf: nn.Module, prompt_ids: list[int], output_prefix: list[int]) -> torch.Tensor:
    """One teacher-forced target forward over prompt + output_prefix: the logits of the next token ([V])."""
    device = next(target_hf.parameters()).device
    ids = torch.tensor([prompt_ids + output_prefix], device=device)
    return target_hf(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits[0, -1].float()


def rotated(names: list[str], shift: int) -> list[str]:
    """`names` rotated left by `shift` (prompt i runs the methods in order rotated by i)."""
    if not names:
        return []
    shift %= len(names)
    return names[shift:] + names[:shift]


def run_alternating(runners: dict[str, Runner], prompts: list[Prompt], max_new_tokens: int,
                    progress: Callable[[Prompt, dict[str, Run]], None] | None = None) -> dict[str, list[Run]]:
    """Every method on every prompt, prompt by prompt, the method order rotated per prompt so that slow
    drift (thermal, other load) hits all methods alike; `progress(prompt, runs)` after each prompt, with that
    prompt's runs in the order they ran."""
    names = list(runners)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for position, prompt in enumerate(prompts):
        order = rotated(names, position)
        for name in order:
            runs[name].append(runners[name](prompt, max_new_tokens))
        if progress is not None:
            progress(prompt, {name: runs[name][-1] for name in order})
    return runs


def warm_up(runner: Runner, prompt: Prompt, max_new_tokens: int) -> None:
    """One short untimed call, so first-call costs (allocation, kernel selection) stay out of the timings."""
    runner(prompt, min(WARMUP_TOKENS, max_new_tokens))


def time_per_token(runner: Runner, prompt: Prompt, max_new_tokens: int) -> float:
    """Seconds per new token of one call after a short untimed warm-up call (dtype choice)."""
    warm_up(runner, prompt, max_new_tokens)
    run = runner(prompt, max_new_tokens)
    return run.seconds / max(len(run.output_ids), 1)


@dataclass
class BenchSetup:
    """Everything the benchmark loop needs, built and warmed up."""

    runners: dict[str, Runner]
    dtypes: dict[str, str]                    # dtype each method runs in
    hf_dtype_choice: dict[str, dict]          # per transformers method: chosen dtype, seconds/token per candidate
    references: dict[str, tuple[Runner, nn.Module]]  # dtype -> transformers generate in it, and its target
    skipped: dict[str, str]                   # method -> why it did not run
    assistant: dict                           # how the assisted method's draft was set up
    notes: list[str]


def _assistant_for(draft_name: str, draft_hf: nn.Module, warm_prompt: Prompt) -> tuple[nn.Module, dict, str | None]:
    """A token-level draft as transformers' assistant; for a subset-vocabulary draft the wrapper, with the
    measured one-token forward cost of the draft as is and wrapped."""
    vocab = load_draft_vocab(draft_name)
    config = draft_hf.generation_config
    schedule = {key: getattr(config, key, None) for key in
                ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")}
    schedule_note = "null = transformers' default (20 tokens, constant schedule, confidence threshold 0.4 in 5.x)"
    if vocab is None:
        return draft_hf, {"draft": draft_name, "kind": "the draft as is (full vocabulary)", "generation_config": schedule,
                          "generation_config_note": schedule_note}, None
    wrapped = subset_vocab_assistant(draft_hf, vocab)
    own_ids = vocab.input_map()[torch.tensor(warm_prompt.ids)].tolist()
    own_ms, wrapped_ms = forward_ms(draft_hf, own_ids), forward_ms(wrapped, warm_prompt.ids)
    size, full = len(vocab.draft_to_target), vocab.target_vocab_size
    info = {"draft": draft_name, "kind": "subset-vocabulary wrapper (mapped embedding, head scattered into the full vocabulary)",
            "draft_vocab_size": size, "target_vocab_size": full, "draft_forward_ms": own_ms,
            "wrapped_forward_ms": wrapped_ms, "generation_config": schedule, "generation_config_note": schedule_note}
    note = (f"assisted: the draft predicts {size} of {full} tokens; transformers needs full-vocabulary logits, so "
            f"it runs wrapped (subset head scattered into a {full}-token row, -inf elsewhere): one-token draft "
            f"forward {own_ms:.2f} ms as is, {wrapped_ms:.2f} ms wrapped (warm-up prompt)")
    return wrapped, info, note


class ModelCopies:
    """Each model in each dtype at most once: the model itself in its own dtype, else one converted copy."""

    def __init__(self) -> None:
        self._copies: dict[tuple[int, torch.dtype], nn.Module] = {}

    def get(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:
        key = (id(model), dtype)
        if key not in self._copies:
            self._copies[key] = in_dtype(model, dtype)
        return self._copies[key]


def _prepare_hf_method(name: str, setup: BenchSetup, copies: ModelCopies, pair: ModelPair,
                       assistant: nn.Module | None, sampling: Sampling, warm_prompt: Prompt, *, hf_dtype: str,
                       seed: int, lookup_tokens: int, max_new_tokens: int) -> None:
    """One of transformers' methods in `hf_dtype`, or with "auto" in the faster of float32 and bfloat16 per
    token on the warm-up prompt (both timings kept); generate's runner in each dtype is kept as a reference."""
    candidates = HF_DTYPES if hf_dtype == "auto" else (hf_dtype,)
    built, timings = {}, {}
    for dtype_name in candidates:
        dtype = getattr(torch, dtype_name)
        target = copies.get(pair.target.hf_model, dtype)
        extra: dict[str, object] = {}
        if name == "assisted":
            extra["assistant_model"] = copies.get(assistant, dtype)
        elif name == "prompt_lookup":
            extra["prompt_lookup_num_tokens"] = lookup_tokens
        runner = hf_runner(target, sampling, pair.eos_ids, seed, **extra)
        if name == "generate":
            setup.references[dtype_name] = (runner, target)
        if len(candidates) > 1:
            timings[dtype_name] = time_per_token(runner, warm_prompt, max_new_tokens)
        else:
            warm_up(runner, warm_prompt, max_new_tokens)
        built[dtype_name] = runner
    chosen = min(timings, key=timings.get) if timings else candidates[0]
    setup.runners[name], setup.dtypes[name] = built[chosen], chosen
    setup.hf_dtype_choice[name] = {"chosen": chosen, "seconds_per_token": timings or None}
    measured = ", ".join(f"{d} {1000 * t:.2f} ms/token" for d, t in timings.items())
    setup.notes.append(f"{name} runs in {chosen}" + (f" (warm-up prompt: {measured})" if measured else ""))


def prepare_methods(methods: list[str], pair: ModelPair, growmap: Growmap, sampling: Sampling, verifier: str,
                    warm_prompt: Prompt, *, hf_dtype: str, seed: int, lookup_tokens: int,
                    max_new_tokens: int, sample_children: bool, dynamic: DynamicShape,
                    assistant_draft: tuple[str, nn.Module] | None, suite_lookup: int,
                    suite_lookup_ngram: int) -> BenchSetup:
    """Build a warmed-up runner per method (transformers' methods first, then the suite's), and a
    transformers generate in every dtype a method runs in, for the exactness check.

    assistant_draft: (name, transformers model) of the token-level draft for assisted generation; None = the
    pair's draft (which must then be a token-level draft: transformers cannot run a feature draft).
    suite_lookup: the suite's prompt lookup (tokens grafted onto each static and dynamic tree; 0 = off)."""
    setup = BenchSetup({}, {}, {}, {}, {}, {}, [])
    copies = ModelCopies()
    assistant = None
    if "assisted" in methods:
        name, draft_hf = assistant_draft or (pair.draft_name, plain_copy(pair.draft.hf_model))
        assistant, setup.assistant, note = _assistant_for(name, draft_hf, warm_prompt)
        setup.notes.extend([note] if note else [])
    for name in (m for m in HF_METHODS if m in methods):
        _prepare_hf_method(name, setup, copies, pair, assistant, sampling, warm_prompt, hf_dtype=hf_dtype, seed=seed,
                           lookup_tokens=lookup_tokens, max_new_tokens=max_new_tokens)

    drafters: dict[str, Drafter | None] = {"baseline": None}
    if "static_tree" in methods:
        drafters["static_tree"] = StaticTreeDrafter(pair.draft, growmap, sampling, sample_children)
    if "dynamic_tree" in methods:
        drafters["dynamic_tree"] = DynamicTreeDrafter(pair.draft, sampling, sample_children, budget=dynamic.budget,
                                                      width=dynamic.width, max_depth=dynamic.max_depth,
                                                      score=dynamic.score)
    drafters = {name: with_prompt_lookup(drafter, suite_lookup, suite_lookup_ngram)
                for name, drafter in drafters.items()}
    suite_dtype = str(pair.target.dtype).removeprefix("torch.")
    for name in (m for m in SUITE_METHODS if m in methods and m in drafters):
        runner = suite_runner(pair, drafters[name], sampling, verifier, seed)
        warm_up(runner, warm_prompt, max_new_tokens)
        setup.runners[name], setup.dtypes[name] = runner, suite_dtype
    from utils.bench.llama_cpp import LLAMA_CPP_LABEL, llama_cpp_runners
    from utils.models import gguf_source

    runners, skipped = llama_cpp_runners(methods, gguf_source(pair.target_name), torch.get_num_threads(),
                                         max_new_tokens + 512, pair.eos_ids, lookup_tokens)
    setup.skipped.update(skipped)
    for name, runner in runners.items():
        warm_up(runner, warm_prompt, max_new_tokens)
        setup.runners[name], setup.dtypes[name] = runner, LLAMA_CPP_LABEL
        setup.notes.append(f"{name}: llama.cpp on {gguf_source(pair.target_name).name}, {torch.get_num_threads()} "
                           "threads, greedy (its own numerics: 8-bit activations; outputs compared token by token)")
    for dtype_name in set(setup.dtypes.values()) - set(setup.references) - {LLAMA_CPP_LABEL}:
        target = copies.get(pair.target.hf_model, getattr(torch, dtype_name))
        setup.references[dtype_name] = (hf_runner(target, sampling, pair.eos_ids, seed), target)
    return setup
