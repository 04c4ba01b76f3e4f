"""`python -m utils.bench`, with the per-machine calibration choosing the tree and each model's kernels."""
from utils.bench.compare import main
from utils.calibration import add_calibration_flags, plan_static_run
from utils.cli import run_cli

run_cli(lambda: main(plan_run=plan_static_run, add_flags=add_calibration_flags))
