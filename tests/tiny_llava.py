"""Tiny randomly initialised LLaVA models, processor and images for the LLaVA tests (float32, CPU, no download):
a CLIP vision tower (8x8 images, patch 2, hidden 32, 2 layers: 16 image tokens) and a tiny Llama text model."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

IMAGE_SIZE, PATCH = 8, 2
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


def tiny_llava(seed: int, vocab: int, image_token_id: int, hidden: int = 64, layers: int = 2,
               vision_hidden: int = 32, logit_scale: float = 1.0, eos_token_id: int | None = None
               ) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=vision_hidden,
                              intermediate_size=2 * vision_hidden, num_hidden_layers=2, num_attention_heads=2)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=IMAGE_TOKENS)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        # random vision features are tiny at the default init; scaled up, the image visibly changes the output
        model.model.multi_modal_projector.linear_2.weight.mul_(30.0)
        model.lm_head.weight.mul_(logit_scale)
    model.generation_config.eos_token_id = eos_token_id
    return model


def tiny_processor(tokenizer) -> LlavaProcessor:
    """The tiny tokenizer with an `<image>` token added, and an 8x8 CLIP image processor."""
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def write_images(folder: Path, count: int) -> list[Path]:
    """`count` different small RGB images (varying size, so the processor resizes and crops)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    generator = torch.Generator().manual_seed(count)
    for index in range(count):
        pixels = torch.randint(0, 256, (10 + 3 * index, 12, 3), generator=generator, dtype=torch.uint8)
        path = folder / f"img{index}.png"
        Image.fromarray(pixels.numpy()).save(path)
        paths.append(path)
    return paths
