"""Shared pytest fixtures: a tiny offline tokenizer, so no test needs a download or a real model."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Tests leave the user's ~/.cache/treespec alone: every test, and every subprocess a test starts (they inherit
# the environment, or take `subprocess_env()`), writes calibration entries, kernels and generated data into a
# fresh folder per session. Only the converted default target and the offline LLaVA, pure functions of installed
# packages that take ~30 s to make, are kept between sessions, in the checkout's ignored .cache/ folder.
TEST_CACHE = Path(tempfile.mkdtemp(prefix="treespec-tests-"))
KEPT_CACHE = REPO_ROOT / ".cache" / "tests"
for kept in ("converted", "llava"):
    (KEPT_CACHE / kept).mkdir(parents=True, exist_ok=True)
    (TEST_CACHE / kept).symlink_to(KEPT_CACHE / kept, target_is_directory=True)
os.environ["TREESPEC_CACHE"] = str(TEST_CACHE)
os.environ["HF_DATASETS_CACHE"] = str(TEST_CACHE / "hf-datasets")  # `datasets` caches every file it reads


def subprocess_env(**extra: str) -> dict[str, str]:
    """A minimal environment for a script run by a test: offline, one thread, the session's test cache."""
    return {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "TREESPEC_CACHE": str(TEST_CACHE),
            "HF_DATASETS_CACHE": os.environ["HF_DATASETS_CACHE"], **extra}


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(TEST_CACHE, ignore_errors=True)

# Unit tests use tiny models, for which one thread is fastest and immune to a busy machine's other processes;
# the integration test raises it again for the real model.
UNIT_TEST_THREADS = 1
DEFAULT_THREADS = torch.get_num_threads()
torch.set_num_threads(UNIT_TEST_THREADS)

SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>"]
# Every word is its own token; anything else becomes <unk>, so any text tokenizes.
WORDS = """
the a an and or but of to in on at for with from by as is are was were be been it its this that these
those he she they we you i his her their our your my not no yes all some one two three four five six
seven eight nine ten first last new old year years day days week time people city country government
said says will would could should can may might has have had do does did more most than then there
here when where what which who why how about after before over under into out up down said police
court team game win won lost match season league minister president company market price prices
shares report new study scientists researchers health hospital patients doctors weather storm rain
snow wind heat water school students children family home house food recipe cook minutes salt oil
sugar flour eggs butter pan oven heat add mix stir serve write explain summarize list compare code
python function email story problem math please short simple steps why difference between example
make using use used like just also very good best great well much many each other world state
national local public back still even only own two percent million billion per cent around against
during while because so if any through between both under three workers officials""".split()
PUNCTUATION = list(".,!?;:'\"()-%$")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer():
    """A word-level PreTrainedTokenizerFast (< 512 tokens) with a chat template and `<eos>`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + PUNCTUATION + WORDS:
        vocab.setdefault(token, len(vocab))
    assert len(vocab) <= 512
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no prefix in this vocab
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
        extra_special_tokens=["<|user|>", "<|assistant|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Word-level tokenizer with an unk token, eos `<eos>` and a jinja chat template; built, never downloaded."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer):
    """Saved transformers folders: `target` and `draft` share the tiny tokenizer's vocabulary, `other_vocab`
    does not. Used by the command-line tests of the scripts."""
    from tests.tiny_models import tiny_llama

    root = tmp_path_factory.mktemp("tiny_models")
    vocab = len(tiny_tokenizer)
    dirs = {}
    for name, model in {"target": tiny_llama(seed=0, vocab=vocab),
                        "draft": tiny_llama(seed=1, vocab=vocab, hidden=32, layers=1, heads=2, kv_heads=1),
                        "other_vocab": tiny_llama(seed=2, vocab=vocab + 7, hidden=32, layers=1, heads=2, kv_heads=1)}.items():
        folder = root / name
        model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
        model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        dirs[name] = str(folder)
    return dirs


# Training runs (tests/test_pretrain.py, tests/test_feature_draft.py): a tiny saved target and a text file.
SENTENCES = [
    "the team won the match and the city was happy .",
    "scientists said the study of patients in the hospital was good .",
    "add the flour and the sugar , mix with butter and eggs , then cook in the oven for ten minutes .",
    "the president of the company said the market price of shares will be up this year .",
    "please write a short story about a family and their home in the country .",
]


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> Path:
    """A saved random Llama with the word-level test tokenizer: a --target that needs no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("target")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(SENTENCES * 8) + "\n")
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change once set: reset it after each
    test, so an in-process training run does not inherit another test's settings."""
    yield
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)
