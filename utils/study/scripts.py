"""The scripts a study runs: how each is started, its own argparse parser (built, never run, to check every
cell's flags before any cell runs) and whether it continues a cut run with --resume."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
from dataclasses import dataclass

from utils.errors import UserError
from utils.models import REPO_ROOT


@dataclass(frozen=True)
class Script:
    name: str
    command: tuple[str, ...]     # after the interpreter (or launcher): a file or `-m module`
    module: str                  # what to import for its parser
    parser_builder: str          # the function of `module` that builds the parser
    resumable: bool              # takes --resume PATH of its results .json
    shared_checks: bool = True   # its flags pass utils/cli.py's validate_common (every decoding script)


SCRIPTS = {
    "test_greedyS": Script("test_greedyS", ("test_greedyS.py",), "test_greedyS", "build_parser", True),
    "test_greedyS_dy": Script("test_greedyS_dy", ("test_greedyS_dy.py",), "test_greedyS_dy", "build_parser", True),
    # several runs per call and a combined file: a cut cell is run again whole
    "test_greedyS_commonsense": Script("test_greedyS_commonsense", ("test_greedyS_commonsense.py",),
                                       "test_greedyS_commonsense", "build_parser", False),
    "test_greedyS_logit": Script("test_greedyS_logit", ("test_greedyS_logit.py",), "test_greedyS_logit",
                                 "build_parser", True),
    "test_llava": Script("test_llava", ("test_llava.py",), "test_llava", "parser", True),
    "utils.bench": Script("utils.bench", ("-m", "utils.bench"), "utils.bench.compare", "build_parser", True),
    # checkpoints in its --output-dir, no results .json: a cut cell is trained again
    "pretrain_draft_model": Script("pretrain_draft_model", ("pretrain_draft_model.py",), "pretrain_draft_model",
                                   "build_parser", False, shared_checks=False),
}


def script_parser(script: Script) -> argparse.ArgumentParser:
    """The script's own parser, built in this process without running the script (entry scripts are imported
    from the repository root)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    module = importlib.import_module(script.module)
    if script.name == "utils.bench":
        from utils.calibration import add_calibration_flags  # what `python -m utils.bench` adds
        return module.build_parser(add_calibration_flags)
    return getattr(module, script.parser_builder)()


def check_flags(script: Script, parser: argparse.ArgumentParser, argv: list[str], cell: str) -> None:
    """Parse `argv` with the script's parser and apply the shared flag checks (utils/cli.py's validate_common,
    without touching the results folder); a refusal becomes one UserError naming the cell."""
    from utils.cli import validate_common

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        message = stderr.getvalue().strip().splitlines()
        why = message[-1] if message else f"exit status {exc.code}"
        raise UserError(f"cell {cell}: {script.name} refuses its flags: {why.split('error: ', 1)[-1]}") from None
    if script.shared_checks:
        args.results_dir = None  # the runner makes each cell's folder itself
        args.resume = None
        try:
            validate_common(args)
        except UserError as exc:
            raise UserError(f"cell {cell}: {script.name} refuses its flags: {exc}") from None
