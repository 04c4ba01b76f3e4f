"""A Llama-family model folder whose only tokenizer file is a SentencePiece `tokenizer.model` (older Llama repos,
several small hub drafts) loads and decodes: the tokenizer is made offline with sentencepiece's own trainer."""
from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece

from tests.conftest import SENTENCES, WORDS
from tests.test_cli import results_of, run_script
from tests.tiny_models import tiny_llama
from utils.models import REPO_ROOT

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A 200-piece BPE SentencePiece model trained on the test vocabulary's words and sentences."""
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    lines = [" ".join(WORDS[i:i + 12]) for i in range(0, len(WORDS), 5)] + SENTENCES
    corpus.write_text("\n".join(lines * 4) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=200, model_type="bpe", unk_id=0,
        bos_id=BOS, eos_id=EOS, pad_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return folder / "sp.model"


def llama_folder(folder: Path, spm_file: Path, seed: int, **shape) -> str:
    """A saved random Llama whose tokenizer is `spm_file` alone (no tokenizer.json or tokenizer_config.json)."""
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(spm_file)).get_piece_size()
    model = tiny_llama(seed=seed, vocab=vocab, **shape)
    model.config.bos_token_id, model.config.eos_token_id = BOS, EOS
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = BOS, EOS
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(spm_file.read_bytes())
    return str(folder)


def test_tokenizer_model_alone_loads_with_sentencepiece_ids(sentencepiece_model, tmp_path):
    from utils.models import load_tokenizer

    folder = llama_folder(tmp_path / "target", sentencepiece_model, seed=0)
    assert sorted(p.name for p in Path(folder).iterdir() if "token" in p.name) == ["tokenizer.model"]
    tokenizer = load_tokenizer(folder)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    text = "the court said the team won the match ."
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == processor.encode(text)
    assert tokenizer.decode(processor.encode(text)) == text
    assert tokenizer.eos_token_id == EOS


def test_script_decodes_on_a_sentencepiece_pair(sentencepiece_model, tmp_path):
    target = llama_folder(tmp_path / "target", sentencepiece_model, seed=0)
    draft = llama_folder(tmp_path / "draft", sentencepiece_model, seed=1, hidden=32, layers=1, heads=2, kv_heads=1)
    completed = run_script("--target", target, "--model", draft, "--Mode", "benchmark", "--end", "2",
                           "--max-new-tokens", "12", "--prompt-len", "24", "--dtype", "float32", "--device", "cpu",
                           "--growmap", str(REPO_ROOT / "growmaps" / "4x8-tree.pt"),
                           "--results-dir", str(tmp_path / "results"))
    assert completed.returncode == 0, completed.stderr
    summary, rows = results_of(completed)
    assert summary["prompts"] == 2
    for row in rows:  # greedy speculative output is the target's own, token for token
        assert row["output_ids"] == row["baseline_output_ids"] and len(row["output_ids"]) > 0


def test_missing_sentencepiece_is_one_line(sentencepiece_model, tmp_path, monkeypatch):
    import sys

    from utils.errors import UserError
    from utils.models import load_tokenizer

    folder = llama_folder(tmp_path / "target", sentencepiece_model, seed=0)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(UserError, match="pip install sentencepiece protobuf"):
        load_tokenizer(folder)
