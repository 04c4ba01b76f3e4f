"""`python -m utils.growmap_tool`."""
import sys

from utils.growmap_tool.cli import main

sys.exit(main())
