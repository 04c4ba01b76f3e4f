"""`python -m utils.growmap_tool`."""
import sys

from utils.distributed.offload import target_loader
from utils.growmap_tool.cli import main

sys.exit(main(target_loader=target_loader))
