"""CUDA graphs (engine/cuda_graphs.py). On a CPU the graph is replaced through the capture seam by stand-ins
that behave like one where it matters: replays write into the outputs of the captured run, and the traced one
records the operations once (shapes and Python branches fixed) and replays them over the static buffers. So
the keying, the buffers, the fallbacks and equality with the eager forward are tested without a GPU; the tests
marked `cuda` capture real graphs and compare them with eager decoding in float32, float16 and bfloat16."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from engine import growmap as G
from engine.cuda_graphs import GraphedModel, GraphSettings, graph_counts, with_cuda_graphs
from engine.decoder import autoregressive_generate, speculative_generate
from engine.drafters import StaticTreeDrafter
from engine.dynamic_drafter import DynamicTreeDrafter
from engine.feature_draft import FeatureDraftModel
from engine.kv_cache import KVCache
from engine.model import TreeModel
from engine.prompt_lookup import PromptLookupDrafter
from engine.sampling import Sampling
from engine.tree_mask import causal_mask
from tests.conftest import REPO_ROOT
from tests.test_feature_draft import FUSED, feature_pair
from tests.tiny_models import random_prompt, tiny_llama

VOCAB = 96
GREEDY = Sampling(0.0, 1.0)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _as_tuple(outputs):
    return outputs if isinstance(outputs, tuple) else (outputs,)


def static_outputs(record):
    """A capture whose replays write into the tensors the captured run returned, as a CUDA graph's do;
    record(fn) -> a function running the forward again."""
    def capture(fn):
        run = record(fn)
        outputs = run()

        def replay():
            for kept, fresh in zip(_as_tuple(outputs), _as_tuple(run())):
                kept.copy_(fresh)
            return outputs
        return replay
    return capture


rerun_capture = static_outputs(lambda fn: fn)
traced_capture = static_outputs(lambda fn: make_fx(fn)())  # operations recorded once, replayed


def tree_call(length: int, rows: int, seed: int):
    """Inputs of a causal chunk of `rows` tokens after `length` cached ones."""
    ids = torch.tensor(random_prompt(rows, VOCAB, seed))
    slots = torch.arange(length, length + rows)
    return ids, slots, slots, causal_mask(rows, length, "cpu")


def test_never_used_on_cpu():
    model = TreeModel(tiny_llama(0, vocab=VOCAB), 64)
    assert with_cuda_graphs(model, True) is model
    assert with_cuda_graphs(model, False) is model
    assert graph_counts(model) is None


def test_keys_bucket_the_attention_width_and_capture_on_the_second_call():
    model = TreeModel(tiny_llama(0, vocab=VOCAB), 64)
    graphed = GraphedModel(model, rerun_capture, GraphSettings(kv_block=16, capture_after=2))
    model.forward(*tree_call(0, 12, 1))                      # a prefix in the cache, eagerly
    for length in (12, 13, 15):                              # 4 rows, widths 12, 13, 15: one bucket of 16
        graphed.forward(*tree_call(length - 4, 4, length))
    assert graphed.counts == {"captured": 1, "replayed": 2, "eager": 1}
    graphed.forward(*tree_call(14, 4, 2))                    # width 18 -> bucket 32: a new key, seen once
    assert graphed.counts["eager"] == 2
    graphed.forward(*tree_call(14, 3, 2))                    # other row count: another key
    assert graphed.counts == {"captured": 1, "replayed": 2, "eager": 3}
    assert len({graphed.key(call[3], None, False, None) for call in
                (tree_call(8, 4, 0), tree_call(11, 4, 0), tree_call(13, 4, 0))}) == 2


def test_eager_fallbacks():
    model = TreeModel(tiny_llama(0, vocab=VOCAB), 64)
    graphed = GraphedModel(model, rerun_capture, GraphSettings(capture_after=1, max_rows=8, max_graphs=1))
    ids, positions, slots, mask = tree_call(0, 9, 1)
    graphed.forward(ids, positions, slots, mask)                          # over max_rows
    graphed.forward(ids[:4], positions[:4], slots[:4], mask[:4, :4].float())  # not a boolean mask
    assert graphed.counts == {"captured": 0, "replayed": 0, "eager": 2}
    graphed.forward(ids[:4], positions[:4], slots[:4], mask[:4, :4])
    graphed.forward(ids[:3], positions[:3], slots[:3], mask[:3, :3])      # past max_graphs
    assert graphed.counts == {"captured": 1, "replayed": 1, "eager": 3}


@pytest.mark.parametrize("capture", [rerun_capture, traced_capture], ids=["rerun", "traced"])
def test_replay_equals_eager_and_keeps_returned_outputs(capture):
    eager = TreeModel(tiny_llama(0, vocab=VOCAB), 64)
    graphed = GraphedModel(TreeModel(tiny_llama(0, vocab=VOCAB), 64), capture,
                           GraphSettings(kv_block=32, capture_after=1))
    prefix = tree_call(0, 10, 3)
    eager.forward(*prefix)
    graphed.model.forward(*prefix)
    first = graphed.forward(*tree_call(10, 5, 4), return_hidden=True)
    second = graphed.forward(*tree_call(10, 5, 5), return_hidden=True)   # replays into the same graph
    assert graphed.counts["captured"] == 1 and graphed.counts["replayed"] == 2
    for got, call in ((first, tree_call(10, 5, 4)), (second, tree_call(10, 5, 5))):
        expected = eager.forward(*call, return_hidden=True)             # unpadded width 15 vs the bucket's 32
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graphed.model.cache.keys[:, :, :15], eager.cache.keys[:, :, :15])
    # bit for bit against the eager forward over the same padded inputs
    ids, positions, slots, mask = tree_call(10, 5, 5)
    padded = torch.zeros(5, 32, dtype=torch.bool)
    padded[:, :15] = mask
    assert torch.equal(graphed.model.forward(ids, positions, slots, padded), second[0])


def test_a_new_cache_tensor_drops_the_graphs():
    model = TreeModel(tiny_llama(0, vocab=VOCAB), 64)
    graphed = GraphedModel(model, rerun_capture, GraphSettings(capture_after=1))
    graphed.forward(*tree_call(0, 4, 1))
    model.cache = KVCache(len(model.layers), model.kv_heads, 64, model.head_dim, model.dtype, "cpu")
    graphed.forward(*tree_call(0, 4, 1))
    assert graphed.counts["captured"] == 2


def make_drafter(draft, method: str):
    if method == "autoregressive":
        return None
    if method == "dynamic":
        return DynamicTreeDrafter(draft, GREEDY, False, budget=10, width=3, max_depth=4)
    drafter = StaticTreeDrafter(draft, G.kary_tree(2, 3), GREEDY, False)
    return PromptLookupDrafter(drafter, 6) if method == "static+lookup" else drafter


def decode(target, draft, method: str, prompt: list[int], new_tokens: int):
    drafter = make_drafter(draft, method)
    if drafter is None:
        return autoregressive_generate(target, prompt, new_tokens, set(), GREEDY, torch.Generator(target.device))
    return speculative_generate(target, drafter, prompt, new_tokens, set(), GREEDY, "greedy",
                                torch.Generator(target.device))


def graphed_pair(target, draft, capture, settings):
    return GraphedModel(target, capture, settings), GraphedModel(draft, capture, settings)


@pytest.mark.parametrize("method", ["autoregressive", "static", "static+lookup", "dynamic", "feature", "fused"])
def test_graphed_decoding_equals_eager_float32(method):
    """Greedy output and steps identical with and without graphs; every graph kind gets replayed (the
    narrow buckets make decoding cross several). `fused`: a feature draft on several target layers."""
    if method in ("feature", "fused"):
        target, draft = feature_pair(head_subset=True, target_layers=FUSED if method == "fused" else None)
        method = "static+lookup"
    else:
        target = TreeModel(tiny_llama(0, vocab=VOCAB), 256)
        draft = TreeModel(tiny_llama(1, vocab=VOCAB, hidden=32, layers=1, heads=2, kv_heads=1), 256)
    gtarget, gdraft = graphed_pair(target, draft, rerun_capture, GraphSettings(kv_block=16, capture_after=1))
    for seed in range(2):
        prompt = random_prompt(9 + 5 * seed, VOCAB, seed) * 2  # a repeat, so prompt lookup finds copies
        eager = decode(target, draft, method, prompt, 40)
        graphed = decode(gtarget, gdraft, method, prompt, 40)
        assert graphed.output_ids == eager.output_ids
        assert graphed.accepted_per_step == eager.accepted_per_step
    assert gtarget.counts["replayed"] > 0 and (method == "autoregressive" or gdraft.counts["replayed"] > 0)


def test_traced_graphs_decode_like_eager():
    """The same with operations recorded once: nothing in the forward depends on values a graph would freeze."""
    target = TreeModel(tiny_llama(0, vocab=VOCAB, layers=1), 128)
    draft = TreeModel(tiny_llama(1, vocab=VOCAB, hidden=32, layers=1, heads=2, kv_heads=1), 128)
    prompt = random_prompt(12, VOCAB, 7)
    eager = decode(target, draft, "static", prompt, 16)
    gtarget, gdraft = graphed_pair(target, draft, traced_capture, GraphSettings(kv_block=64, capture_after=2))
    graphed = decode(gtarget, gdraft, "static", prompt, 16)
    assert graphed.output_ids == eager.output_ids
    assert gtarget.counts["replayed"] > 0 and gdraft.counts["replayed"] > 0


# ---------------------------------------------------------------- real CUDA graphs

def cuda_pair(method: str, dtype: torch.dtype) -> tuple[TreeModel, TreeModel, int]:
    """(target, draft, vocabulary) on the GPU: SmolLM2-135M-shaped random models, or the feature pair."""
    from tests.test_cuda import smollm2_shaped

    if method == "feature":
        target, draft = feature_pair(head_subset=True)
        return (TreeModel(target.hf_model.to("cuda", dtype), 512),
                FeatureDraftModel(draft.net.to("cuda", dtype), 512, draft.output_ids), VOCAB)
    return (TreeModel(smollm2_shaped(0, 6).to("cuda", dtype), 512),
            TreeModel(smollm2_shaped(1, 2).to("cuda", dtype), 512), 49152)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_replay_is_bitwise_the_eager_forward_of_the_same_shapes(dtype):
    model = cuda_pair("static", dtype)[0]
    graphed = with_cuda_graphs(model, True, GraphSettings(capture_after=1))
    model.forward(*(t.cuda() for t in tree_call(0, 100, 1)))
    ids, positions, slots, mask = (t.cuda() for t in tree_call(100, 16, 2))
    graphed.forward(ids, positions, slots, mask)
    got = graphed.forward(ids, positions, slots, mask)  # a replay, not the capture's own run
    padded = torch.zeros(16, 256, dtype=torch.bool, device="cuda")
    padded[:, :116] = mask
    assert graphed.counts == {"captured": 1, "replayed": 2, "eager": 0}
    assert torch.equal(got, model.forward(ids, positions, slots, padded))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", ["autoregressive", "static+lookup", "dynamic", "feature"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_graphed_decoding_equals_eager(method, dtype):
    """float32: identical. float16/bfloat16: identical, or the first difference is a near-tie of the target
    (reported as a warning): the graphs attend over a padded width, which may round differently."""
    from tests.test_cuda import first_divergence_is_tie

    target, draft, vocab = cuda_pair(method, dtype)
    method = "static+lookup" if method == "feature" else method
    gtarget, gdraft = with_cuda_graphs(target, True), with_cuda_graphs(draft, True)
    for seed in range(3):
        prompt = random_prompt(40, vocab, seed) * 2
        eager = decode(target, draft, method, prompt, 48)
        graphed = decode(gtarget, gdraft, method, prompt, 48)
        if dtype == torch.float32:
            assert graphed.output_ids == eager.output_ids
        elif graphed.output_ids != eager.output_ids:
            assert first_divergence_is_tie(target, prompt, graphed.output_ids, eager.output_ids)
    assert gtarget.counts["replayed"] > 0
    if method != "autoregressive":
        assert gdraft.counts["replayed"] > 0
    warnings.warn(f"{method} {dtype}: graph counts target {gtarget.counts}, draft {gdraft.counts}")


def test_flag_turns_graphs_off_and_defaults_on():
    from utils.bench.compare import parse_args
    from utils.cli import decoding_parser
    from utils.config import DEFAULTS

    parser = decoding_parser("doc", "script")
    assert DEFAULTS.cuda_graphs and parser.parse_args([]).cuda_graphs
    assert not parser.parse_args(["--no-cuda-graphs"]).cuda_graphs
    assert not parse_args(["--no-cuda-graphs"]).cuda_graphs


def test_bench_floor_dry_run(tmp_path, capsys):
    """The GPU timing tool end to end on a CPU: tiny shapes, the graph bookkeeping with eager forwards."""
    import json

    from utils.bench.floor import main

    out = tmp_path / "floor.json"
    main(["--device", "cpu", "--shapes", "tiny", "--repeats", "1", "--copy-mb", "1", "--prompts", "1",
          "--prompt-len", "16", "--max-new-tokens", "6", "--prefix", "8",
          "--growmap", str(REPO_ROOT / "growmaps" / "4x8-tree.pt"), "-o", str(out)])
    figures = json.loads(out.read_text())
    assert {"target:64:eager", "target:64:graphs", "draft:1:graphs"} <= set(figures["step_ms"])
    assert all(row["equal_outputs"] == "1/1" for row in figures["decode"].values())
    assert figures["graph_calls"]["target"]["replayed"] > 0
    assert "targets (stand-in)" in capsys.readouterr().out
