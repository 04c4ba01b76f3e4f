"""The study file (TOML, read with the standard library's tomllib): experiments, sizes and claims, checked
whole before anything runs. Every failure is one UserError line naming the key and how to fix it."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.study.scripts import SCRIPTS

CLAIM_KINDS = ("compare", "rank")
Scalar = str | int | float | bool
Value = Scalar | list  # a list: a flag that takes several values


@dataclass(frozen=True)
class Experiment:
    """One script and its grid: every combination of the grid's values is one cell, `flags` are in every cell."""

    name: str
    script: str
    flags: dict[str, Value]
    grid: dict[str, list[Value]]


@dataclass(frozen=True)
class Claim:
    """A claim of the study written as a check on the table (utils/study/verdicts.py says how each kind is
    judged). `compare`: rows matching `a` against rows matching `b` of one experiment, paired on its
    `pair_on` columns. `rank`: `x` of one experiment against `y` of another, joined on `key`."""

    text: str
    kind: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    name: str
    size: str
    experiments: list[Experiment]
    claims: list[Claim]
    launch: list[str]           # command prefix instead of `python` (torchrun / accelerate launch), or []
    min_prompts: int            # fewer prompts in a row than this: its claims are not separable
    source: str                 # the study file's text, kept in the study folder


def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a table, got {value!r}")
    return value


def _flags(value, where: str) -> dict[str, Value]:
    flags = _table(value, where)
    for key, item in flags.items():
        if key.startswith("-"):
            raise UserError(f"{where}.{key}: write flag names without dashes (e.g. max-new-tokens)")
        items = item if isinstance(item, list) else [item]
        if not items or not all(isinstance(one, Scalar.__args__) for one in items):
            raise UserError(f"{where}.{key} must be a string, number, boolean or a list of them, got {item!r}")
    return flags


def _grid(value, where: str) -> dict[str, list[Value]]:
    grid = _table(value, where)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.{key} is an empty grid: give it a non-empty list of values")
        for item in values:
            _flags({key: item}, where)
    return grid


def _experiment(name: str, body: dict, size: str) -> Experiment:
    where = f"experiments.{name}"
    body = _table(body, where)
    unknown = set(body) - {"script", "flags", "grid", "sizes"}
    if unknown:
        raise UserError(f"{where}: unknown key {sorted(unknown)[0]!r} (keys: script, flags, grid, sizes)")
    script = body.get("script")
    if script not in SCRIPTS:
        raise UserError(f"{where}.script: unknown script {script!r}; choose from {', '.join(SCRIPTS)}")
    flags = dict(_flags(body.get("flags", {}), f"{where}.flags"))
    grid = dict(_grid(body.get("grid", {}), f"{where}.grid"))
    sized = _table(_table(body.get("sizes", {}), f"{where}.sizes").get(size, {}), f"{where}.sizes.{size}")
    flags |= _flags(sized.get("flags", {}), f"{where}.sizes.{size}.flags")
    grid |= _grid(sized.get("grid", {}), f"{where}.sizes.{size}.grid")
    for key in set(flags) & set(grid):
        del flags[key]  # the grid's values win over a fixed flag of the same name
    return Experiment(name, script, flags, grid)


def _claim(body: dict, index: int, experiments: dict[str, Experiment]) -> Claim:
    where = f"claims[{index}]"
    body = dict(_table(body, where))
    text, kind = body.pop("text", None), body.pop("kind", None)
    if not isinstance(text, str) or not text:
        raise UserError(f"{where}.text: write the claim in words")
    if kind not in CLAIM_KINDS:
        raise UserError(f"{where}.kind: unknown kind {kind!r}; choose from {', '.join(CLAIM_KINDS)}")
    for key in ("experiment", "x_experiment", "y_experiment"):
        if key in body and body[key] not in experiments:
            raise UserError(f"{where}.{key}: no experiment named {body[key]!r}")
    needed = ("experiment", "metric", "a", "b") if kind == "compare" else ("x_experiment", "x", "y_experiment", "y",
                                                                           "key")
    for key in needed:
        if key not in body:
            raise UserError(f"{where}: a {kind} claim needs {key!r} ({', '.join(needed)})")
    return Claim(text, kind, body)


def parse_study(text: str, size: str | None, origin: str = "study file") -> Study:
    """The study at `size` (None: the file's first size, or "default" when it has none)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{origin} is not valid TOML: {exc}") from exc
    unknown = set(data) - {"name", "sizes", "experiments", "claims", "launch", "min_prompts"}
    if unknown:
        raise UserError(f"{origin}: unknown top-level key {sorted(unknown)[0]!r}")
    sizes = _table(data.get("sizes", {"default": {}}), "sizes")
    size = size if size is not None else next(iter(sizes), "default")
    if size not in sizes:
        raise UserError(f"{origin} has no size {size!r}; its sizes: {', '.join(sizes) or 'none'}")
    raw = _table(data.get("experiments", {}), "experiments")
    if not raw:
        raise UserError(f"{origin} has no [experiments.NAME] table: the grid is empty")
    experiments = {name: _experiment(name, body, size) for name, body in raw.items()}
    claims = [_claim(body, i, experiments) for i, body in enumerate(data.get("claims", []))]
    launch = data.get("launch", "")
    min_prompts = data.get("min_prompts", 5)
    if not isinstance(min_prompts, int) or min_prompts < 2:
        raise UserError(f"{origin}: min_prompts must be an integer >= 2 (a bootstrap needs two prompts)")
    return Study(str(data.get("name", "study")), size, list(experiments.values()), claims,
                 launch.split() if isinstance(launch, str) else list(launch), min_prompts, text)


def load_study(path: str, size: str | None) -> Study:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read the study file {path} ({exc.strerror or exc})") from exc
    return parse_study(text, size, path)
