"""Feature drafts (engine/feature_draft.py): exact output, the right target features in the right slots,
training through pretrain_draft_model.py --arch feature, and loading through --model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine.decoder import autoregressive_generate, speculative_generate
from engine.drafters import DraftCache, StaticTreeDrafter
from engine.dynamic_drafter import DynamicTreeDrafter
from engine.feature_draft import FeatureDraftModel, FeatureDraftNet
from engine.growmap import chain, kary_tree, wxd_tree
from engine.model import TreeModel
from engine.sampling import Sampling
from tests.conftest import REPO_ROOT
from tests.test_pretrain import read_log, tiny_settings
from tests.tiny_models import random_prompt, tiny_llama
from utils.training import train
from utils.training.settings import TrainSettings
from utils.training.common import checkpoints
from utils.errors import UserError
from utils.models import load_feature_net
from utils.training.feature_loop import feature_config

GREEDY = Sampling(0.0, 1.0)


def feature_settings(out, target, data, **overrides) -> TrainSettings:
    """test_pretrain's tiny run settings for --arch feature (whose shape is the target's: no preset)."""
    return tiny_settings(out, target, data, arch="feature", preset=TrainSettings.preset, **overrides)
VOCAB = 96




FUSED = (0, 1, 2)  # every layer of the 2-layer tiny target: embedding, layer 1, final normed state


def feature_pair(head_subset: bool, seed: int = 3,
                 target_layers: tuple[int, ...] | None = None) -> tuple[TreeModel, FeatureDraftModel]:
    hf = tiny_llama(0, vocab=VOCAB)
    torch.manual_seed(seed)
    head_ids = torch.arange(0, VOCAB, 3) if head_subset else None
    head = hf.lm_head.weight if head_ids is None else hf.lm_head.weight[head_ids]
    config = feature_config(hf.config, 1, None, target_layers)
    net = FeatureDraftNet(config, hf.model.embed_tokens.weight, head).eval()
    return TreeModel(hf, 512), FeatureDraftModel(net, 512, head_ids)


@pytest.mark.parametrize("head_subset,target_layers", [(False, None), (True, None), (True, FUSED)])
@pytest.mark.parametrize("prompt_len", [1, 11])
def test_greedy_output_equals_autoregressive(head_subset, target_layers, prompt_len):
    target, draft = feature_pair(head_subset, target_layers=target_layers)
    prompt = random_prompt(prompt_len, VOCAB, 5)
    reference = autoregressive_generate(target, prompt, 48, set(), GREEDY, torch.Generator()).output_ids
    shapes = (chain(4), kary_tree(2, 3), wxd_tree(3, 4))
    drafters = [StaticTreeDrafter(draft, growmap, GREEDY, False) for growmap in shapes]
    drafters.append(DynamicTreeDrafter(draft, GREEDY, False, budget=12, width=3, max_depth=5))
    for drafter in drafters:
        result = speculative_generate(target, drafter, prompt, 48, set(), GREEDY, "greedy", torch.Generator())
        assert result.output_ids == reference


def test_sampling_verifiers_run_with_a_feature_draft():
    target, draft = feature_pair(True)
    sampling = Sampling(0.8, 0.9)
    for verifier, sample_children in (("specinfer", True), ("match", False)):
        drafter = StaticTreeDrafter(draft, kary_tree(2, 3), sampling, sample_children)
        result = speculative_generate(target, drafter, random_prompt(7, VOCAB, 1), 40, set(), sampling, verifier,
                                      torch.Generator().manual_seed(0))
        assert len(result.output_ids) == 40 and all(0 <= t < VOCAB for t in result.output_ids)


@pytest.mark.parametrize("target_layers", [None, FUSED, (1,)])
def test_draft_reads_the_targets_feature_of_the_previous_slot(monkeypatch, target_layers):
    """Every committed slot p the draft runs gets the target's final hidden state of slot p - 1 (zero at 0),
    or for a fused-layer draft its chosen layers' states through `target_fc`, the same as a teacher-forced
    target forward over the whole output gives."""
    target, draft = feature_pair(False, target_layers=target_layers)
    seen: dict[int, torch.Tensor] = {}
    catch_up = DraftCache.catch_up

    def spy(self, committed):
        start = self.cached_len
        for offset in range(committed.shape[0] - start):
            seen[start + offset] = self.feature_log[start + offset].clone()
        return catch_up(self, committed)

    monkeypatch.setattr(DraftCache, "catch_up", spy)
    prompt = random_prompt(6, VOCAB, 2)
    out = speculative_generate(target, StaticTreeDrafter(draft, kary_tree(2, 2), GREEDY, False), prompt, 30, set(),
                               GREEDY, "greedy", torch.Generator()).output_ids
    text = torch.tensor(prompt + out)
    fresh = TreeModel(target.hf_model, 512)
    slots = torch.arange(len(text))
    _, hidden = fresh.forward(text, slots, slots, torch.ones(len(text), len(text)).tril().bool(), return_hidden=True,
                              hidden_layers=target_layers)
    hidden = draft.target_feature(hidden)
    assert sorted(seen) == list(range(len(seen))) and len(seen) > len(prompt)  # each committed slot, once
    for slot, feature in seen.items():
        expected = torch.zeros_like(feature) if slot == 0 else hidden[slot - 1]
        torch.testing.assert_close(feature, expected, atol=1e-4, rtol=1e-4)


def test_feature_training_lowers_loss_and_checkpoint_runs_test_greedyS(tmp_path, tiny_target, text_file):
    out = tmp_path / "run"
    metrics = train(feature_settings(out, tiny_target, text_file, vocab_subset=40, max_steps=40,
                                  save_dtype="bfloat16"))
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    assert 0.0 <= metrics["heldout_top1"] <= metrics["heldout_top4"] <= 1.0
    ckpt = checkpoints(out)[-1]
    config = json.loads((ckpt / "config.json").read_text())
    assert "treespec_feature_draft" in config and config["num_hidden_layers"] == 1
    result = subprocess.run([sys.executable, str(REPO_ROOT / "test_greedyS.py"), "--model", str(ckpt), "--target",
                             str(tiny_target), "--dataset", str(text_file), "--end", "2", "--max-new-tokens", "12",
                             "--growmap", str(REPO_ROOT / "growmaps" / "4-chain.pt"), "--dtype", "float32",
                             "--device", "cpu", "--results-dir", str(tmp_path / "results")],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "results:" in result.stdout


def test_resume_continues_a_feature_run(tmp_path, tiny_target, text_file):
    out = tmp_path / "run"
    train(feature_settings(out, tiny_target, text_file, max_steps=20, save_steps=10))
    train(feature_settings(out, tiny_target, text_file, max_steps=30, save_steps=10, resume=True,
                           resume_changed=True))
    assert checkpoints(out)[-1].name == "checkpoint-30"
    steps = [r["step"] for r in read_log(out) if "loss" in r]
    assert steps[steps.index(20) + 1] == 25


def test_feature_draft_for_another_target_is_refused(tmp_path, tiny_target, text_file):
    out = tmp_path / "run"
    train(feature_settings(out, tiny_target, text_file, max_steps=5, save_steps=5))
    other = tiny_llama(1, vocab=VOCAB, hidden=32, heads=2, kv_heads=1)
    with pytest.raises(UserError, match="hidden size|vocabulary"):
        load_feature_net(checkpoints(out)[-1], other)


def test_measure_cost_times_a_feature_draft_through_the_engine(tmp_path, tiny_target, text_file):
    from utils.training.cost import measure_cost

    out = tmp_path / "run"
    train(feature_settings(out, tiny_target, text_file, max_steps=5, save_steps=5))
    rows = measure_cost(str(checkpoints(out)[-1]), str(tiny_target), context=16, steps=2, repeats=1)
    assert [row["runtime"] for row in rows] == ["engine", "engine"]
    assert all(row["target_ms"] > 0 and row["draft_ms"] > 0 and row["ratio"] > 0 for row in rows)


def test_eval_only_and_token_loaders_know_a_feature_draft(tmp_path, tiny_target, text_file):
    from utils.training import evaluate_only
    from utils.training.token_loop import load_init
    from utils.models import load_hf_model, load_tokenizer

    out = tmp_path / "run"
    train(feature_settings(out, tiny_target, text_file, max_steps=5, save_steps=5))
    ckpt = str(checkpoints(out)[-1])
    metrics = evaluate_only(feature_settings(tmp_path / "eval", tiny_target, text_file, init=ckpt,
                                          eval_only=True))
    assert 0.0 <= metrics["heldout_top1"] <= metrics["heldout_top4"] <= 1.0 and metrics["heldout_positions"] > 0
    with pytest.raises(UserError, match="feature draft"):
        load_hf_model(ckpt, torch.float32, "cpu")
    with pytest.raises(UserError, match="feature draft"):
        load_init(ckpt, load_tokenizer(str(tiny_target)), str(tiny_target))


def test_token_only_flags_are_refused_for_a_feature_draft(tmp_path, tiny_target, text_file):
    with pytest.raises(UserError, match="--loss"):
        train(feature_settings(tmp_path / "run", tiny_target, text_file, loss="kl"))


def test_resumed_run_equals_an_uninterrupted_one_with_ttt(tmp_path, tiny_target, text_file):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(feature_settings(straight, tiny_target, text_file, max_steps=20, save_steps=20, ttt_steps=2))
    train(feature_settings(resumed, tiny_target, text_file, max_steps=20, save_steps=10, ttt_steps=2,
                           max_minutes=0.0))
    # interrupt: drop the final checkpoint and resume from checkpoint-10
    import shutil
    shutil.rmtree(resumed / "checkpoint-20")
    train(feature_settings(resumed, tiny_target, text_file, max_steps=20, save_steps=10, ttt_steps=2, resume=True))
    a = load_file(str(straight / "checkpoint-20" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint-20" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
