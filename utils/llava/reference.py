"""transformers' own decoding of the LLaVA target, timed beside the suite's in `--Mode benchmark`: `generate`
(pixel values in, the model's own image path) and assisted generation with the same draft where transformers
can run it (a LLaVA draft, or a token-level text draft; a feature draft cannot be an assistant, so the
target's token-level draft stands in for it when the suite ships one).

The runner and the subset-vocabulary wrapper are utils/bench's; a subsystem never imports another, so the
script hands them in (`TransformersMethods`).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from engine.decoder import DecodeResult
from engine.sampling import Sampling
from utils.data import Prompt
from utils.experiment import ModelPair, Reference
from utils.llava.models import LlavaModel
from utils.models import default_token_draft_for, load_draft_vocab, load_hf_model


@dataclass(frozen=True)
class TransformersMethods:
    runner: Callable            # (target_hf, sampling, eos_ids, seed, **generate flags) -> (Prompt, int) -> Run
    subset_assistant: Callable  # (draft_hf, DraftVocab) -> a full-vocabulary transformers assistant


def _as_reference(runner) -> Reference:
    def run(prompt: Prompt, max_new_tokens: int) -> DecodeResult:
        result = runner(prompt, max_new_tokens)
        return DecodeResult(result.output_ids, result.target_calls, [], seconds=result.seconds)

    return run


def _assistant(pair: ModelPair, draft: LlavaModel | None, kind: str, args: argparse.Namespace,
               methods: TransformersMethods):
    """(transformers assistant model or None, note)."""
    if kind == "llava":
        return draft.hf_model, "assisted: transformers' assisted generation with the same LLaVA draft"
    name, note = pair.draft_name, "assisted: transformers' assisted generation with the same text-only draft"
    if kind == "feature":
        name = default_token_draft_for(args.target)
        if name is None:
            return None, ("assisted: not run (transformers cannot run a feature draft, and no token-level draft is "
                          "shipped)")
        note = (f"assisted: transformers cannot run a feature draft; its assistant is the token-level draft {name}")
    hf_model = pair.draft.hf_model if kind == "text" else load_hf_model(name, pair.target.dtype, args.device)
    vocab = load_draft_vocab(name)
    if vocab is not None:
        hf_model = methods.subset_assistant(hf_model, vocab)
        note += " (subset vocabulary, wrapped to full-vocabulary logits)"
    return hf_model, note + "; transformers hands a text-only assistant the placeholder tokens as text"


def references_for(args: argparse.Namespace, pair: ModelPair, target: LlavaModel, draft: LlavaModel | None,
                   kind: str, methods: TransformersMethods) -> tuple[dict[str, Reference], list[str]]:
    """transformers' generate and (where it can) assisted generation, as benchmark references, with notes."""
    sampling = Sampling(args.T, args.P)
    run = methods.runner
    references = {"transformers generate": _as_reference(run(target.hf_model, sampling, pair.eos_ids, args.seed))}
    assistant, note = _assistant(pair, draft, kind, args, methods)
    if assistant is not None:
        references["transformers assisted"] = _as_reference(
            run(target.hf_model, sampling, pair.eos_ids, args.seed, assistant_model=assistant))
    return references, [note]
