"""The decode loop (draft -> verify -> accept -> commit) and the plain autoregressive baseline, both on the
same TreeModel engine. Nothing here knows about tokenizers: prompts and outputs are token ids."""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.drafters import DraftPrefix, append_tokens
from engine.model import TreeModel
from engine.sampling import Sampling, probs_from_logits, sample
from engine.tree import CandidateTree
from engine.tree_mask import tree_attention_mask
from engine.verifiers import Verdict, verify

# a verifier given as a function instead of a name: (tree, target logits [n, V], sampling, generator) -> Verdict
VerifierFn = Callable[[CandidateTree, torch.Tensor, Sampling, torch.Generator], Verdict]


class Drafter(Protocol):
    uses_target_features: bool  # wants the target's hidden states of committed slots (feature drafts)
    target_layers: tuple[int, ...] | None  # which of them (TreeModel.forward's hidden_layers; None = the final)

    def record_target_features(self, start_slot: int, features: torch.Tensor) -> None: ...
    def reset(self, prefix: DraftPrefix | None = None) -> None: ...
    def propose(self, committed: torch.Tensor, generator: torch.Generator) -> CandidateTree: ...
    def accept(self, path: list[int]) -> None: ...


class StepTimer:
    """Wall time per phase; synchronises CUDA at each boundary so the split is honest (benchmark mode)."""

    def __init__(self, device: torch.device | str, enabled: bool) -> None:
        self.enabled = enabled and torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {"drafting": 0.0, "verification": 0.0, "bookkeeping": 0.0}
        self._last = time.perf_counter()

    def start(self) -> None:
        self._sync()
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self._last = now

    def _sync(self) -> None:
        if self.enabled:
            torch.cuda.synchronize()


@dataclass
class DecodeResult:
    output_ids: list[int]                                       # new tokens only, EOS included if emitted
    target_steps: int
    accepted_per_step: list[int] = field(default_factory=list)  # tokens emitted per target step, bonus included
    tree_shapes: list[list[int]] = field(default_factory=list)  # nodes per depth of each step's tree
    seconds: float = 0.0
    time_split: dict[str, float] = field(default_factory=dict)
    substitutions: int = 0          # lossy verifiers: draft tokens overwritten by the target's on accepted paths
    after_substitution: int = 0     # tokens emitted at or after a step's first substitution (its context drifted)


def _finish(new_tokens: list[int], budget: int, eos_ids: set[int]) -> tuple[list[int], bool]:
    """Cut a step's tokens at the budget and just after the first EOS; say whether decoding is done."""
    kept = new_tokens[:budget]
    for index, token in enumerate(kept):
        if token in eos_ids:
            return kept[:index + 1], True
    return kept, len(kept) == budget


def check_capacity(model: TreeModel, prompt_len: int, max_new_tokens: int, tree_size: int) -> None:
    """A step writes up to tree_size slots past the committed prefix (which grows to prompt + new tokens)."""
    needed = prompt_len + max_new_tokens + tree_size
    if needed > model.max_len:
        raise ValueError(f"the KV cache holds {model.max_len} tokens but prompt ({prompt_len}) + new tokens "
                         f"({max_new_tokens}) + tree ({tree_size}) need {needed}")


def speculative_generate(target: TreeModel, drafter: Drafter, prompt_ids: list[int], max_new_tokens: int,
                         eos_ids: set[int], sampling: Sampling, verifier: str | VerifierFn, generator: torch.Generator,
                         timer: StepTimer | None = None, record_shapes: bool = False,
                         prompt_embeds: torch.Tensor | None = None,
                         draft_prefix: DraftPrefix | None = None) -> DecodeResult:
    """Speculative decoding of one prompt: each target forward verifies a whole candidate tree.

    `verifier` is a name from engine.verifiers or a function; a function may overwrite accepted nodes' tokens
    (`Verdict.substitutions`, lossy): the emitted tokens follow it, the KV caches keep what the tree ran.
    prompt_embeds: [L, d] the target's first-layer inputs for the prompt, when they are not its token
    embeddings (image features merged in, utils/llava/); the prompt's last token must be a text token, since
    it is the first step's root. draft_prefix: the draft's own version of the prompt (engine/drafters.py).
    """
    device = target.device
    timer = timer or StepTimer(device, enabled=False)
    started = time.perf_counter()
    committed = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    drafter.reset(draft_prefix)
    verify_step = verifier if callable(verifier) else functools.partial(verify, verifier)
    features = drafter.uses_target_features
    if len(prompt_ids) > 1:
        prefill = append_tokens(target, committed[:-1], 0, last_logits=False, return_hidden=features,
                                hidden_layers=drafter.target_layers,
                                inputs_embeds=None if prompt_embeds is None else prompt_embeds[:-1])
        if features:
            drafter.record_target_features(0, prefill[1])
    result = DecodeResult(output_ids=[], target_steps=0)
    timer.start()
    done = max_new_tokens <= 0
    while not done:
        tree = drafter.propose(committed, generator)
        timer.lap("drafting")
        root_slot = committed.shape[0] - 1
        nodes = torch.arange(tree.size, device=device)
        mask = tree_attention_mask(tree.ancestors, nodes, root_slot)
        logits = target.forward(tree.tokens, root_slot + tree.depth, root_slot + nodes, mask, return_hidden=features,
                                hidden_layers=drafter.target_layers)
        if features:
            logits, hidden = logits
        verdict = verify_step(tree, logits, sampling, generator)
        timer.lap("verification")
        kept = torch.tensor([0] + verdict.path, device=device)
        target.cache.keep(root_slot + kept, root_slot)
        if features:
            drafter.record_target_features(root_slot, hidden[kept])
        drafter.accept(verdict.path)
        step_tokens = tree.tokens[verdict.path].tolist() + [verdict.bonus]
        substituted = [i for i, node in enumerate(verdict.path) if node in verdict.substitutions]
        for i in substituted:
            step_tokens[i] = verdict.substitutions[verdict.path[i]]
        step_tokens, done = _finish(step_tokens, max_new_tokens - len(result.output_ids), eos_ids)
        if substituted:
            result.substitutions += sum(i < len(step_tokens) for i in substituted)
            result.after_substitution += max(0, len(step_tokens) - substituted[0])
        result.output_ids.extend(step_tokens)
        result.accepted_per_step.append(len(step_tokens))
        result.target_steps += 1
        if record_shapes:
            result.tree_shapes.append(tree.nodes_per_depth())
        committed = torch.cat([committed, torch.tensor(step_tokens, dtype=torch.long, device=device)])
        timer.lap("bookkeeping")
    result.seconds = time.perf_counter() - started
    result.time_split = dict(timer.totals)
    return result


def autoregressive_generate(target: TreeModel, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int],
                            sampling: Sampling, generator: torch.Generator,
                            prompt_embeds: torch.Tensor | None = None) -> DecodeResult:
    """The plain reference: one target forward per token on the same engine (kept for exactness tests).
    prompt_embeds: [L, d] the prompt's first-layer inputs, as in `speculative_generate`."""
    device = target.device
    started = time.perf_counter()
    committed = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    logits = append_tokens(target, committed, 0, inputs_embeds=prompt_embeds)
    result = DecodeResult(output_ids=[], target_steps=0)
    length = committed.shape[0]
    while len(result.output_ids) < max_new_tokens:
        if sampling.greedy:
            token = int(logits.argmax())
        else:
            token = int(sample(probs_from_logits(logits, sampling), generator))
        result.output_ids.append(token)
        result.accepted_per_step.append(1)
        result.target_steps += 1
        if token in eos_ids or len(result.output_ids) == max_new_tokens:
            break
        logits = append_tokens(target, torch.tensor([token], device=device), length)
        length += 1
    result.seconds = time.perf_counter() - started
    return result
