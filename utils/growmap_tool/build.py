"""`build`: growmaps of a given shape (chain, width x depth, k-ary, explicit parents)."""
from __future__ import annotations

import argparse
from typing import Sequence

from engine.growmap import chain, from_parents, kary_tree, wxd_tree
from engine.tree_search import expected_accepted
from utils.errors import UserError
from utils.growmap_tool.output import check_size, command_line, out_path, positive, save_with_record, shape_summary
from utils.growmap_tool.vectors import load_vectors


def parse_parents(text: str) -> list[int]:
    """ "0,0,1,..." (parents of nodes 1..n-1) or with a leading -1 for the root -> full parent list."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UserError(f"parents must be comma-separated integers, got {text!r}") from None
    if values[:1] != [-1]:
        values = [-1] + values
    return values


def cmd_build(args: argparse.Namespace, argv: Sequence[str]) -> None:
    out = out_path(args.output)
    if args.shape == "chain":
        check_size(positive("K", args.k) + 1)
        growmap, params = chain(args.k), {"k": args.k}
    elif args.shape == "wxd":
        check_size(positive("W", args.width) * positive("D", args.depth) + 1)
        growmap, params = wxd_tree(args.width, args.depth), {"width": args.width, "depth": args.depth}
    elif args.shape == "kary":
        positive("K", args.k), positive("D", args.depth)
        check_size(sum(args.k ** d for d in range(args.depth + 1)))
        growmap, params = kary_tree(args.k, args.depth), {"k": args.k, "depth": args.depth}
    else:
        parents = parse_parents(args.parents)
        check_size(len(parents))
        growmap, params = from_parents(parents), {"parents": parents}
    record = {"made_by": command_line(argv), "builder": args.shape, "parameters": params, "shape": shape_summary(growmap)}
    if args.acceptance:
        p, root_p, entries = load_vectors(args)
        record.update(entries)
        record["predicted_tokens_per_step"] = expected_accepted(growmap, p, root_p)
        print(f"predicted tokens per step: {record['predicted_tokens_per_step']:.3f}")
    save_with_record(growmap, out, record)

