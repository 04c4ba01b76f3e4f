"""Follower tables for common-sense verification (test_greedyS_commonsense.py).

  python -m utils.commonsense build --dataset builtin --start 12 --output followers/smollm2-135m-top12.pt  # shipped
  python -m utils.commonsense build --distill --distill-tokens 200000 --output t.pt --text t.txt
  python -m utils.commonsense inspect followers/smollm2-135m-top12.pt

`build` counts, over a tokenized corpus, the K most frequent next tokens of every token id of the target's
tokenizer and writes the tensor file (and, with --text, the original's text format). `inspect` loads a table
in either format for a target, checks it and prints a few rows as text.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

from utils.cli import OneLineParser, run_cli
from utils.commonsense.table import (count_followers, load_followers, prompt_pairs, save_tensor, save_text,
                                     target_vocab_size)
from utils.config import DEFAULTS
from utils.errors import UserError
from utils.models import DEFAULT_TARGET, load_tokenizer


TARGET_HELP = ("target whose tokenizer the table is for: hub id, folder or .gguf (default: the embedded "
               "SmolLM2-135M-Instruct)")


def distill_pairs(target: str | None, mix: str, tokens: int) -> tuple[list, str]:
    """(previous, next) pairs of the draft trainer's distillation data (text the target wrote itself; made
    and cached when missing), keeping pairs whose next token the target wrote: what it tends to write next."""
    # imported here, by the entry point: subsystems do not import each other (DESIGN.md)
    from utils.training.distill_data import DISTILL_MIXES, ensure_distill_data, load_distill_data

    if mix not in DISTILL_MIXES:
        raise UserError(f"unknown --distill-mix {mix!r}: choose from {', '.join(DISTILL_MIXES)}")
    settings = replace(DISTILL_MIXES[mix], target=target)
    data = load_distill_data(ensure_distill_data(settings, tokens))
    pairs = []
    for row in range(data.num_rows):
        a, b = int(data.offsets[row]), int(data.offsets[row + 1])
        written = data.teacher[a + 1:b]
        pairs.append((data.tokens[a:b - 1][written], data.tokens[a + 1:b][written]))
    teacher = int(data.num_teacher_tokens)
    return pairs, (f"distillation data ({mix} mix, {data.num_rows} rows, {teacher} target-written tokens, "
                   f"cache key {settings.key()})")


def build(args: argparse.Namespace) -> None:
    if (args.dataset is None) == (not args.distill):
        raise UserError("give exactly one data source: --dataset NAME_OR_PATH or --distill")
    vocab_size = target_vocab_size(args.target)
    started = time.perf_counter()
    if args.distill:
        pairs, source = distill_pairs(args.target, args.distill_mix, args.distill_tokens)
    else:
        pairs, source = prompt_pairs(args.dataset, load_tokenizer(args.target), args.start, args.end)
    pairs = list(pairs)
    table = count_followers(pairs, vocab_size, args.k)
    meta = {"target": args.target or DEFAULT_TARGET, "vocab_size": vocab_size, "k": args.k, "source": source,
            "pairs_counted": int(sum(len(prev) for prev, _ in pairs)),
            "tokens_with_followers": int((table[:, 0] >= 0).sum())}
    save_tensor(table, args.output, meta)
    if args.text:
        save_text(table, args.text)
    print(f"{meta['pairs_counted']} token pairs from {source}; {meta['tokens_with_followers']} of {vocab_size} "
          f"token ids have followers; {time.perf_counter() - started:.1f} s")
    print(f"table: {args.output}" + (f" (text: {args.text})" if args.text else ""))


def inspect(args: argparse.Namespace) -> None:
    vocab_size = target_vocab_size(args.target)
    table, meta = load_followers(args.path, vocab_size)
    tokenizer = load_tokenizer(args.target)
    filled = table[:, 0] >= 0
    print(f"{args.path}: {table.shape[0]} token ids x {table.shape[1]} followers; {int(filled.sum())} ids have "
          f"followers, {float((table >= 0).sum(1).float()[filled].mean()):.2f} on average")
    if meta:
        print(f"built from: {meta.get('source')}")
    for token in filled.nonzero().flatten()[:args.rows].tolist():
        shown = [tokenizer.decode([f]) for f in table[token].tolist() if f >= 0]
        print(f"  {tokenizer.decode([token])!r:>14} -> " + "  ".join(repr(s) for s in shown))


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="count followers over a corpus and write a table",
                               formatter_class=parser.formatter_class)
    make.add_argument("--target", default=DEFAULTS.target, help=TARGET_HELP)
    make.add_argument("--dataset", default=None,
                      help="count over this data (a --dataset name or path as in the test scripts, rows whole); "
                           "builtin holds the evaluation prompts, so prefer --distill")
    make.add_argument("--start", type=int, default=0, help="first --dataset row used")
    make.add_argument("--end", type=int, default=None, help="row after the last one used (default: all)")
    make.add_argument("--distill", action="store_true",
                      help="count over text the target writes itself (the draft trainer's cached distillation "
                           "data; generated when missing); only pairs whose second token the target wrote count")
    make.add_argument("--distill-tokens", type=int, default=DEFAULTS.followers_distill_tokens,
                      help="target-written tokens to use (cached shards are reused)")
    make.add_argument("--distill-mix", default="chat", help="distillation mix: chat or articles")
    make.add_argument("--k", type=int, default=DEFAULTS.followers_k, help="followers kept per token id")
    make.add_argument("--output", required=True, help="tensor file to write (.pt)")
    make.add_argument("--text", default=None, help="also write the original's text format here")
    show = commands.add_parser("inspect", help="load and check a table (.pt or text) and print a few rows",
                               formatter_class=parser.formatter_class)
    show.add_argument("path", help="follower table (.pt or the original's text format)")
    show.add_argument("--target", default=DEFAULTS.target, help=TARGET_HELP)
    show.add_argument("--rows", type=int, default=8, help="rows printed")
    args = parser.parse_args()
    if args.command == "build":
        if not args.output.endswith((".pt", ".pth")):
            raise UserError(f"--output must be a .pt file, got {args.output}")
        build(args)
    else:
        inspect(args)


if __name__ == "__main__":
    run_cli(main)
