"""Where prompt rows come from: every local format and the hub, read through `datasets`.

A source is a sequence of plain row objects (dicts); what a row means (which field is the text, chat or plain,
turns, pre-tokenized ids) is decided in utils/data.py. Local files are streamed (nothing is written to the
`datasets` cache and only rows up to the end asked for are parsed); `save_to_disk` folders are memory-mapped.

Every failure a user can cause raises `UserError` with a one-line message.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import hub
from utils.errors import UserError, first_line

# File suffix -> `datasets` packaged builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
            ".arrow": "arrow"}
LOCAL_HINT = (f"use --dataset builtin, a local file ({', '.join(sorted(BUILDERS))}) "
              "or a save_to_disk folder")
# A .json file holding one object that wraps the rows (SQuAD-style) names them with one of these keys.
WRAPPER_KEYS = ("data", "rows")


@dataclass(frozen=True)
class HubDataset:
    """Where a hub name points; large corpora are streamed so only the rows asked for are fetched."""

    path: str
    config: str | None
    split: str
    field: str
    kind: str
    streaming: bool = False


@dataclass(frozen=True)
class Source:
    """Rows of one dataset. `field`/`kind`, when set, are what a hub name fixes for every row."""

    name: str
    rows: Sequence[Mapping[str, Any]]
    field: str | None = None
    kind: str | None = None


def import_datasets() -> Any:
    """The `datasets` package (a requirement), with its progress bars and log lines off: the suite reports
    failures as one line of its own."""
    try:
        import datasets
    except ImportError as exc:
        raise UserError("reading datasets needs the datasets package, a requirement of this suite: "
                        "pip install -r requirements.txt") from exc
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    return datasets


def root_cause(exc: BaseException) -> str:
    """The first line of the exception a failure was raised from: `datasets` wraps parse errors in generic ones
    (`raise ... from`); implicit context (a fallback parser's own complaint) is not followed."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return first_line(exc)


def _stream(datasets: Any, builder: str, path: Path, end: int | None, **options: Any) -> list[dict]:
    """The first `end` rows (all when None) of a local file, streamed through a packaged builder."""
    try:
        stream = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **options)
        return list(stream if end is None else stream.take(end))
    except Exception as exc:  # noqa: BLE001  (pyarrow, pandas and datasets raise many types for a bad file)
        raise UserError(f"cannot read {path} as {builder} ({root_cause(exc)})") from exc


def _unwrapped_json(datasets: Any, path: Path, rows: list[dict], end: int | None) -> list[dict]:
    """A .json file that is one object wrapping a list of rows ({"data": [...]}) read as those rows."""
    if len(rows) == 1 and len(rows[0]) == 1:
        (key, value), = rows[0].items()
        if key in WRAPPER_KEYS and isinstance(value, list):
            return _stream(datasets, "json", path, end, field=key)
    return rows


def _text_rows(datasets: Any, path: Path, end: int | None) -> list[dict]:
    """A .txt file: one prompt per paragraph (blocks separated by blank lines); with no blank line, per line."""
    lines = _stream(datasets, "text", path, None)
    if all(row["text"].strip() for row in lines):
        return lines if end is None else lines[:end]
    paragraphs = [{"text": row["text"].strip()} for row in _stream(datasets, "text", path, None, sample_by="paragraph")]
    paragraphs = [row for row in paragraphs if row["text"]]
    return paragraphs if end is None else paragraphs[:end]


def read_file(path: Path, end: int | None) -> Source:
    """Rows [0, end) of a local file in any format of BUILDERS."""
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(sorted(BUILDERS))}, "
                        "or a save_to_disk folder)")
    datasets = import_datasets()
    if builder == "text":
        return Source(str(path), _text_rows(datasets, path, end))
    rows = _stream(datasets, builder, path, end)
    if builder == "json":
        rows = _unwrapped_json(datasets, path, rows, end)
    return Source(str(path), rows)


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


def read_saved_folder(path: Path) -> Source:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, read lazily."""
    datasets = import_datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path} is not a folder written by datasets' save_to_disk ({root_cause(exc)})") from exc
    return Source(str(path), _pick_split(ds, str(path)))


def read_hub(name: str, spec: HubDataset, end: int | None) -> Source:
    """Rows of a hub dataset; a streamed one yields only its first `end` rows (so `end` is required). The hub
    is asked once, in seconds (utils.hub), before `datasets` would spend a minute retrying it."""
    if spec.streaming and end is None:
        raise UserError(f"dataset '{name}' is streamed from the hub: give an end row")
    datasets = import_datasets()
    if not hub.hub_reachable():
        raise UserError(f"dataset '{name}' is on the Hugging Face hub, which is unreachable ({hub.why_unreachable()}); "
                        f"{LOCAL_HINT}")
    try:
        ds = datasets.load_dataset(spec.path, spec.config, split=spec.split, streaming=spec.streaming)
        rows = list(ds.take(end)) if spec.streaming else ds
    except Exception as exc:  # noqa: BLE001  (datasets raises many types for hub and cache failures)
        raise UserError(f"cannot load dataset '{name}' from the hub ({root_cause(exc)}); {LOCAL_HINT}") from exc
    return Source(name, rows, spec.field, spec.kind)
