"""Build, search and inspect growmaps (static tree shapes), and measure what the search needs:
`python -m utils.growmap_tool <command> --help`.

  build chain K | wxd W D | kary K D | parents "0,0,1,..."  -o out.pt
  search --acceptance vec.json --budget 64 --max-depth 10 -o out.pt        Sequoia's optimal tree
  search --acceptance vec.json --latency lat.json [--draft-ms X] -o out.pt  ... sized for the hardware
  inspect file.pt [--acceptance vec.json] [--png out.png]
  acceptance --model D --target T --dataset X --T 0 --width 32 -o vec.pt   measure the pair's acceptance vector
  latency --model D --target T --device cpu --sizes 1,2,4,...,256 -o lat.json   measure the hardware's costs

Every written growmap gets a JSON beside it (same name, .json) saying how it was made.
Bad input: one line on stderr, exit status 2.

Modules, one per concern: `build`, `search`, `draw` (inspect), `measure` (acceptance, latency), `vectors` (the
input files), `output` (writing a growmap and its record), `cli` (the parser and `main`). May import utils
plumbing and engine/; nothing else imports it.
"""
from __future__ import annotations

from utils.growmap_tool.cli import main

__all__ = ["main"]
