"""llama.cpp beside the suite (optional: `pip install llama-cpp-python`, which compiles llama.cpp, minutes on
2 cores): its plain greedy decoding and its prompt-lookup decoding (llama_cpp's LlamaPromptLookupDecoding) on the
same GGUF file as the suite's target, with torch's thread count. Greedy (temperature 0, no penalties)."""
from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Callable

from utils.bench.methods import Run

LLAMA_CPP_METHODS = ("llama_cpp", "llama_cpp_lookup")
LLAMA_CPP_LABEL = "llama.cpp"  # the "dtype" its rows show: its own numerics (8-bit activations, float16 KV)


def llama_cpp_module():
    """The llama_cpp module, or None when it does not import."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        return None


def llama_cpp_runners(methods: list[str], gguf: Path | None, threads: int, n_ctx: int, eos_ids: set[int],
                      lookup_tokens: int, module=None) -> tuple[dict[str, Callable], dict[str, str]]:
    """({method: runner(prompt, max_new_tokens) -> Run}, {method: why skipped}) for the llama.cpp methods in
    `methods`. `module`: llama_cpp itself (tests pass a fake)."""
    wanted = [m for m in LLAMA_CPP_METHODS if m in methods]
    module = module or llama_cpp_module()
    why = None if module is not None else "llama_cpp does not import (pip install llama-cpp-python)"
    if why is None and gguf is None:
        why = "the target is not a GGUF file"
    if why is not None:
        return {}, {m: why for m in wanted}
    runners = {}
    for name in wanted:
        draft = None
        if name == "llama_cpp_lookup":
            draft = module.llama_speculative.LlamaPromptLookupDecoding(num_pred_tokens=lookup_tokens)
        model = module.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                             draft_model=draft, verbose=False)
        runners[name] = _runner(model, eos_ids)
    return runners, {}


def _runner(model, eos_ids: set[int]) -> Callable:
    def run(prompt, max_new_tokens: int) -> Run:
        started, out = time.perf_counter(), []
        for token in model.generate(list(prompt.ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                    reset=True):
            out.append(int(token))
            if token in eos_ids or len(out) >= max_new_tokens:
                break
        # forward passes are not reported by llama_cpp: counted as one per token (acc/step reads 1.00)
        return Run(out, time.perf_counter() - started, len(out))

    return run
