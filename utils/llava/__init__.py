"""Tree speculative decoding for LLaVA (image + text prompts), used by test_llava.py.

inputs.py     the images and prompts: --image-dir, --dataset rows ({image, prompt} or LLaVA-Instruct), generated
              images for the offline run; each prompt tokenized by the processor (placeholder expanded)
models.py     the LLaVA target and its processor, the three draft kinds, and the offline default target
prefill.py    transformers' image path (vision tower, projector, merge at the image tokens) -> the engine's
              `inputs_embeds` prefill, and each draft's own prefix
reference.py  transformers' generate (and assisted generation) on the LLaVA target, timed in benchmark mode
"""
