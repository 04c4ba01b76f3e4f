"""`python -m utils.study run STUDY.toml [--size NAME | --quick] [--out DIR]` runs a study's cells (skipping
finished ones, resuming a cut one); `python -m utils.study report STUDY_DIR` writes its table, figures and
report.md. Bad input: one line on stderr, exit status 2, before any cell runs."""
from __future__ import annotations

from pathlib import Path

from utils.cli import OneLineParser, run_cli
from utils.study.report import write_report
from utils.study.runner import run_study
from utils.study.spec import load_study


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m utils.study", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run every cell of a study file not finished yet")
    run.add_argument("study", help="the study file (.toml)")
    run.add_argument("--size", default=None, help="which of the file's sizes (default: its first)")
    run.add_argument("--quick", action="store_const", dest="size", const="quick", help="--size quick")
    run.add_argument("--out", default=None, help="study folder (default: results/study-<name>-<size>)")
    run.add_argument("--report", action="store_true", help="write the report when every cell has run")
    report = commands.add_parser("report", help="table, figures and report.md of a study folder")
    report.add_argument("study_dir")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        print(f"report: {write_report(Path(args.study_dir))}")
        return
    study = load_study(args.study, args.size)
    out = Path(args.out or f"results/study-{study.name}-{study.size}")
    run_study(study, out, args.study)
    print(f"study: {out}")
    if args.report:
        print(f"report: {write_report(out)}")


if __name__ == "__main__":
    run_cli(main)
