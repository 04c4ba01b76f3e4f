"""`python -m utils.bench`."""
from utils.bench.compare import main
from utils.cli import run_cli

run_cli(main)
