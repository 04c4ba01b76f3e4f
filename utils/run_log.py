"""Result files that survive a crash, and `--resume` (DESIGN.md, "Result files").

A run owns `<results-dir>/<script>-<timestamp>.json` (the summary) and `.jsonl` beside it (one row per
prompt, keyed by the row's prompt `index`). Each finished prompt's row is appended and flushed at once; the
summary is written atomically at the start (settings only), at the end, and on Ctrl-C or a caught error,
with `partial` true until every prompt of the range is in. `--resume PATH` reopens such a run: the settings
must match, the rows already there are kept and their prompts skipped, and the finished files are the ones an
uninterrupted run writes (rows in prompt order, the summary over all of them).

Several processes of one sweep (utils/distributed) each append to their own shard `<base>.rank<r>.jsonl`;
the main process merges the rows by prompt index, the same merge `--resume` uses for a run that stopped with
shards left on disk.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.report import atomic_write_text

IGNORED_FLAGS = ("resume", "results_dir")  # flags that may differ between a run and its resumption


def check_writable(results_dir: str) -> Path:
    """Create `results_dir` and prove a file can be written there, before any model loads."""
    folder = Path(results_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--results-dir {results_dir} is not writable ({exc.strerror or exc}): pass a folder you can "
                        "write to") from exc
    return folder


def comparable_flags(flags: dict) -> dict:
    """The settings a resumed run must share with the run it continues, as JSON would store them."""
    return {key: value for key, value in json.loads(json.dumps(flags, default=str)).items()
            if key not in IGNORED_FLAGS}


def read_rows(paths: Iterable[Path]) -> dict[int, dict]:
    """Rows of JSONL files keyed by prompt index. A last line cut short by a crash is dropped (its prompt
    runs again); a prompt found twice keeps its first row."""
    rows: dict[int, dict] = {}
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.setdefault(int(row["index"]), row)
    return rows


def ordered(rows: dict[int, dict]) -> list[dict]:
    return [rows[index] for index in sorted(rows)]


def jsonl_text(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@dataclass
class RunLog:
    """The files of one run. Picklable (paths and indices only), so the main process can hand it to others."""

    json_path: Path
    done: set[int] = field(default_factory=set)  # prompt indices whose rows an earlier session wrote

    @property
    def jsonl_path(self) -> Path:
        return self.json_path.with_suffix(".jsonl")

    def shard_path(self, rank: int) -> Path:
        return self.json_path.with_suffix(f".rank{rank}.jsonl")

    def shard_paths(self) -> list[Path]:
        return sorted(self.json_path.parent.glob(self.json_path.stem + ".rank*.jsonl"))

    def rows(self) -> dict[int, dict]:
        """Every row on disk (the run's JSONL and any process shards), keyed by prompt index."""
        return read_rows([self.jsonl_path, *self.shard_paths()])

    def writer(self, rank: int, world: int) -> RowWriter:
        """Append-only writer of this process's rows: the run's JSONL itself, or its shard among several."""
        return RowWriter(self.jsonl_path if world == 1 else self.shard_path(rank))

    def finish(self, summary: dict, rows: dict[int, dict], partial: bool, keep_shards: bool = False) -> Path:
        """Rows in prompt order and the summary, each written atomically; shards go once merged, unless other
        processes may still be appending to them (`keep_shards`: a later --resume merges them again)."""
        atomic_write_text(self.jsonl_path, jsonl_text(ordered(rows)))
        for shard in [] if keep_shards else self.shard_paths():
            shard.unlink()
        atomic_write_text(self.json_path, json.dumps({**summary, "partial": partial, "completed_prompts": len(rows)},
                                                     indent=2, default=str) + "\n")
        return self.json_path


class RowWriter:
    """Appends one JSON line per finished prompt and flushes it to disk at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)  # another machine of a sweep may not have the folder yet
        self.file = open(path, "a")
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        # flushed to the OS, which keeps it if the process dies; no fsync (3 ms a row here) against power loss
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.rows.append(row)

    def close(self) -> None:
        self.file.close()


def new_run(results_dir: str, script: str, flags: dict) -> RunLog:
    """A fresh `<script>-<timestamp>` pair of files; the summary holds the settings (partial) from the start,
    so a run killed outright can still be resumed."""
    folder = check_writable(results_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = folder / f"{script}-{stamp}"
    suffix = 1
    while base.with_suffix(".json").exists():
        base = folder / f"{script}-{stamp}-{suffix}"
        suffix += 1
    log = RunLog(base.with_suffix(".json"))
    log.finish({"script": script, "flags": flags}, {}, partial=True)
    return log


def check_resume(path: str, script: str, flags: dict) -> dict:
    """The summary of the interrupted run `path` (its .json or .jsonl) if this run may continue it (same script
    and settings), read only: called before models load, so that a wrong --resume fails at once."""
    json_path = Path(path).with_suffix(".json")
    try:
        summary = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--resume {path}: cannot read the run's summary {json_path} ({exc})") from exc
    if summary.get("script") != script:
        raise UserError(f"--resume {path} is a {summary.get('script')} run, not {script}")
    earlier, now = comparable_flags(summary.get("flags", {})), comparable_flags(flags)
    differ = sorted(key for key in earlier.keys() | now.keys() if earlier.get(key) != now.get(key))
    if differ:
        shown = ", ".join(f"{key} ({earlier.get(key)!r} then, {now.get(key)!r} now)" for key in differ[:3])
        raise UserError(f"--resume {path}: settings differ from the interrupted run: {shown}; rerun with the same "
                        "flags")
    check_writable(str(json_path.parent))
    return summary


def resume_run(path: str, script: str, flags: dict) -> RunLog:
    """Reopen an interrupted run (its .json or .jsonl): same script and settings, rows merged by prompt index."""
    summary = check_resume(path, script, flags)
    json_path = Path(path).with_suffix(".json")
    log = RunLog(json_path)
    rows = log.rows()
    log.finish({**summary, "flags": flags}, rows, partial=True)  # shards and any cut-off line merged now
    log.done = set(rows)
    return log


def open_run(results_dir: str, resume: str | None, script: str, flags: dict) -> RunLog:
    return resume_run(resume, script, flags) if resume else new_run(results_dir, script, flags)


def launched_world_size() -> int:
    """Processes a launcher started (torchrun and accelerate launch set WORLD_SIZE); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Processes:
    """What a sweep needs from its processes (utils/distributed.ProcessGroup; one process: all trivial)."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # this process's own device under a launcher; None: the --device flag

    @property
    def main(self) -> bool:
        return self.rank == 0

    def split(self, items: list) -> list:
        return items

    def share(self, value):
        """The main process's `value`, in every process."""
        return value

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated in rank order."""
        return items

    def barrier(self) -> None:
        pass


SINGLE = Processes()


def sweep(log: RunLog, items: list, index_of: Callable[[object], int],
          work: Callable[[list, Callable[[dict], None]], None], summary_of: Callable[[list[dict]], dict],
          processes: Processes = SINGLE) -> tuple[dict, list[dict]] | None:
    """Run `work(items, append_row)` on this process's share of the items not done yet, streaming rows; then
    merge every process's rows with the earlier ones by prompt index and write the finished files.

    On Ctrl-C or an error the main process writes the summary of the rows on disk, marked partial, and the
    exception goes on. Returns (summary, rows in prompt order) in the main process, None in the others.
    """
    todo = [item for item in items if index_of(item) not in log.done]
    writer = log.writer(processes.rank, processes.world)
    try:
        work(processes.split(todo), writer.append)
    except BaseException as exc:
        writer.close()
        if not processes.main:
            raise
        rows = log.rows()
        log.finish(summary_of(ordered(rows)), rows, partial=True, keep_shards=processes.world > 1)
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt(f"{len(rows)} of {len(items)} prompts kept in {log.json_path}; continue with "
                                    f"--resume {log.json_path}") from exc
        raise
    writer.close()
    gathered = processes.gather(writer.rows)
    if not processes.main:
        processes.barrier()
        return None
    rows = read_rows([log.jsonl_path])
    for row in gathered:
        rows.setdefault(int(row["index"]), row)
    summary = summary_of(ordered(rows))
    log.finish(summary, rows, partial=len(rows) < len(items))
    processes.barrier()
    return summary, ordered(rows)
