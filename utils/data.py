"""Prompt sets: the built-in set, local files, `save_to_disk` folders and a few hub datasets.

A `--dataset` value is resolved in this order:
  1. `builtin` (the default): prompts/builtin.jsonl, written for this suite, so benchmarks run offline;
  2. a hub name from `HUB_DATASETS` (cnn, openwebtext, c4, mtbench), loaded through the optional
     `datasets` package, imported only here and only when needed;
  3. an existing path: .json, .jsonl, .txt, or a folder written by `datasets.save_to_disk`.
A local file or folder that happens to share a hub name can still be used as ./NAME.

Every failure a user can cause raises `UserError` with a one-line message (scripts exit with status 2).
"""
from __future__ import annotations

import importlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import UserError, first_line

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILTIN_NAME = "builtin"
BUILTIN_PATH = REPO_ROOT / "prompts" / "builtin.jsonl"

CHAT_KIND = "chat"              # text that goes through the tokenizer's chat template
PLAIN_KIND = "text"             # plain text from a file that does not say what it is
PLAIN_CHAT_KIND = "chat-plain"  # a chat row used as plain text because the tokenizer has no template
TOKENS_KIND = "tokens"          # a pre-tokenized row (`input_tokens`), used as ids directly

# Text fields tried in this order; the first present in a row wins.
TEXT_FIELDS = ("text", "article", "prompt", "instruction", "content")
# Fields that hold a request to a chat model rather than text to continue.
CHAT_FIELDS = frozenset({"prompt", "instruction"})
TOKENS_FIELD = "input_tokens"
LOCAL_HINT = "use --dataset builtin or a local .json/.jsonl/.txt file or a save_to_disk folder"
HUB_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Prompt:
    """One tokenized prompt; `index` is its row in the dataset, so results can be traced back to it.

    kind "chat" means `text` was sent through the tokenizer's chat template with add_generation_prompt=True,
    so `ids` end with the template's assistant header.
    """

    index: int
    kind: str
    text: str
    ids: list[int]


@dataclass(frozen=True)
class HubDataset:
    """Where a hub name points; large corpora are streamed so only the rows asked for are fetched."""

    path: str
    config: str | None
    split: str
    field: str
    kind: str
    streaming: bool = False


HUB_DATASETS: dict[str, HubDataset] = {
    "cnn": HubDataset("cnn_dailymail", "3.0.0", "test", "article", "news"),
    # openwebtext's train split is ~40 GB: stream it instead of downloading it whole.
    "openwebtext": HubDataset("Skylion007/openwebtext", None, "train", "text", "web", streaming=True),
    "c4": HubDataset("allenai/c4", "en", "validation", "text", "web", streaming=True),
    "mtbench": HubDataset("HuggingFaceH4/mt_bench_prompts", None, "train", "prompt", CHAT_KIND),
}


@dataclass(frozen=True)
class _Row:
    """A dataset row before tokenization: text, or ids from a pre-tokenized file."""

    kind: str
    text: str
    ids: tuple[int, ...] | None = None


# ---------------------------------------------------------------------------------------------------------
# Kinds


def default_kind(field: str) -> str:
    """The kind of a row that does not name one: requests (prompt/instruction) are chat, the rest plain.

    This is the only place that decides whether an unlabelled row is a chat request.
    """
    return CHAT_KIND if field in CHAT_FIELDS else PLAIN_KIND


def is_chat(kind: str) -> bool:
    return kind == CHAT_KIND


# ---------------------------------------------------------------------------------------------------------
# Rows from objects (json, jsonl, save_to_disk, hub)


def _as_text(value: Any, where: str) -> str:
    """A text field's value; a list of strings is a multi-turn conversation and its first turn is used."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[0]
    if not isinstance(value, str):
        raise UserError(f"{where}: the text field must be a string, got {type(value).__name__}")
    return value


def _as_ids(value: Any, where: str) -> tuple[int, ...]:
    """`input_tokens` as the original project stored them: [ids] or [[ids]] (a batch of one)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"{where}: {TOKENS_FIELD} must be a list of ints or [[ints]]")
    return tuple(value)


def _explicit_kind(obj: Mapping[str, Any], where: str) -> str | None:
    kind = obj.get("kind")
    if kind is None:
        return None
    if not isinstance(kind, str) or not kind:
        raise UserError(f"{where}: 'kind' must be a non-empty string")
    return kind


def _row_from_object(obj: Any, where: str, kind: str | None = None, field: str | None = None) -> _Row:
    """One row from a json object (or a bare string); `kind`/`field` are forced by hub datasets."""
    if isinstance(obj, str):
        return _Row(kind or PLAIN_KIND, obj)
    if not isinstance(obj, Mapping):
        raise UserError(f"{where}: expected an object with a text field, got {type(obj).__name__}")
    if field is None and TOKENS_FIELD in obj and obj[TOKENS_FIELD] is not None:
        ids = _as_ids(obj[TOKENS_FIELD], where)
        text = obj.get("text") if isinstance(obj.get("text"), str) else ""
        return _Row(_explicit_kind(obj, where) or TOKENS_KIND, text, ids)
    fields = (field,) if field is not None else TEXT_FIELDS
    found = next((f for f in fields if f in obj and obj[f] is not None), None)
    if found is None:
        raise UserError(f"{where}: no text field (tried {', '.join(fields)}) and no {TOKENS_FIELD}")
    text = _as_text(obj[found], where)
    return _Row(kind or _explicit_kind(obj, where) or default_kind(found), text)


# ---------------------------------------------------------------------------------------------------------
# Local files


def _read_jsonl(path: Path) -> list[_Row]:
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        rows.append(_row_from_object(obj, f"{path}:{lineno}"))
    return rows


def _read_json(path: Path) -> list[_Row]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, Mapping):
        key = next((k for k in ("data", "rows") if isinstance(data.get(k), list)), None)
        if key is None:
            raise UserError(f"{path}: expected a list of rows, or an object with a 'data' or 'rows' list")
        data = data[key]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of rows, got {type(data).__name__}")
    return [_row_from_object(obj, f"{path} row {i}") for i, obj in enumerate(data)]


def _read_txt(path: Path) -> list[_Row]:
    """One prompt per paragraph (blocks separated by blank lines); a file with no blank line: one per line."""
    lines = _read_text(path).strip().splitlines()
    if any(not line.strip() for line in lines):
        blocks, current = [], []
        for line in lines + [""]:
            if line.strip():
                current.append(line.rstrip())
            elif current:
                blocks.append("\n".join(current))
                current = []
    else:
        blocks = [line.rstrip() for line in lines]
    return [_Row(PLAIN_KIND, block) for block in blocks]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# `datasets`: save_to_disk folders and the hub


def _import_datasets(what: str) -> Any:
    """The optional `datasets` package, imported on first need so the suite runs without it."""
    try:
        return importlib.import_module("datasets")
    except ImportError as exc:
        raise UserError(f"{what} needs the datasets package (pip install datasets); "
                        f"otherwise {LOCAL_HINT}") from exc


class _HFTable(Sequence):
    """A `datasets.Dataset` seen as a sequence of `_Row`s, converted only when read."""

    def __init__(self, ds: Any, name: str, kind: str | None = None, field: str | None = None) -> None:
        self.ds, self.name, self.kind, self.field = ds, name, kind, field

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> _Row:  # type: ignore[override]
        return _row_from_object(self.ds[i], f"{self.name} row {i}", self.kind, self.field)


def _pick_split(ds: Any, name: str) -> Any:
    """A DatasetDict's evaluation split if it has one (test, then validation), else train, else the first."""
    if not hasattr(ds, "keys"):
        return ds
    splits = list(ds.keys())
    if not splits:
        raise UserError(f"{name} holds no splits")
    for split in ("test", "validation", "train"):
        if split in splits:
            return ds[split]
    return ds[splits[0]]


def _read_saved_folder(path: Path) -> Sequence[_Row]:
    datasets = _import_datasets(f"reading the folder {path}")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise UserError(f"{path} is not a folder written by datasets' save_to_disk "
                        f"({first_line(exc)})") from exc
    return _HFTable(_pick_split(ds, str(path)), str(path))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _check_hub_reachable(spec: HubDataset, name: str) -> None:
    """Fail within seconds on an offline machine, instead of waiting on `datasets`' own retries."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        raise UserError(f"dataset '{name}' is on the Hugging Face hub but offline mode is set; {LOCAL_HINT}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/api/datasets/{spec.path}", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the hub answered; `datasets` reports what it thinks of the request
    except (OSError, ValueError) as exc:
        raise UserError(f"dataset '{name}' needs the Hugging Face hub, which is unreachable; {LOCAL_HINT}") from exc


def _read_hub(name: str, end: int | None) -> Sequence[_Row]:
    """Rows of a hub dataset; a streamed one yields only its first `end` rows (so `end` is required)."""
    spec = HUB_DATASETS[name]
    datasets = _import_datasets(f"dataset '{name}'")
    if spec.streaming and end is None:
        raise UserError(f"dataset '{name}' is streamed from the hub: give an end row")
    _check_hub_reachable(spec, name)
    try:
        ds = datasets.load_dataset(spec.path, spec.config, split=spec.split, streaming=spec.streaming)
        if spec.streaming:
            objs = list(ds.take(end))
            return [_row_from_object(obj, f"{name} row {i}", spec.kind, spec.field) for i, obj in enumerate(objs)]
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (datasets raises many types for hub and cache failures)
        first = first_line(exc)
        raise UserError(f"cannot load dataset '{name}' from the hub ({first}); {LOCAL_HINT}") from exc
    return _HFTable(ds, name, spec.kind, spec.field)


# ---------------------------------------------------------------------------------------------------------
# Resolution and slicing

_READERS: dict[str, Callable[[Path], Sequence[_Row]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".txt": _read_txt,
}


def _valid_names() -> str:
    return ", ".join([BUILTIN_NAME, *HUB_DATASETS])


def _open_rows(dataset: str, end: int | None) -> Sequence[_Row]:
    """All rows of `dataset` (for a streamed hub dataset, its first `end`), as a lazily converted sequence."""
    if dataset == BUILTIN_NAME:
        if not BUILTIN_PATH.is_file():
            raise UserError(f"the built-in prompt set {BUILTIN_PATH} is missing from this checkout")
        return _read_jsonl(BUILTIN_PATH)
    if dataset in HUB_DATASETS:
        return _read_hub(dataset, end)
    path = Path(dataset).expanduser()
    if path.is_dir():
        return _read_saved_folder(path)
    if path.is_file():
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise UserError(f"{dataset}: unsupported file type '{path.suffix}' (use .json, .jsonl or .txt)")
        return reader(path)
    raise UserError(f"unknown dataset '{dataset}': not a file or folder, and not one of {_valid_names()}")


def _check_range(start: int, end: int | None) -> None:
    if start < 0:
        raise UserError(f"--start must be >= 0, got {start}")
    if end is not None and start >= end:
        raise UserError(f"--start ({start}) must be less than --end ({end})")


def _select_rows(dataset: str, start: int, end: int | None) -> list[tuple[int, _Row]]:
    """Rows [start, end) with their indices; `end` past the last row is clipped."""
    _check_range(start, end)
    rows = _open_rows(dataset, end)
    if start >= len(rows):
        raise UserError(f"--start ({start}) is past the end of dataset '{dataset}', which has {len(rows)} rows")
    stop = len(rows) if end is None else min(end, len(rows))
    return [(i, rows[i]) for i in range(start, stop)]


def load_texts(dataset: str, start: int = 0, end: int | None = None) -> list[tuple[str, str]]:
    """(kind, text) for rows [start, end) of `dataset`, untokenized: shared by prompts and draft pretraining."""
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


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
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


def _encode_row(tokenizer: Any, row: _Row, prompt_len: int, where: str) -> tuple[str, str, list[int]]:
    """(kind, text, ids) for one row; a chat row without a template on the tokenizer becomes plain text."""
    if row.ids is not None:
        return row.kind, row.text, list(row.ids[:prompt_len])
    if is_chat(row.kind):
        if _has_chat_template(tokenizer):
            text, ids = _truncated_chat(tokenizer, row.text, prompt_len, where)
            return row.kind, text, ids
        return PLAIN_CHAT_KIND, row.text, _text_ids(tokenizer, row.text, add_special_tokens=True)[:prompt_len]
    return row.kind, row.text, _text_ids(tokenizer, row.text, add_special_tokens=True)[:prompt_len]


def load_prompts(dataset: str, tokenizer: Any, start: int, end: int, prompt_len: int) -> list[Prompt]:
    """Rows [start, end) of `dataset`, tokenized for `tokenizer`.

    Plain text keeps its first `prompt_len` tokens (the original project used the first 128 tokens of each
    article). Chat rows go through the chat template with add_generation_prompt=True; when too long, the
    user text is shortened so the template's tail (the assistant header) survives. Pre-tokenized rows are
    cut to `prompt_len`. A row that tokenizes to nothing is an error, not silently dropped, so row indices
    in results always match the dataset.
    """
    if prompt_len <= 0:
        raise UserError(f"--prompt-len must be positive, got {prompt_len}")
    prompts = []
    for index, row in _select_rows(dataset, start, end):
        where = f"dataset '{dataset}' row {index}"
        if row.ids is None and not row.text.strip():
            raise UserError(f"{where} is empty")
        kind, text, ids = _encode_row(tokenizer, row, prompt_len, where)
        if not ids:
            raise UserError(f"{where} is empty after tokenization")
        prompts.append(Prompt(index=index, kind=kind, text=text, ids=ids))
    return prompts
