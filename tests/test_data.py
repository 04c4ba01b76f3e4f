"""utils.data: the built-in prompt set, local file formats, slicing, truncation and error messages.

No network: hub names are exercised with the hub unreachable or `datasets.load_dataset` replaced for hub ids.
(tests/test_data_formats.py: every format, multi-turn rows, pre-tokenized rows.)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from utils import data, hub
from utils.data import BUILTIN_PATH, Prompt, load_prompts, load_texts
from utils.errors import UserError


def _builtin_rows() -> list[dict]:
    return [json.loads(line) for line in BUILTIN_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- the built-in set ------------------------------------------------------------------------------------


def test_builtin_has_enough_prompts_of_each_kind():
    rows = _builtin_rows()
    assert len(rows) >= 72
    kinds = [r["kind"] for r in rows]
    for kind in ("news", "web", "chat"):
        assert kinds.count(kind) >= 20
    assert set(kinds) == {"news", "web", "chat"}


def test_builtin_ids_unique_and_texts_nonempty():
    rows = _builtin_rows()
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(r["id"].startswith(r["kind"] + "-") for r in rows)
    assert all(isinstance(r["text"], str) and r["text"].strip() for r in rows)


def test_builtin_lengths_match_their_kind():
    for row in _builtin_rows():
        words = len(row["text"].split())
        if row["kind"] == "chat":
            assert words < 80, row["id"]
        else:
            assert 120 <= words <= 250, (row["id"], words)


def test_builtin_is_interleaved():
    kinds = [r["kind"] for r in _builtin_rows()]
    for i in range(0, len(kinds) - 2, 3):
        assert set(kinds[i:i + 3]) == {"news", "web", "chat"}, i
    assert set(kinds[:10]) == {"news", "web", "chat"}


def test_builtin_is_the_default_via_load_texts():
    texts = load_texts("builtin", 0, 6)
    assert [k for k, _ in texts] == ["news", "web", "chat"] * 2


# --- load_prompts on the built-in set ----------------------------------------------------------------


def test_load_prompts_builtin_truncates_plain_text(tiny_tokenizer):
    prompts = load_prompts("builtin", tiny_tokenizer, 0, 6, prompt_len=32)
    assert [p.index for p in prompts] == list(range(6))
    assert all(isinstance(p, Prompt) for p in prompts)
    for p in prompts:
        assert 0 < len(p.ids) <= 32
        if p.kind != "chat":
            assert len(p.ids) == 32  # articles are far longer than 32 tokens


def test_chat_prompt_goes_through_template(tiny_tokenizer):
    (prompt,) = load_prompts("builtin", tiny_tokenizer, 2, 3, prompt_len=512)
    assert prompt.kind == "chat"
    tokens = tiny_tokenizer.convert_ids_to_tokens(prompt.ids)
    assert tokens[0] == "<|user|>"
    assert tokens[-1] == "<|assistant|>"


def test_long_chat_prompt_keeps_template_tail(tiny_tokenizer, tmp_path):
    text = " ".join(["the city"] * 100)
    path = _write(tmp_path / "p.jsonl", json.dumps({"kind": "chat", "text": text}) + "\n")
    (prompt,) = load_prompts(path, tiny_tokenizer, 0, 1, prompt_len=20)
    assert len(prompt.ids) <= 20
    tokens = tiny_tokenizer.convert_ids_to_tokens(prompt.ids)
    assert tokens[0] == "<|user|>" and tokens[-2:] == ["<eos>", "<|assistant|>"]
    assert text.startswith(prompt.text) and len(prompt.text) < len(text)


def test_chat_prompt_len_too_short_for_template(tiny_tokenizer, tmp_path):
    path = _write(tmp_path / "p.jsonl", json.dumps({"kind": "chat", "text": "the city " * 20}) + "\n")
    with pytest.raises(UserError, match="too short for the chat template"):
        load_prompts(path, tiny_tokenizer, 0, 1, prompt_len=3)


def test_chat_without_template_is_plain_text(tiny_tokenizer, tmp_path):
    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer,
                                         unk_token="<unk>", eos_token="<eos>")
    tokenizer.chat_template = None
    path = _write(tmp_path / "p.jsonl", json.dumps({"kind": "chat", "text": "explain the weather"}) + "\n")
    (prompt,) = load_prompts(path, tokenizer, 0, 1, prompt_len=16)
    assert prompt.kind == data.PLAIN_CHAT_KIND
    assert prompt.ids == tokenizer("explain the weather")["input_ids"]


# --- local files -------------------------------------------------------------------------------------


def test_jsonl_fields_and_default_kinds(tiny_tokenizer, tmp_path):
    lines = [{"text": "the city"}, {"article": "the court"}, {"prompt": "explain the game"},
             {"instruction": "write code"}, {"content": "the team", "kind": "news"}]
    path = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert load_texts(path) == [("text", "the city"), ("text", "the court"), ("chat", "explain the game"),
                                ("chat", "write code"), ("news", "the team")]
    prompts = load_prompts(path, tiny_tokenizer, 0, 5, prompt_len=64)
    assert [p.kind for p in prompts] == ["text", "text", "chat", "chat", "news"]


def test_json_list_and_wrapped_object(tmp_path):
    rows = [{"text": "one"}, {"text": "two"}]
    a = _write(tmp_path / "a.json", json.dumps(rows))
    b = _write(tmp_path / "b.json", json.dumps({"data": rows}))
    c = _write(tmp_path / "c.json", json.dumps({"rows": rows}))
    for path in (a, b, c):
        assert load_texts(path) == [("text", "one"), ("text", "two")]


def test_json_without_rows_is_user_error(tmp_path):
    path = _write(tmp_path / "x.json", json.dumps({"items": []}))
    with pytest.raises(UserError, match="no text field"):
        load_texts(path)


def test_bad_jsonl_names_the_line(tmp_path):
    path = _write(tmp_path / "x.jsonl", '{"text": "ok"}\n{not json\n')
    with pytest.raises(UserError, match=r"x\.jsonl .*row 1"):
        load_texts(path)


def test_row_without_text_field(tmp_path):
    path = _write(tmp_path / "x.jsonl", json.dumps({"title": "no text here"}) + "\n")
    with pytest.raises(UserError, match="no text field"):
        load_texts(path)


def test_txt_paragraphs(tmp_path):
    path = _write(tmp_path / "p.txt", "first line\nstill first\n\n\nsecond\n\nthird\n")
    assert load_texts(path) == [("text", "first line\nstill first"), ("text", "second"), ("text", "third")]


def test_txt_lines_when_no_blank_lines(tmp_path):
    path = _write(tmp_path / "p.txt", "one\ntwo\nthree\n")
    assert [t for _, t in load_texts(path)] == ["one", "two", "three"]


def test_input_tokens_used_directly(tiny_tokenizer, tmp_path):
    lines = [{"input_tokens": [[5, 6, 7, 8, 9]]}, {"input_tokens": [10, 11, 12]}]
    path = _write(tmp_path / "t.jsonl", "\n".join(json.dumps(x) for x in lines))
    prompts = load_prompts(path, tiny_tokenizer, 0, 2, prompt_len=4, dataset_tokenizer=tiny_tokenizer)
    assert [p.ids for p in prompts] == [[5, 6, 7, 8], [10, 11, 12]]
    assert all(p.kind == data.TOKENS_KIND for p in prompts)
    with pytest.raises(UserError, match="pre-tokenized"):
        load_texts(path)


def test_bad_input_tokens(tiny_tokenizer, tmp_path):
    path = _write(tmp_path / "t.jsonl", json.dumps({"input_tokens": [[1, 2], [3]]}) + "\n")
    with pytest.raises(UserError, match="input_tokens"):
        load_prompts(path, tiny_tokenizer, 0, 1, prompt_len=4)


def test_empty_prompt_names_the_row(tiny_tokenizer, tmp_path):
    path = _write(tmp_path / "e.jsonl", json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(UserError, match="row 1"):
        load_prompts(path, tiny_tokenizer, 0, 2, prompt_len=8)
    path = _write(tmp_path / "t.jsonl", json.dumps({"input_tokens": []}) + "\n")
    with pytest.raises(UserError, match="row 0 is empty"):
        load_prompts(path, tiny_tokenizer, 0, 1, prompt_len=8, dataset_tokenizer=tiny_tokenizer)


def test_unsupported_extension(tmp_path):
    path = _write(tmp_path / "p.xlsx", "a,b\n")
    with pytest.raises(UserError, match="unsupported file type"):
        load_texts(path)


def test_save_to_disk_folder(tiny_tokenizer, tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"article": ["the city", "the court", "the team"]}).save_to_disk(str(folder))
    prompts = load_prompts(str(folder), tiny_tokenizer, 1, 10, prompt_len=8)
    assert [(p.index, p.text) for p in prompts] == [(1, "the court"), (2, "the team")]


def test_without_datasets_the_error_says_it_is_a_requirement(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="a requirement of this suite: pip install -r requirements.txt"):
        load_texts(str(tmp_path))


# --- slicing and errors ----------------------------------------------------------------------------------


def test_end_past_rows_is_clipped(tiny_tokenizer, tmp_path):
    path = _write(tmp_path / "p.txt", "a\nb\nc\n")
    prompts = load_prompts(path, tiny_tokenizer, 1, 100, prompt_len=8)
    assert [p.index for p in prompts] == [1, 2]


@pytest.mark.parametrize("start,end,message", [
    (-1, 3, "must be >= 0"),
    (2, 2, "must be less than --end"),
    (3, 1, "must be less than --end"),
    (3, 10, "has 3 rows"),
])
def test_bad_ranges(tiny_tokenizer, tmp_path, start, end, message):
    path = _write(tmp_path / "p.txt", "a\nb\nc\n")
    with pytest.raises(UserError, match=message):
        load_prompts(path, tiny_tokenizer, start, end, prompt_len=8)


def test_builtin_start_past_end_reports_row_count(tiny_tokenizer):
    n = len(_builtin_rows())
    with pytest.raises(UserError, match=f"has {n} rows"):
        load_prompts("builtin", tiny_tokenizer, n, n + 5, prompt_len=8)


def test_bad_prompt_len(tiny_tokenizer):
    with pytest.raises(UserError, match="prompt-len"):
        load_prompts("builtin", tiny_tokenizer, 0, 1, prompt_len=0)


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(UserError) as info:
        load_texts(str(tmp_path / "nope"))
    message = str(info.value)
    for name in ("builtin", "cnn", "openwebtext", "c4", "mtbench"):
        assert name in message
    assert "\n" not in message


@pytest.mark.parametrize("name", sorted(data.HUB_DATASETS))
def test_hub_name_with_the_hub_unreachable_fails_fast(name, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    for variable in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    began = time.monotonic()
    with pytest.raises(UserError) as info:
        load_texts(name, 0, 4)
    assert time.monotonic() - began < 2.0
    message = str(info.value)
    assert "unreachable" in message and "--dataset builtin" in message and "save_to_disk" in message
    assert "\n" not in message


def test_hub_offline_mode_fails_fast(monkeypatch):
    """With HF_HUB_OFFLINE set, `datasets` is never asked for a hub dataset."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset must not be called"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline"):
        load_texts("cnn", 0, 4)


def test_default_kind_is_the_one_chat_rule():
    assert data.default_kind("prompt") == data.CHAT_KIND
    assert data.default_kind("instruction") == data.CHAT_KIND
    assert data.default_kind("text") == data.PLAIN_KIND
    assert data.default_kind("article") == data.PLAIN_KIND


def test_hub_rows_with_faked_hub(monkeypatch):
    """mtbench keeps only the first turn and is chat; cnn reads `article` as news (no network: all faked)."""
    import datasets

    tables = {"HuggingFaceH4/mt_bench_prompts": [{"prompt": ["turn one", "turn two"]}],
              "cnn_dailymail": [{"article": "a story", "highlights": "x"}] * 3}
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, config, split, streaming: datasets.Dataset.from_list(tables[path]))
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    assert load_texts("mtbench", 0, 5) == [("chat", "turn one")]
    assert load_texts("cnn", 1) == [("news", "a story")] * 2
