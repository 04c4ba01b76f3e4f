"""Prompt sets: the suite's rules on top of the rows utils/data_sources.py reads through `datasets`.

A `--dataset` value is resolved in this order:
  1. `builtin` (the default): prompts/builtin.jsonl, written for this suite, so benchmarks run offline;
  2. a hub name from `HUB_DATASETS` (cnn, openwebtext, c4, mtbench), when the hub is reachable;
  3. an existing path: .json (a JSON array or JSON lines), .jsonl, .csv, .parquet, .txt, .arrow, or a folder
     written by `datasets.save_to_disk`.
A local file or folder that happens to share a hub name can still be used as ./NAME.

The rules kept here: which field holds the text, chat or plain text, multi-turn rows (`turns`: the first user
turn, or every turn with the model's own answers in between), pre-tokenized rows (`input_tokens`, or
`input_ids` + `attention_mask` as the original's converted c4/cnn/openwebtext folders hold them; used as ids only
for the tokenizer that made them), the [start, end) slice and prompt truncation.
Every failure a user can cause raises `UserError` with a one-line message (scripts exit with status 2).
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from utils.data_sources import HubDataset, Source, read_file, read_hub, read_saved_folder
from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILTIN_NAME = "builtin"
BUILTIN_PATH = REPO_ROOT / "prompts" / "builtin.jsonl"

CHAT_KIND = "chat"              # text that goes through the tokenizer's chat template
PLAIN_KIND = "text"             # plain text from a file that does not say what it is
PLAIN_CHAT_KIND = "chat-plain"  # a chat row used as plain text because the tokenizer has no template
TOKENS_KIND = "tokens"          # a pre-tokenized row (`input_tokens`/`input_ids`) made with the target's tokenizer

# Text fields tried in this order; the first present in a row wins. A list of strings is a conversation's user
# turns (MT-bench's question.jsonl has `turns`; its hub copy calls them `prompt`).
TEXT_FIELDS = ("text", "article", "prompt", "instruction", "content", "turns", "conversations")
# Fields that hold a request to a chat model rather than text to continue.
CHAT_FIELDS = frozenset({"prompt", "instruction", "turns", "conversations"})
# ShareGPT / LLaVA-Instruct rows: `conversations` is [{"from": "human" | "gpt", "value": ...}, ...] (EAGLE's
# training data is in this format); the user turns are asked, the recorded answers are not used.
CONVERSATION_FIELD = "conversations"
USER_SPEAKERS = frozenset({"human", "user"})
IMAGE_PLACEHOLDER = "<image>"   # LLaVA-Instruct marks the image's place; a text model gets the question alone
TOKENS_FIELD = "input_tokens"  # the original's c4_small.json; taken before any text field
# `datasets` rows of a tokenizer's output (the original's converted c4, cnn_dailymail and openwebtext folders):
# taken when the row has no text field; `attention_mask` zeros (padding) are dropped.
IDS_FIELD, MASK_FIELD = "input_ids", "attention_mask"
TURNS = ("first", "all")


@dataclass(frozen=True)
class Prompt:
    """One tokenized prompt; `index` is its row in the dataset, so results can be traced back to it.

    kind "chat" means `text` was sent through the tokenizer's chat template with add_generation_prompt=True,
    so `ids` end with the template's assistant header. A multi-turn row run with --turns all carries the user
    turns still to ask (`later_turns`, each already cut to the prompt length) and, from its second turn on, the
    conversation before this turn's text (`history`: (role, text) pairs); `next_turn` makes the next one.
    """

    index: int
    kind: str
    text: str
    ids: list[int]
    turn: int = 0
    later_turns: tuple[str, ...] = ()
    history: tuple[tuple[str, str], ...] = ()
    image: str | None = None      # an image prompt's file (utils/llava/): `ids` hold its expanded placeholder
    pixel_values: Any = field(default=None, compare=False, repr=False)  # the image processor's output for it


HUB_DATASETS: dict[str, HubDataset] = {
    "cnn": HubDataset("cnn_dailymail", "3.0.0", "test", "article", "news"),
    # openwebtext's train split is ~40 GB: stream it instead of downloading it whole.
    "openwebtext": HubDataset("Skylion007/openwebtext", None, "train", "text", "web", streaming=True),
    "c4": HubDataset("allenai/c4", "en", "validation", "text", "web", streaming=True),
    # MT-bench's 80 questions, two user turns each (the hub copy of question.jsonl, `turns` renamed `prompt`).
    "mtbench": HubDataset("HuggingFaceH4/mt_bench_prompts", None, "train", "prompt", CHAT_KIND),
}


@dataclass(frozen=True)
class _Row:
    """A dataset row before tokenization: its user turns (one for plain text), or ids of a pre-tokenized row."""

    kind: str
    turns: tuple[str, ...]
    ids: tuple[int, ...] | None = None
    ids_field: str = TOKENS_FIELD  # where a pre-tokenized row's ids came from, for messages

    @property
    def text(self) -> str:
        return self.turns[0] if self.turns else ""


# ---------------------------------------------------------------------------------------------------------
# Kinds


def default_kind(field: str) -> str:
    """The kind of a row that does not name one: requests (prompt/instruction/turns) are chat, the rest plain.

    This is the only place that decides whether an unlabelled row is a chat request.
    """
    return CHAT_KIND if field in CHAT_FIELDS else PLAIN_KIND


def is_chat(kind: str) -> bool:
    return kind == CHAT_KIND


# ---------------------------------------------------------------------------------------------------------
# Rows from objects (every format arrives as dicts from utils/data_sources.py)


def _as_turns(value: Any, where: str) -> tuple[str, ...]:
    """A text field's value: a string, or a list of strings (a conversation's user turns)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UserError(f"{where}: the text field must be a string or a list of strings, got {type(value).__name__}")


def _conversation_turns(value: Any, where: str) -> tuple[str, ...]:
    """The user turns of a ShareGPT/LLaVA-Instruct `conversations` list, LLaVA's image placeholder removed."""
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise UserError(f"{where}: {CONVERSATION_FIELD} must be a list of {{from, value}} objects")
    asked = [t.get("value") for t in value if t.get("from") in USER_SPEAKERS]
    if not all(isinstance(text, str) for text in asked):
        raise UserError(f"{where}: a 'human' or 'user' turn of {CONVERSATION_FIELD} has a 'value' that is not a string")
    # a turn that was only the image placeholder asks nothing of a text model: dropped
    turns = tuple(text for text in (text.replace(IMAGE_PLACEHOLDER, "").strip() for text in asked) if text)
    if not turns:
        raise UserError(f"{where}: {CONVERSATION_FIELD} has no non-empty turn from 'human' or 'user'")
    return turns


def _as_ids(value: Any, where: str, name: str = TOKENS_FIELD) -> tuple[int, ...]:
    """Pre-tokenized ids as the original project stored them: [ids] or [[ids]] (a batch of one)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"{where}: {name} must be a list of ints or [[ints]]")
    return tuple(value)


def _unpadded_ids(obj: Mapping[str, Any], where: str) -> tuple[int, ...]:
    """A tokenizer output row's `input_ids` without the positions its `attention_mask` marks as padding."""
    ids = _as_ids(obj[IDS_FIELD], where, IDS_FIELD)
    if obj.get(MASK_FIELD) is None:
        return ids
    mask = _as_ids(obj[MASK_FIELD], where, MASK_FIELD)
    if len(mask) != len(ids):
        raise UserError(f"{where}: {MASK_FIELD} has {len(mask)} entries for {len(ids)} {IDS_FIELD}")
    return tuple(i for i, keep in zip(ids, mask) if keep)


def _explicit_kind(obj: Mapping[str, Any], where: str) -> str | None:
    kind = obj.get("kind")
    if kind is None:
        return None
    if not isinstance(kind, str) or not kind:
        raise UserError(f"{where}: 'kind' must be a non-empty string")
    return kind


def _row_from_object(obj: Any, where: str, kind: str | None = None, field: str | None = None) -> _Row:
    """One row from a dict (or a bare string); `kind`/`field` are forced by hub datasets."""
    if isinstance(obj, str):
        return _Row(kind or PLAIN_KIND, (obj,))
    if not isinstance(obj, Mapping):
        raise UserError(f"{where}: expected an object with a text field, got {type(obj).__name__}")
    if field is None and obj.get(TOKENS_FIELD) is not None:
        return _Row(_explicit_kind(obj, where) or TOKENS_KIND, (), _as_ids(obj[TOKENS_FIELD], where))
    fields = (field,) if field is not None else TEXT_FIELDS
    found = next((f for f in fields if obj.get(f) is not None), None)
    if found is None and field is None and obj.get(IDS_FIELD) is not None:
        return _Row(_explicit_kind(obj, where) or TOKENS_KIND, (), _unpadded_ids(obj, where), IDS_FIELD)
    if found is None:
        raise UserError(f"{where}: no text field (tried {', '.join(fields)}) and no {TOKENS_FIELD} or {IDS_FIELD}")
    turns = (_conversation_turns if found == CONVERSATION_FIELD else _as_turns)(obj[found], where)
    return _Row(kind or _explicit_kind(obj, where) or default_kind(found), turns)


class _Rows(Sequence):
    """A `Source`'s rows seen as `_Row`s, converted only when read (a save_to_disk folder may be large)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source.rows)

    def __getitem__(self, i: int) -> _Row:  # type: ignore[override]
        return _row_from_object(self.source.rows[i], f"{self.source.name} row {i}", self.source.kind,
                                self.source.field)


# ---------------------------------------------------------------------------------------------------------
# Resolution and slicing


def _valid_names() -> str:
    return ", ".join([BUILTIN_NAME, *HUB_DATASETS])


def _open_source(dataset: str, end: int | None) -> Source:
    """The rows of `dataset` (for a file or a streamed hub dataset, only its first `end`)."""
    if dataset == BUILTIN_NAME:
        if not BUILTIN_PATH.is_file():
            raise UserError(f"the built-in prompt set {BUILTIN_PATH} is missing from this checkout")
        return read_file(BUILTIN_PATH, end)
    if dataset in HUB_DATASETS:
        return read_hub(dataset, HUB_DATASETS[dataset], end)
    path = Path(dataset).expanduser()
    if path.is_dir():
        return read_saved_folder(path)
    if path.is_file():
        return read_file(path, end)
    raise UserError(f"unknown dataset '{dataset}': not a file or folder, and not one of {_valid_names()}")


def _check_range(start: int, end: int | None) -> None:
    if start < 0:
        raise UserError(f"--start must be >= 0, got {start}")
    if end is not None and start >= end:
        raise UserError(f"--start ({start}) must be less than --end ({end})")


def _select_rows(dataset: str, start: int, end: int | None) -> list[tuple[int, _Row]]:
    """Rows [start, end) with their indices; `end` past the last row is clipped."""
    _check_range(start, end)
    rows = _Rows(_open_source(dataset, end))
    if start >= len(rows):
        raise UserError(f"--start ({start}) is past the end of dataset '{dataset}', which has {len(rows)} rows")
    stop = len(rows) if end is None else min(end, len(rows))
    return [(i, rows[i]) for i in range(start, stop)]


def load_texts(dataset: str, start: int = 0, end: int | None = None) -> list[tuple[str, str]]:
    """(kind, text) for rows [start, end) of `dataset`, untokenized (a multi-turn row: its first user turn);
    used by draft pretraining."""
    selected = _select_rows(dataset, start, end)
    for i, row in selected:
        if row.ids is not None:
            raise UserError(f"dataset '{dataset}' row {i} is pre-tokenized ({TOKENS_FIELD}) and has no text; "
                            "use a dataset with a text field")
    return [(row.kind, row.text) for _, row in selected]


# ---------------------------------------------------------------------------------------------------------
# Tokenization


def _id_list(encoded: Any) -> list[int]:
    """Token ids from whatever `apply_chat_template`/`__call__` returned: BatchEncoding, dict, list or [[ids]]."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if isinstance(encoded, list) and encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(i) for i in encoded]


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_ids(tokenizer: Any, text: str, history: tuple[tuple[str, str], ...] = ()) -> list[int]:
    """The templated conversation `history` + this user turn, ending with the assistant header."""
    messages = [{"role": role, "content": content} for role, content in history]
    messages.append({"role": "user", "content": text})
    return _id_list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def _text_ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return _id_list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _text_prefix(tokenizer: Any, text: str, n_tokens: int) -> str:
    """The part of `text` covered by its first `n_tokens` tokens (character offsets keep it verbatim)."""
    if n_tokens <= 0:
        return ""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if n_tokens >= len(offsets):
            return text
        return text[: offsets[n_tokens - 1][1]]
    ids = _text_ids(tokenizer, text, add_special_tokens=False)
    return tokenizer.decode(ids[:n_tokens], skip_special_tokens=True)


def _truncated_chat(tokenizer: Any, text: str, prompt_len: int, where: str) -> tuple[str, list[int]]:
    """Shorten the user text (never the template) until the templated prompt fits in `prompt_len` tokens.

    Tokens can merge across the text/template boundary, so the first estimate is re-checked and shrunk.
    """
    ids = _chat_ids(tokenizer, text)
    if len(ids) <= prompt_len:
        return text, ids
    n_text = len(_text_ids(tokenizer, text, add_special_tokens=False))
    overhead = len(ids) - n_text
    budget = prompt_len - overhead
    while budget > 0:
        short = _text_prefix(tokenizer, text, budget)
        ids = _chat_ids(tokenizer, short)
        if len(ids) <= prompt_len and short.strip():
            return short, ids
        budget -= max(1, len(ids) - prompt_len)
    raise UserError(f"{where}: --prompt-len {prompt_len} is too short for the chat template "
                    f"(it alone takes about {overhead} tokens)")


# ---------------------------------------------------------------------------------------------------------
# Pre-tokenized rows


def same_vocabulary(a: Any, b: Any) -> bool:
    """True when two tokenizers map every token to the same id (ids made by one are valid for the other)."""
    return a is b or a.get_vocab() == b.get_vocab()


def _pretokenized(row: _Row, tokenizer: Any, source: tuple[Any, bool] | None, prompt_len: int,
                  where: str) -> tuple[str, str, list[int]]:
    """(kind, text, ids) of an `input_tokens` row: the ids themselves when `source` (the tokenizer they were
    made with, and whether it has the target's vocabulary) says they fit, else their decoded text re-encoded
    with the target's tokenizer. A row whose tokenizer is not known stops the run: ids from another vocabulary
    are valid-looking garbage."""
    if source is None:
        raise UserError(f"{where} holds pre-tokenized ids ({row.ids_field}) and nothing says which tokenizer made "
                        "them: pass --dataset-tokenizer NAME_OR_PATH (that tokenizer; the target's own if it made "
                        "them), or use a dataset with a text field")
    made_with, fits = source
    if any(i < 0 or i >= len(made_with) for i in row.ids):
        raise UserError(f"{where}: {row.ids_field} holds ids outside the {len(made_with)}-token vocabulary of the "
                        "--dataset-tokenizer: it is not the tokenizer that made them")
    if fits:
        ids = list(row.ids[:prompt_len])
        return row.kind, tokenizer.decode(ids, skip_special_tokens=True), ids
    text = made_with.decode(list(row.ids), skip_special_tokens=True)
    return PLAIN_KIND, text, _text_ids(tokenizer, text, add_special_tokens=True)[:prompt_len]


# ---------------------------------------------------------------------------------------------------------
# Rows to prompts


def _encode_row(tokenizer: Any, row: _Row, prompt_len: int, where: str,
                source: tuple[Any, bool] | None) -> tuple[str, str, list[int]]:
    """(kind, text, ids) for one row's first turn; a chat row without a template on the tokenizer becomes
    plain text."""
    if row.ids is not None:
        return _pretokenized(row, tokenizer, source, prompt_len, where)
    if is_chat(row.kind):
        if _has_chat_template(tokenizer):
            text, ids = _truncated_chat(tokenizer, row.text, prompt_len, where)
            return row.kind, text, ids
        return PLAIN_CHAT_KIND, row.text, _text_ids(tokenizer, row.text, add_special_tokens=True)[:prompt_len]
    return row.kind, row.text, _text_ids(tokenizer, row.text, add_special_tokens=True)[:prompt_len]


def _later_turns(tokenizer: Any, row: _Row, kind: str, prompt_len: int, where: str) -> tuple[str, ...]:
    """A multi-turn row's user turns after the first, each cut as a one-turn chat prompt of `prompt_len`."""
    if len(row.turns) < 2:
        return ()
    if not is_chat(kind):
        raise UserError(f"{where} has {len(row.turns)} turns but is not a chat row with a chat template on the "
                        "tokenizer, which --turns all needs (use --turns first)")
    return tuple(_truncated_chat(tokenizer, text, prompt_len, f"{where} turn {n}")[0]
                 for n, text in enumerate(row.turns[1:], start=2))


def next_turn(tokenizer: Any, prompt: Prompt, answer_ids: list[int]) -> Prompt | None:
    """The next user turn of `prompt`'s conversation, with the model's own answer to this one (`answer_ids`,
    as decoded text) in the chat history, as MT-bench runs its second turn; None after the last turn."""
    if not prompt.later_turns:
        return None
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
    history = (*prompt.history, ("user", prompt.text), ("assistant", answer))
    text = prompt.later_turns[0]
    return replace(prompt, text=text, ids=_chat_ids(tokenizer, text, history), turn=prompt.turn + 1,
                   later_turns=prompt.later_turns[1:], history=history)


def load_prompts(dataset: str, tokenizer: Any, start: int, end: int, prompt_len: int, turns: str = TURNS[0],
                 dataset_tokenizer: Any = None) -> list[Prompt]:
    """Rows [start, end) of `dataset`, tokenized for `tokenizer`.

    Plain text keeps its first `prompt_len` tokens (the original project used the first 128 tokens of each
    article). Chat rows go through the chat template with add_generation_prompt=True; when too long, the
    user text is shortened so the template's tail (the assistant header) survives. A multi-turn row gives its
    first user turn; with turns="all" the prompt also carries the later turns (see `next_turn`). Pre-tokenized
    rows need `dataset_tokenizer` (the tokenizer that made them, loaded, or a name/path to load) and are cut to
    `prompt_len`. A row that tokenizes to nothing is an error, not silently dropped, so row indices in results
    always match the dataset.
    """
    if prompt_len <= 0:
        raise UserError(f"--prompt-len must be positive, got {prompt_len}")
    if turns not in TURNS:
        raise UserError(f"--turns must be one of {', '.join(TURNS)}, got {turns!r}")
    prompts = []
    source = None  # (dataset tokenizer, whether it has the target's vocabulary), at the first pre-tokenized row
    for index, row in _select_rows(dataset, start, end):
        where = f"dataset '{dataset}' row {index}"
        if row.ids is None and not row.text.strip():
            raise UserError(f"{where} is empty")
        if row.ids is not None and source is None and dataset_tokenizer is not None:
            from utils.models import load_tokenizer

            made_with = load_tokenizer(dataset_tokenizer) if isinstance(dataset_tokenizer, str) else dataset_tokenizer
            source = (made_with, same_vocabulary(made_with, tokenizer))
        kind, text, ids = _encode_row(tokenizer, row, prompt_len, where, source)
        if not ids:
            raise UserError(f"{where} is empty after tokenization")
        later = _later_turns(tokenizer, row, kind, prompt_len, where) if turns == "all" else ()
        prompts.append(Prompt(index=index, kind=kind, text=text, ids=ids, later_turns=later))
    return prompts


def prompts_from_args(args: argparse.Namespace, tokenizer: Any) -> list[Prompt]:
    """load_prompts with a script's flags (--dataset, --start, --end, --prompt-len, and --turns and
    --dataset-tokenizer where the script has them)."""
    return load_prompts(args.dataset, tokenizer, args.start, args.end, args.prompt_len,
                        turns=getattr(args, "turns", TURNS[0]),
                        dataset_tokenizer=getattr(args, "dataset_tokenizer", None))
