"""pretrain_draft_model.py on tiny offline models: training lowers the loss, checkpoints load, --resume
continues, a mismatched --init tokenizer is refused, and the loss/vocabulary helpers are right."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, build_tiny_tokenizer
from utils.training.distill_data import DistillData
from utils.training import evaluate_only, train
from utils.training.common import checkpoints
from utils.training.settings import IGNORE, TrainSettings
from utils.training.token_loop import draft_losses
from utils.training.training_data import choose_vocab, make_batch, vocab_tables


def tiny_settings(out: Path, target: Path, data: Path, **overrides) -> TrainSettings:
    base = dict(output_dir=str(out), target=str(target), dataset=str(data), preset="tiny", max_steps=40,
                save_steps=20, eval_steps=20, logging_steps=5, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=5,
                mixed_precision="no", eval_rows=4, seed=0)
    return TrainSettings(**(base | overrides))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]


def test_tiny_preset_trains_and_loss_falls(tmp_path, tiny_target, text_file):
    out = tmp_path / "run"
    train(tiny_settings(out, tiny_target, text_file))
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    assert (out / "train_settings.json").is_file()


def test_checkpoint_is_a_transformers_folder(tmp_path, tiny_target, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    train(tiny_settings(out, tiny_target, text_file, max_steps=20, vocab_subset=40, save_dtype="bfloat16"))
    ckpt = out / "checkpoint-20"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "draft_vocab.json", "train_settings.json"):
        assert (ckpt / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.vocab_size == 40
    assert len(AutoTokenizer.from_pretrained(ckpt)) == len(build_tiny_tokenizer())
    vocab = json.loads((ckpt / "draft_vocab.json").read_text())
    assert len(vocab["draft_to_target"]) == 40 and vocab["target_vocab_size"] == len(build_tiny_tokenizer())
    metrics = evaluate_only(tiny_settings(out, tiny_target, text_file, init=str(ckpt), eval_only=True))
    assert 0.0 <= metrics["eval_top1"] <= metrics["eval_top4"] <= 1.0 and metrics["eval_positions"] > 0


def test_resume_picks_up_step_count(tmp_path, tiny_target, text_file):
    out = tmp_path / "run"
    train(tiny_settings(out, tiny_target, text_file, max_steps=20, save_steps=10))
    assert [p.name for p in checkpoints(out)] == ["checkpoint-10", "checkpoint-20"]
    # a longer run is a changed setting (its schedule decays over 30 steps, not 20): allowed when asked for
    train(tiny_settings(out, tiny_target, text_file, max_steps=30, save_steps=10, resume=True, resume_changed=True))
    assert checkpoints(out)[-1].name == "checkpoint-30"
    steps = [r["step"] for r in read_log(out) if "loss" in r]
    assert steps[steps.index(20) + 1] == 25  # continued at step 21, not from scratch


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "pretrain_draft_model.py"), *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)


def test_mismatched_init_tokenizer_is_refused(tmp_path, tiny_target, text_file):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    other = tmp_path / "other"
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(["<unk>", "a", "b", "c"])}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(other)
    LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    result = run_script("--init", str(other), "--target", str(tiny_target), "--dataset", str(text_file),
                        "--output-dir", str(tmp_path / "out"), "--max-steps", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "4 tokens" in lines[0] and f"{len(build_tiny_tokenizer())}" in lines[0]


def test_bad_flag_is_one_line_exit_2(tmp_path, text_file):
    result = run_script("--dataset", str(text_file), "--loss", "nope", "--output-dir", str(tmp_path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_help_describes_every_flag():
    result = run_script("--help")
    assert result.returncode == 0
    for flag in ("--distill", "--loss", "--resume", "--save-steps", "--vocab-subset", "--init", "--seed"):
        assert flag in result.stdout


def toy_data() -> DistillData:
    """Two rows; the second row's tokens 1.. carry a stored teacher whose top-1 is token 5."""
    tokens = np.array([3, 4, 5, 6, 3, 5, 5, 7], dtype=np.int32)
    teacher = np.array([0, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
    ids = np.tile(np.array([5, 6, 9], dtype=np.int32), (8, 1))
    lps = np.tile(np.log(np.array([0.7, 0.2, 0.1])).astype(np.float16), (8, 1))
    return DistillData(tokens, np.array([0, 4, 8]), teacher, ids, lps)


def test_vocab_subset_maps_and_ignores_oov_labels():
    data = toy_data()
    vocab, coverage = choose_vocab(data, 4, 10, [0], 0)
    assert vocab.draft_to_target == sorted(vocab.draft_to_target) and 0 in vocab.draft_to_target
    vocab_map, owned = vocab_tables(vocab)
    batch = make_batch(data, [(0, 4), (4, 8)], vocab_map, owned, pad_id=0)
    labels = batch.labels
    for r, (a, b) in enumerate([(0, 4), (4, 8)]):
        for t in range(b - a - 1):
            target = int(data.tokens[a + t + 1])
            expect = int(vocab_map[target]) if bool(owned[target]) else IGNORE
            assert int(labels[r, t]) == expect
    assert 0 < coverage <= 1


def test_kl_is_zero_when_draft_matches_stored_teacher():
    data = toy_data()
    batch = make_batch(data, [(4, 8)], None, None, pad_id=0)
    logits = torch.full((1, 4, 10), -30.0)
    logits[..., 5], logits[..., 6], logits[..., 9] = np.log(0.7), np.log(0.2), np.log(0.1)
    losses = draft_losses(logits, batch, None, None, None, "kl", 0.5)
    assert float(losses["kl"]) == pytest.approx(0.0, abs=1e-3)
    worse = draft_losses(torch.zeros(1, 4, 10), batch, None, None, None, "kl", 0.5)
    assert float(worse["kl"]) > 0.3


def test_batched_decoder_matches_transformers_greedy(tiny_target):
    """Left padding, the static cache, row pruning and the GQA attention change nothing at T=0."""
    from transformers import AutoModelForCausalLM

    from utils.training.distill_data import GQA_ATTENTION, decode_batch, register_gqa_attention

    register_gqa_attention()
    fast = AutoModelForCausalLM.from_pretrained(tiny_target, attn_implementation=GQA_ATTENTION).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_target, attn_implementation="eager").eval()
    prompts = [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [30]]
    stop = 40
    out = decode_batch(fast, prompts, [0.0, 0.0, 0.0], 12, stop, 4, 1, torch.Generator().manual_seed(0))
    for prompt, row in zip(prompts, out):
        ids = torch.tensor([prompt])
        ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 eos_token_id=stop, pad_token_id=1)[0, len(prompt):].tolist()
        assert row.tokens == ref[:len(row.tokens)] and (row.finished or len(row.tokens) == 12)
        assert [int(t[0]) for t in row.topk_ids] == row.tokens


def test_distill_shard_from_a_tiny_target(tiny_target, tmp_path, monkeypatch):
    """A shard has aligned per-token arrays; the teacher covers only target-written tokens."""
    from utils.training.distill_data import DistillSettings, ensure_distill_data, load_distill_data

    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    settings = DistillSettings(target=str(tiny_target), batch_size=6, max_new_tokens=8, instruction_max_tokens=6,
                               top_k=4, dtype="float32", temperatures=(0.0, 1.0))
    paths = ensure_distill_data(settings, 20)
    assert ensure_distill_data(settings, 20) == paths  # cached: nothing regenerated
    data = load_distill_data(paths)
    assert data.num_teacher_tokens >= 20
    assert data.topk_ids.shape == (len(data.tokens), 4) and data.offsets[-1] == len(data.tokens)
    assert not data.teacher[data.offsets[:-1]].any()  # a row's first token is never target-written
