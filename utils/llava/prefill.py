"""From images and prompts to the engine: tokenized prompts, the target's `inputs_embeds` prefill and each
draft's own prefix, and the workload test_llava.py hands to utils.experiment.execute.

The image path is transformers' own, as LlavaModel.forward runs it: the token embeddings of the processor's
ids, `get_image_features` (vision tower, feature layer and selection, projector) and `get_placeholder_mask`
+ `masked_scatter` at the image-token positions. The language model then runs on the engine (static KV
cache, tree mask), exactly as for text.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from engine.drafters import DraftPrefix
from engine.model import TreeModel
from utils.data import Prompt
from utils.errors import UserError
from utils.experiment import ModelPair, PromptInputs, Workload, check_kv_slots, eos_ids_of, load_draft
from utils.llava.inputs import ImagePrompt, image_prompts, readable
from utils.llava.models import UNTRAINED_NOTE, LlavaModel, draft_kind, load_llava
from utils.llava.reference import TransformersMethods, references_for
from utils.models import check_vocab_match

IMAGE_KIND = "image"


@torch.inference_mode()
def merged_embeds(hf_llava, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """input_ids: [L] long with the placeholder expanded; pixel_values: [1, 3, H, W] -> [L, d] first-layer
    inputs of the language model, the image features at the image-token positions."""
    device = hf_llava.lm_head.weight.device
    ids = input_ids[None].to(device)
    embeds = hf_llava.get_input_embeddings()(ids)
    pixels = pixel_values.to(device, hf_llava.dtype)
    features = hf_llava.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    features = torch.cat(list(features), dim=0).to(embeds.dtype)
    mask = hf_llava.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
    return embeds.masked_scatter(mask, features)[0]


def tokenize(processor, row: ImagePrompt, image) -> tuple[list[int], torch.Tensor]:
    """(ids with the placeholder expanded, pixel values [1, 3, H, W]) of one prompt; refuses a prompt
    without the placeholder or one that ends in it (the last prompt token is the first step's root, which
    the engine embeds as text)."""
    if processor.image_token not in row.text:
        raise UserError(f"prompt of {row.image.name} has no image placeholder {processor.image_token!r}: "
                        f"{row.text[:60]!r}")
    encoded = processor(images=image, text=row.text, return_tensors="pt")
    ids = encoded["input_ids"][0].tolist()
    if ids[-1] == processor.image_token_id:
        raise UserError(f"prompt of {row.image.name} ends with the image placeholder: text must follow it "
                        f"(e.g. ' ASSISTANT:')")
    return ids, encoded["pixel_values"]


@dataclass
class DraftSide:
    """How the draft sees each prompt."""

    kind: str                                      # llava | text | feature | none
    hf_model: object = None
    # a LLaVA draft with its own processor: its (ids, pixels) per prompt index
    own_inputs: dict[int, tuple[list[int], torch.Tensor]] = field(default_factory=dict)
    image_token_id: int | None = None

    def prefix(self, prompt: Prompt) -> DraftPrefix | None:
        if self.kind == "text":
            ids = torch.tensor([t for t in prompt.ids if t != self.image_token_id])
            return DraftPrefix(len(prompt.ids), ids)
        if self.kind == "llava":
            ids, pixels = self.own_inputs.get(prompt.index, (prompt.ids, prompt.pixel_values))
            ids = torch.tensor(ids)
            return DraftPrefix(len(prompt.ids), ids, merged_embeds(self.hf_model, ids, pixels))
        return None


def build_prompts(rows: list[tuple[ImagePrompt, object]], target: LlavaModel,
                  draft: LlavaModel | None) -> tuple[list[Prompt], dict[int, tuple[list[int], torch.Tensor]]]:
    """Prompts for the target, and the LLaVA draft's own (ids, pixels) per prompt index where its processor
    is not the target's."""
    prompts, own = [], {}
    for row, image in rows:
        ids, pixels = tokenize(target.processor, row, image)
        prompts.append(Prompt(index=row.index, kind=IMAGE_KIND, text=row.text, ids=ids, image=str(row.image),
                              pixel_values=pixels))
        if draft is not None and draft.processor is not target.processor:
            own[row.index] = tokenize(draft.processor, row, image)
    return prompts, own


def load_llava_workload(args: argparse.Namespace, dtype: torch.dtype, tree_size: int,
                        methods: TransformersMethods | None = None) -> Workload:
    """The LLaVA target and draft, the image prompts, and in benchmark mode transformers' methods (`methods`:
    utils/bench's runner and assistant wrapper, handed in by the script; None = none timed)."""
    from utils.report import emit

    rows = image_prompts(args.dataset, args.image_dir, args.prompt, args.start, args.end)  # fail fast on bad data
    rows, skipped = readable(rows, args.skip_bad_images)
    target = load_llava(args.target, dtype, args.device)
    target_tree = TreeModel(target.hf_model, args.M)
    kind, draft, draft_tree, draft_name = "none", None, None, None
    if args.Mode != "baseline" and args.model is not None and draft_kind(args.model) == "llava":
        kind = "llava"
        draft = load_llava(args.model, dtype, args.device, role="draft", processor_fallback=target.processor)
        draft_tree, draft_name = TreeModel(draft.hf_model, args.M), args.model
        check_vocab_match(draft_tree.vocab_size, target_tree.vocab_size, args.model, target.name)
    elif args.Mode != "baseline":  # a text or feature draft; with no --model, the default target's (SmolLM2's)
        draft_name, draft_tree = load_draft(args.model, args.target, target_tree, dtype, args.device, args.M)
        kind = "feature" if draft_tree.uses_target_features else "text"
    prompts, own = build_prompts(rows, target, draft)
    longest = max(max(len(p.ids) for p in prompts), max((len(ids) for ids, _ in own.values()), default=0))
    check_kv_slots(args, longest, tree_size)
    side = DraftSide(kind, draft.hf_model if draft else None, own, target.hf_model.config.image_token_id)
    tokenizer = target.processor.tokenizer
    pair = ModelPair(target_tree, draft_tree, tokenizer, target.name, draft_name,
                     eos_ids_of(tokenizer, target.hf_model))

    def prepare(prompt: Prompt, with_draft: bool) -> PromptInputs:
        embeds = merged_embeds(target.hf_model, torch.tensor(prompt.ids), prompt.pixel_values)
        return PromptInputs(embeds, side.prefix(prompt) if with_draft else None)

    notes = [UNTRAINED_NOTE] if args.target is None else []
    for note in notes + [f"skipped: {reason}" for reason in skipped]:
        emit(note)
    references, reference_notes = {}, []
    if args.Mode == "benchmark" and methods is not None:
        references, reference_notes = references_for(args, pair, target, draft, kind, methods)
    for note in reference_notes:
        emit(note)
    meta = {"llava": {"draft_kind": kind, "image_dir": args.image_dir, "prompt": args.prompt,
                      "image_tokens": prompts[0].ids.count(side.image_token_id), "skipped_images": skipped,
                      "notes": notes + reference_notes}}
    return Workload(pair, prompts, prepare, references, meta)
