"""The LLaVA target, its processor and drafts; the offline default target.

Draft kinds (`draft_kind`):
  llava    a LlavaForConditionalGeneration with its own vision tower and projector: its prefix is its own
           processor's ids with its own image features merged in (anthonycmu/llava-1.5-160m for llava-1.5-7b);
  text     any Llama-family causal LM with the target's tokenizer: its prefix is the prompt with the image
           placeholder tokens removed (Gagrani et al. 2024, arXiv 2404.08856);
  feature  the suite's feature draft (EAGLE) of the target's language model: it reads the target's hidden
           states, which carry the image, and the target's own prompt.

The offline default target (`default_llava_dir`) is a LLaVA whose language model is the embedded
SmolLM2-135M-Instruct, unchanged, and whose CLIP vision tower and projector are small and random: it exercises
the whole image path and decodes at SmolLM2's speed, but it cannot see. Its image placeholder is SmolLM2's
unused special token 16 (`<empty_output>`, renamed `<image>`), so the vocabulary stays SmolLM2's 49,152 tokens
and the suite's SmolLM2 drafts fit it unchanged.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.errors import UserError
from utils.models import (_from_hub_or_folder, cache_dir, folder_written_whole, is_feature_draft,
                          resolve_model_path)

LLAVA_TYPE = "llava"
UNTRAINED_NOTE = "untrained vision tower: the image content is ignored"
DEFAULT_LLAVA_NAME = "smollm2-135m-llava-random-vision"
DEFAULT_IMAGE_TOKEN_ID = 16          # SmolLM2's "<empty_output>", unused by its chat format
DEFAULT_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 2, "num_attention_heads": 4}  # 16 image tokens per image
DEFAULT_VISION_SEED = 0


def model_type(spec: str) -> str:
    """config.json's model_type of a resolved model path or hub id."""
    from transformers import AutoConfig

    return _from_hub_or_folder(AutoConfig.from_pretrained, spec).model_type


def _rename_token(tokenizer, token_id: int, new: str, folder: Path):
    """`tokenizer` with the added token `token_id` renamed to `new` (same id, same vocabulary size)."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    old = next(t["content"] for t in data["added_tokens"] if t["id"] == token_id)
    for token in data["added_tokens"]:
        if token["id"] == token_id:
            token["content"] = new
    vocab = data["model"]["vocab"]
    vocab[new] = vocab.pop(old)
    path.write_text(json.dumps(data))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if str(token_id) in config.get("added_tokens_decoder", {}):
        config["added_tokens_decoder"][str(token_id)]["content"] = new
    config_path.write_text(json.dumps(config))
    renamed = AutoTokenizer.from_pretrained(folder)
    if renamed.convert_tokens_to_ids(new) != token_id or len(renamed) != len(tokenizer):
        raise RuntimeError(f"renaming token {token_id} to {new} failed")
    return renamed


def build_default_llava(out_dir: Path) -> None:
    """Save the offline default target (module docstring) to `out_dir`, atomically."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    source = resolve_model_path(None)
    text_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with folder_written_whole(out_dir) as tmp:
        tokenizer = _rename_token(AutoTokenizer.from_pretrained(source), DEFAULT_IMAGE_TOKEN_ID, "<image>",
                                  tmp / "tokenizer")
        side = DEFAULT_VISION["image_size"]
        config = LlavaConfig(vision_config=CLIPVisionConfig(**DEFAULT_VISION), text_config=text_model.config,
                             image_token_index=DEFAULT_IMAGE_TOKEN_ID,
                             image_seq_length=(side // DEFAULT_VISION["patch_size"]) ** 2,
                             tie_word_embeddings=text_model.config.tie_word_embeddings)
        torch.manual_seed(DEFAULT_VISION_SEED)
        model = LlavaForConditionalGeneration(config).eval()
        model.model.language_model.load_state_dict(text_model.model.state_dict())
        model.lm_head.load_state_dict(text_model.lm_head.state_dict())
        model.generation_config.eos_token_id = text_model.generation_config.eos_token_id
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   patch_size=DEFAULT_VISION["patch_size"], vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
        shutil.rmtree(tmp / "tokenizer")
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(f"{UNTRAINED_NOTE}: SmolLM2-135M-Instruct with a random CLIP vision tower "
                                       "and projector, built by utils/llava/models.py for offline runs.\n")


def default_llava_dir() -> Path:
    """The offline default target, built on first use and cached under $TREESPEC_CACHE/llava."""
    out_dir = cache_dir() / "llava" / DEFAULT_LLAVA_NAME
    if not (out_dir / "config.json").is_file():
        build_default_llava(out_dir)
    return out_dir


@dataclass
class LlavaModel:
    name: str           # what the user passed (or the default's name)
    path: str           # what from_pretrained loaded
    hf_model: object    # LlavaForConditionalGeneration, eval, on the device
    processor: object   # its AutoProcessor (the target's, for a draft that ships none)


def load_processor(path: str, fallback=None):
    """The folder's (or hub id's) AutoProcessor; `fallback` when it ships none."""
    from transformers import AutoProcessor

    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in
                                       ("processor_config.json", "preprocessor_config.json")):
        if fallback is None:
            raise UserError(f"{path} has no image processor (preprocessor_config.json): not a LLaVA checkpoint")
        return fallback
    return _from_hub_or_folder(AutoProcessor.from_pretrained, path)


def load_llava(spec: str | None, dtype: torch.dtype, device: str, role: str = "target",
               processor_fallback=None) -> LlavaModel:
    """A LLaVA model and processor (spec None: the offline default); anything else is refused in one line."""
    from transformers import LlavaForConditionalGeneration

    path = str(default_llava_dir()) if spec is None else resolve_model_path(spec)
    kind = model_type(path)
    if kind != LLAVA_TYPE:
        raise UserError(f"{role} {spec} is not a LLaVA model (model_type '{kind}'): test_llava.py needs a "
                        "LlavaForConditionalGeneration checkpoint such as llava-hf/llava-1.5-7b-hf")
    model = _from_hub_or_folder(LlavaForConditionalGeneration.from_pretrained, path, dtype=dtype).to(device).eval()
    processor = load_processor(path, processor_fallback)
    image_token = getattr(processor, "image_token_id", None)
    if image_token != model.config.image_token_id:
        raise UserError(f"{role} {spec}: the processor's image token id ({image_token}) is not the model's "
                        f"({model.config.image_token_id})")
    return LlavaModel(spec or DEFAULT_LLAVA_NAME, path, model, processor)


def draft_kind(spec: str) -> str:
    """feature, llava or text (module docstring)."""
    if is_feature_draft(spec):
        return "feature"
    return "llava" if model_type(resolve_model_path(spec)) == LLAVA_TYPE else "text"
