"""Datasets as users bring them (issue 17): every local format through `datasets`, the original project's
pre-tokenized rows, MT-bench's multi-turn questions. All files are tiny and made here; no network."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import PUNCTUATION, WORDS, build_tiny_tokenizer
from utils import data, hub
from utils.data import load_prompts, load_texts, next_turn
from utils.errors import UserError
from utils.models import REPO_ROOT

ROWS = [{"text": "the city"}, {"text": "the court"}, {"text": "the team"}]
QUESTIONS = [  # MT-bench's question.jsonl layout, turns in the tiny tokenizer's words
    {"question_id": 81, "category": "writing", "turns": ["write a short story", "explain the story to children"]},
    {"question_id": 82, "category": "math", "turns": ["list three prices", "compare the prices"]},
]


def _write_rows(path: Path, rows: list[dict]) -> str:
    """`rows` in the format `path`'s suffix names, written with the libraries users write them with."""
    import datasets
    import pyarrow as pa

    table = datasets.Dataset.from_list(rows)
    if path.suffix == ".parquet":
        table.to_parquet(str(path))
    elif path.suffix == ".csv":
        table.to_csv(str(path), index=False)
    elif path.suffix == ".arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.data.table.schema) as writer:
            writer.write_table(table.data.table)
    elif path.suffix == ".txt":
        path.write_text("\n".join(r["text"] for r in rows) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        raise ValueError(path)
    return str(path)


@pytest.mark.parametrize("name", ["rows.csv", "rows.parquet", "rows.arrow", "rows.txt", "rows.jsonl",
                                  "array.json", "lines.json", "saved"])
def test_every_local_format_gives_the_same_rows(tmp_path, name):
    path = tmp_path / name
    if name == "array.json":
        path.write_text(json.dumps(ROWS))
    elif name == "lines.json":  # JSON lines under a .json name, as the original's c4_small.json
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    elif name == "saved":
        import datasets

        datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    else:
        _write_rows(path, ROWS)
    assert load_texts(str(path)) == [("text", r["text"]) for r in ROWS]
    assert load_texts(str(path), 1, 2) == [("text", "the court")]


def test_datasets_is_a_requirement():
    lines = [line.split("#")[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    assert any(re.match(r"datasets\b", line) for line in lines)


def test_a_broken_file_is_one_line(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="cannot read .*bad.parquet as parquet") as info:
        load_texts(str(path))
    assert "\n" not in str(info.value)


# --- pre-tokenized rows (`input_tokens`) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> str:
    """A second word-level tokenizer over the same words with other ids (a tokenizer-only folder), standing in
    for the Llama-2 tokenizer the original's c4_small.json was made with."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in ["<s>", "</s>", "<unk>"] + list(reversed(WORDS + PUNCTUATION)):
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    folder = tmp_path_factory.mktemp("other_tokenizer")
    tokenizer.save_pretrained(folder)
    return str(folder)


TEXTS = ["the team won the match and the city was happy", "scientists said the study was good"]


def _c4_small(path: Path, tokenizer) -> str:
    """The original's c4_small.json layout: JSON lines under a .json name, `input_tokens` / `input_ids` as a
    batch of one, BOS first."""
    lines = []
    for text in TEXTS:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        lines.append(json.dumps({"input_tokens": [ids[:6]], "input_ids": [ids]}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_ids_of_another_tokenizer_are_refused_without_dataset_tokenizer(tiny_tokenizer, other_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    path = _c4_small(tmp_path / "c4_small.json", AutoTokenizer.from_pretrained(other_tokenizer))
    with pytest.raises(UserError, match="pre-tokenized ids .* pass --dataset-tokenizer") as info:
        load_prompts(path, tiny_tokenizer, 0, 2, prompt_len=16)
    assert "\n" not in str(info.value)


def test_ids_of_another_tokenizer_are_decoded_and_reencoded(tiny_tokenizer, other_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    path = _c4_small(tmp_path / "c4_small.json", AutoTokenizer.from_pretrained(other_tokenizer))
    prompts = load_prompts(path, tiny_tokenizer, 0, 2, prompt_len=16, dataset_tokenizer=other_tokenizer)
    for prompt, text in zip(prompts, TEXTS):
        words = " ".join(text.split()[:5])  # input_tokens held BOS + the first 5 words
        assert prompt.text == words and prompt.kind == data.PLAIN_KIND
        assert prompt.ids == tiny_tokenizer(words)["input_ids"]


def test_ids_of_the_targets_own_tokenizer_are_used_as_they_are(tiny_tokenizer, tmp_path):
    tokenizer = build_tiny_tokenizer()  # the same vocabulary, another object: known to fit
    ids = tiny_tokenizer("the team won the match")["input_ids"]
    path = tmp_path / "own.jsonl"
    path.write_text(json.dumps({"input_tokens": [ids]}) + "\n")
    (prompt,) = load_prompts(str(path), tiny_tokenizer, 0, 1, prompt_len=3, dataset_tokenizer=tokenizer)
    assert prompt.ids == ids[:3] and prompt.kind == data.TOKENS_KIND


def test_ids_outside_the_dataset_tokenizers_vocabulary_are_refused(tiny_tokenizer, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"input_tokens": [[1, 2, 31999]]}) + "\n")
    with pytest.raises(UserError, match="outside the .*vocabulary"):
        load_prompts(str(path), tiny_tokenizer, 0, 1, prompt_len=8, dataset_tokenizer=tiny_tokenizer)


def _converted_folder(folder: Path, tokenizer, texts: list[str], width: int = 12) -> str:
    """The original's converted c4/cnn/openwebtext layout: a save_to_disk folder of `input_ids` +
    `attention_mask` rows (BOS first, right-padded to `width`), no text column."""
    import datasets

    rows = {"input_ids": [], "attention_mask": []}
    for text in texts:
        ids = [tokenizer.bos_token_id or 0] + tokenizer(text, add_special_tokens=False)["input_ids"]
        pad = width - len(ids)
        rows["input_ids"].append(ids + [0] * pad)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    return str(folder)


LONGER = TEXTS + ["the police said the storm was over", "add the flour and mix"]


def test_input_ids_folder_of_another_tokenizer_is_decoded_and_reencoded(tiny_tokenizer, other_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    folder = _converted_folder(tmp_path / "c4", AutoTokenizer.from_pretrained(other_tokenizer), LONGER)
    prompts = load_prompts(folder, tiny_tokenizer, 1, 3, prompt_len=4, dataset_tokenizer=other_tokenizer)
    assert [p.index for p in prompts] == [1, 2]  # --start/--end slice the rows as for text
    for prompt, text in zip(prompts, LONGER[1:3]):
        assert prompt.kind == data.PLAIN_KIND and prompt.text == text  # the padding is not decoded
        assert prompt.ids == tiny_tokenizer(text)["input_ids"][:4]


def test_input_ids_folder_of_the_targets_tokenizer_is_used_as_it_is(tiny_tokenizer, tmp_path):
    folder = _converted_folder(tmp_path / "own", tiny_tokenizer, TEXTS)
    prompts = load_prompts(folder, tiny_tokenizer, 0, 2, prompt_len=5, dataset_tokenizer=build_tiny_tokenizer())
    for prompt, text in zip(prompts, TEXTS):
        assert prompt.kind == data.TOKENS_KIND
        assert prompt.ids == [tiny_tokenizer.bos_token_id or 0, *tiny_tokenizer(text, add_special_tokens=False)["input_ids"]][:5]


def test_input_ids_folder_without_dataset_tokenizer_is_refused(tiny_tokenizer, tmp_path):
    folder = _converted_folder(tmp_path / "owt", tiny_tokenizer, TEXTS)
    with pytest.raises(UserError, match=r"pre-tokenized ids \(input_ids\) .* pass --dataset-tokenizer") as info:
        load_prompts(folder, tiny_tokenizer, 0, 2, prompt_len=8)
    assert "\n" not in str(info.value)


def test_input_ids_with_a_mask_of_another_length_are_refused(tiny_tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"input_ids": [5, 6, 7], "attention_mask": [1, 1]}) + "\n")
    with pytest.raises(UserError, match="attention_mask has 2 entries for 3 input_ids"):
        load_prompts(str(path), tiny_tokenizer, 0, 1, prompt_len=8, dataset_tokenizer=tiny_tokenizer)


def test_script_refuses_input_ids_before_any_model_loads(tiny_model_dirs, tiny_tokenizer, tmp_path):
    """A converted folder with no --dataset-tokenizer: one line naming input_ids and --dataset-tokenizer, exit 2,
    found before the target loads (its weights file is garbage here, which loading would report instead)."""
    import shutil

    from tests.test_cli import run_script

    target = tmp_path / "target"
    shutil.copytree(tiny_model_dirs["target"], target)
    (target / "model.safetensors").write_bytes(b"not weights")
    folder = _converted_folder(tmp_path / "owt", tiny_tokenizer, TEXTS)
    completed = run_script("--target", str(target), "--model", tiny_model_dirs["draft"], "--dataset", folder,
                           "--end", "2", "--growmap", str(REPO_ROOT / "growmaps" / "4x8-tree.pt"),
                           "--results-dir", str(tmp_path / "results"))
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2 and len(lines) == 1, completed.stderr
    assert "input_ids" in lines[0] and "--dataset-tokenizer" in lines[0]


# --- MT-bench and multi-turn rows --------------------------------------------------------------------------


def _question_file(tmp_path: Path) -> str:
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    return str(path)


def _chat(tokenizer, messages: list[tuple[str, str]]) -> list[int]:
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)


def test_question_jsonl_first_turn_is_the_default(tiny_tokenizer, tmp_path):
    prompts = load_prompts(_question_file(tmp_path), tiny_tokenizer, 0, 2, prompt_len=64)
    for prompt, question in zip(prompts, QUESTIONS):
        assert prompt.kind == data.CHAT_KIND and prompt.text == question["turns"][0]
        assert prompt.ids == _chat(tiny_tokenizer, [("user", question["turns"][0])])
        assert next_turn(tiny_tokenizer, prompt, [5, 6]) is None


def test_all_turns_put_the_models_answer_in_the_history(tiny_tokenizer, tmp_path):
    (prompt,) = load_prompts(_question_file(tmp_path), tiny_tokenizer, 1, 2, prompt_len=64, turns="all")
    first, second = QUESTIONS[1]["turns"]
    assert prompt.ids == _chat(tiny_tokenizer, [("user", first)]) and prompt.later_turns == (second,)
    answer = tiny_tokenizer("the prices are up")["input_ids"] + [tiny_tokenizer.eos_token_id]
    follow = next_turn(tiny_tokenizer, prompt, answer)
    assert (follow.index, follow.turn, follow.text) == (1, 1, second)
    assert follow.ids == _chat(tiny_tokenizer, [("user", first), ("assistant", "the prices are up"), ("user", second)])
    assert next_turn(tiny_tokenizer, follow, answer) is None


ORIGINAL_LLAVA_ROWS = REPO_ROOT.parent / "shared" / "original" / "instruct150k_subset.json"


def test_sharegpt_conversations_ask_the_user_turns(tiny_tokenizer, tmp_path):
    """ShareGPT / LLaVA-Instruct rows: the human turns are the chat turns, LLaVA's <image> placeholder dropped,
    the recorded answers unused."""
    rows = [{"id": "a", "conversations": [{"from": "human", "value": "<image>"},
                                          {"from": "human", "value": "What is shown?\n<image>"},
                                          {"from": "gpt", "value": "A cat."},
                                          {"from": "human", "value": "Which colour?"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows))
    (prompt,) = load_prompts(str(path), tiny_tokenizer, 0, 1, prompt_len=64, turns="all")
    assert prompt.kind == data.CHAT_KIND and prompt.text == "What is shown?"
    assert prompt.ids == _chat(tiny_tokenizer, [("user", "What is shown?")])
    assert prompt.later_turns == ("Which colour?",)
    path.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "no question"}]}]))
    with pytest.raises(UserError, match="no non-empty turn from 'human'"):
        load_texts(str(path))
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": 7}]}]))
    with pytest.raises(UserError, match="not a string"):
        load_texts(str(path))


@pytest.mark.skipif(not ORIGINAL_LLAVA_ROWS.is_file(), reason="the original project's LLaVA-Instruct rows are absent")
def test_the_originals_llava_instruct_rows_read_as_text_questions():
    rows = load_texts(str(ORIGINAL_LLAVA_ROWS), 0, 3)
    assert [kind for kind, _ in rows] == [data.CHAT_KIND] * 3
    assert rows[0][1] == "What could be the reason for the woman raising her cell phone in the air?"


@pytest.mark.parametrize("turns", data.TURNS)
def test_mtbench_on_the_hub_and_a_local_question_file_give_the_same_prompts(tiny_tokenizer, tmp_path, monkeypatch,
                                                                           turns):
    """The hub copy (HuggingFaceH4/mt_bench_prompts: `turns` renamed `prompt`, a hashed prompt_id, a reference
    list) is faked from the same questions; no network."""
    import datasets

    hub_rows = [{"prompt": q["turns"], "prompt_id": 1000 + i, "category": q["category"], "reference": []}
                for i, q in enumerate(QUESTIONS)]
    local = load_prompts(_question_file(tmp_path), tiny_tokenizer, 0, 2, prompt_len=64, turns=turns)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config, split, streaming: (
        datasets.Dataset.from_list(hub_rows) if path == data.HUB_DATASETS["mtbench"].path else pytest.fail(path)))
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    remote = load_prompts("mtbench", tiny_tokenizer, 0, 2, prompt_len=64, turns=turns)
    assert local == remote
    assert [len(p.later_turns) for p in local] == ([1, 1] if turns == "all" else [0, 0])


def test_all_turns_need_a_chat_template(tiny_tokenizer, tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="--turns all needs"):
        load_prompts(_question_file(tmp_path), tokenizer, 0, 1, prompt_len=64, turns="all")
    (prompt,) = load_prompts(_question_file(tmp_path), tokenizer, 0, 1, prompt_len=64)
    assert prompt.kind == data.PLAIN_CHAT_KIND



def test_all_turns_end_to_end_speculative_equals_baseline(tiny_model_dirs, tiny_tokenizer, tmp_path, monkeypatch,
                                                          capsys):
    """test_greedyS.py --turns all on tiny models: the second turn asked with the run's own first answer in the
    history, speculative output equal to the target's own at T = 0, both turns counted; a conversation is one
    JSONL row (its later turns nested), so --resume keeps or reruns it whole."""
    import runpy
    import sys

    from utils.experiment import turn_rows

    script = str(REPO_ROOT / "test_greedyS.py")
    questions = _question_file(tmp_path)

    def run(*extra: str) -> tuple[dict, list[dict]]:
        monkeypatch.setattr(sys, "argv", [script, "--target", tiny_model_dirs["target"], "--model",
                                          tiny_model_dirs["draft"], "--dataset", questions, "--turns", "all",
                                          "--max-new-tokens", "8", "--prompt-len", "24", "--growmap",
                                          str(REPO_ROOT / "growmaps" / "4x8-tree.pt"), "--results-dir",
                                          str(tmp_path / "results"), *extra])
        runpy.run_path(script, run_name="__main__")
        path = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: "))
        return json.loads(path.read_text()), [json.loads(line) for line in path.with_suffix(".jsonl").open()]

    summary, conversations = run()
    _, base_conversations = run("--Mode", "baseline")
    rows, base_rows = turn_rows(conversations), turn_rows(base_conversations)
    assert [(r["index"], r["turn"]) for r in conversations] == [(0, 0), (1, 0)]  # one row per conversation
    assert [(r["index"], r["turn"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert summary["prompts"] == 4 and summary["new_tokens"] == sum(len(r["output_ids"]) for r in rows)
    assert [r["output_ids"] for r in rows] == [r["output_ids"] for r in base_rows]
    for first, second, question in zip(rows[::2], rows[1::2], QUESTIONS):
        answer = tiny_tokenizer.decode(first["output_ids"], skip_special_tokens=True)
        assert second["prompt_ids"] == _chat(tiny_tokenizer, [("user", question["turns"][0]), ("assistant", answer),
                                                              ("user", question["turns"][1])])
