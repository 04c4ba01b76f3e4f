"""CUDA graphs for the engine's forwards: record a forward once per input shape, replay it every step.

At batch 1 on a GPU a decoding step should cost one read of the weights, but an eager forward launches every
kernel from Python (about a dozen per layer): for a small draft the launches cost more than the arithmetic, and
they add up for the target. Sequoia (arXiv 2402.12374) and the original project capture CUDA graphs for the
draft's growth steps and for verification at fixed tree sizes; gpt-fast gets the same from
`torch.compile(mode="reduce-overhead")`. `GraphedModel` does it for any TreeModel, keyed by the call's shapes:

  key       (rows, attention width rounded up to `kv_block`, logit rows, return_hidden, hidden layers, feature
            width and dtype)
  capture   the `capture_after`-th call with a key allocates static input buffers for it (token ids, positions,
            KV slots, mask, logit rows, features), records the model's own forward over them once and keeps the
            graph; every later call with that key copies its inputs into the buffers and replays the graph
  eager     the model's own forward for calls seen fewer times (a prompt's prefill), over `max_rows` rows,
            past `max_graphs` graphs, with a non-boolean mask, or wider than the cache

So every tree size a growmap uses, each size a dynamic tree's budget produces and the autoregressive one-token
step get their graphs after their second call, with nothing to declare up front.

What is padded: rows never are (a padded matmul may round differently). The attention width (committed prefix
plus tree) grows every step, so a graph's mask covers its whole bucket of cache slots with the slots past the
call's own width masked out: they get zero attention weight, the same result in exact arithmetic, not always
bit for bit (a kernel may split a longer reduction differently); tests compare greedy outputs with the eager
forward in each dtype. A replay runs the very kernels of an eager forward over the same padded inputs.

The KV cache is the model's own preallocated tensor, which every graph reads and writes in place (the graphs
own no copy of it): stale entries stay masked out, and rejected slots are overwritten as in eager decoding. A
model whose cache tensor is replaced drops its graphs instead of writing into the old one.

The seam: `capture(fn) -> replay` takes a function of no arguments that runs the forward over the static
buffers and returns a function that runs it again and returns its outputs. `cuda_graph_capture` records a
CUDA graph; `eager_capture` calls `fn` again (the CPU dry run's stand-in); a compiled forward fits the same seam
(`lambda fn: torch.compile(fn)`). Outputs are cloned before they are returned, so a replay never overwrites a
tensor a caller still holds.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.model import TreeModel

Outputs = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
Capture = Callable[[Callable[[], Outputs]], Callable[[], Outputs]]


@dataclass(frozen=True)
class GraphSettings:
    kv_block: int = 256      # attention width rounded up to a multiple of this many cache slots
    capture_after: int = 2   # calls with a key before it is captured: one-off shapes (a prefill) stay eager
    max_rows: int = 256      # larger calls run eagerly
    max_graphs: int = 128    # per model; calls with a new key run eagerly past this


def eager_capture(fn: Callable[[], Outputs]) -> Callable[[], Outputs]:
    """The seam's identity: "replay" calls the forward again. Lets the graph bookkeeping run on a CPU."""
    return fn


def cuda_graph_capture(device: torch.device | str, warmup: int = 1) -> Capture:
    """Records each function as a CUDA graph on `device`, all of one model's graphs in one memory pool (they
    never run concurrently, and GraphedModel copies every output out before the next replay)."""
    device = torch.device(device)
    with torch.cuda.device(device):
        pool = torch.cuda.graph_pool_handle()

    def capture(fn: Callable[[], Outputs]) -> Callable[[], Outputs]:
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            # lazy initialisation (cuBLAS handles, workspaces) must happen before the capture, not inside it;
            # the warm-up writes the same cache entries the replay will write
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs = fn()

        def replay() -> Outputs:
            graph.replay()
            return outputs

        return replay

    return capture


class _StaticCall:
    """The static input buffers of one key and the replay recorded over them."""

    def __init__(self, rows: int, width: int, logit_rows: int | None, features: tuple | None,
                 device: torch.device) -> None:
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)       # [n]
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)    # [n]
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)        # [n]
        self.mask = torch.zeros(rows, width, dtype=torch.bool, device=device)  # [n, bucket width]
        self.logits_rows = None if logit_rows is None else torch.zeros(logit_rows, dtype=torch.long, device=device)
        self.features = None if features is None else torch.zeros(rows, features[0], dtype=features[1], device=device)
        self.replay: Callable[[], Outputs] | None = None

    def stage(self, token_ids: torch.Tensor, positions: torch.Tensor, kv_slots: torch.Tensor,
              attn_mask: torch.Tensor, logits_rows: torch.Tensor | None, prev_features: torch.Tensor | None) -> None:
        """Copy one call's inputs into the buffers; mask columns past the call's width become False."""
        width = attn_mask.shape[1]
        self.tokens.copy_(token_ids)
        self.positions.copy_(positions)
        self.slots.copy_(kv_slots)
        self.mask[:, :width].copy_(attn_mask)
        if width < self.mask.shape[1]:
            self.mask[:, width:].fill_(False)
        if self.logits_rows is not None:
            self.logits_rows.copy_(logits_rows)
        if self.features is not None:
            self.features.copy_(prev_features)


def _cloned(outputs: Outputs) -> Outputs:
    return tuple(t.clone() for t in outputs) if isinstance(outputs, tuple) else outputs.clone()


class GraphedModel:
    """A TreeModel whose `forward` replays a recorded graph per input shape (module docstring).

    Everything but `forward` is the wrapped model's own (cache, device, vocabulary maps, ...), so the decoder
    and the drafters take it wherever they take a TreeModel.
    """

    def __init__(self, model: TreeModel, capture: Capture, settings: GraphSettings = GraphSettings()) -> None:
        self.model, self.capture, self.settings = model, capture, settings
        self.counts = {"captured": 0, "replayed": 0, "eager": 0}
        self._calls: dict[tuple, _StaticCall] = {}
        self._seen: Counter = Counter()
        self._cache_storage = model.cache.keys.data_ptr()

    def __getattr__(self, name: str):
        if name == "model":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def key(self, attn_mask: torch.Tensor, logits_rows: torch.Tensor | None, return_hidden: bool,
            prev_features: torch.Tensor | None, hidden_layers: tuple[int, ...] | None = None) -> tuple | None:
        """The graph a call would replay, or None when it runs eagerly whatever its count."""
        rows, width = attn_mask.shape
        if attn_mask.dtype != torch.bool or not 0 < rows <= self.settings.max_rows or width > self.model.max_len:
            return None
        block = self.settings.kv_block
        bucket = min(-(-width // block) * block, self.model.max_len)
        features = None if prev_features is None else (prev_features.shape[-1], prev_features.dtype)
        logit_rows = None if logits_rows is None else logits_rows.shape[0]
        layers = None if hidden_layers is None else tuple(hidden_layers)
        return rows, bucket, logit_rows, return_hidden, layers, features

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, kv_slots: torch.Tensor,
                attn_mask: torch.Tensor, logits_rows: torch.Tensor | None = None, return_hidden: bool = False,
                prev_features: torch.Tensor | None = None, hidden_layers: tuple[int, ...] | None = None,
                inputs_embeds: torch.Tensor | None = None) -> Outputs:
        """TreeModel.forward's contract: token_ids, positions, kv_slots [n] long; attn_mask [n, S] bool;
        logits_rows [r] long or None; prev_features [n, d] or None; hidden_layers: indices or None;
        inputs_embeds [n, d] or None (an image prefill: always eager, never a graph)."""
        if self.model.cache.keys.data_ptr() != self._cache_storage:  # graphs address the old cache: drop them
            self._calls.clear()
            self._seen.clear()
            self._cache_storage = self.model.cache.keys.data_ptr()
        inputs = (token_ids, positions, kv_slots, attn_mask, logits_rows, prev_features)
        key = None if inputs_embeds is not None else self.key(attn_mask, logits_rows, return_hidden, prev_features,
                                                              hidden_layers)
        call = self._calls.get(key)
        if call is None:
            if key is not None:
                self._seen[key] += 1
            if (key is None or self._seen[key] < self.settings.capture_after
                    or len(self._calls) >= self.settings.max_graphs):
                self.counts["eager"] += 1
                return self.model.forward(token_ids, positions, kv_slots, attn_mask, logits_rows=logits_rows,
                                          return_hidden=return_hidden, prev_features=prev_features,
                                          hidden_layers=hidden_layers, inputs_embeds=inputs_embeds)
            call = self._record(key, inputs)
        call.stage(*inputs)
        self.counts["replayed"] += 1
        return _cloned(call.replay())

    def _record(self, key: tuple, inputs: tuple) -> _StaticCall:
        rows, bucket, logit_rows, return_hidden, hidden_layers, features = key
        call = _StaticCall(rows, bucket, logit_rows, features, self.model.device)
        call.stage(*inputs)  # the capture's warm-up computes this very call

        def run() -> Outputs:
            return self.model.forward(call.tokens, call.positions, call.slots, call.mask,
                                      logits_rows=call.logits_rows, return_hidden=return_hidden,
                                      prev_features=call.features, hidden_layers=hidden_layers)

        call.replay = self.capture(run)
        self._calls[key] = call
        self.counts["captured"] += 1
        return call


def with_cuda_graphs(model: TreeModel, enabled: bool,
                     settings: GraphSettings = GraphSettings()) -> TreeModel | GraphedModel:
    """`model` in a GraphedModel recording CUDA graphs when enabled and it lives on a CUDA device; the model
    itself otherwise: graphs are never used on a CPU."""
    if not enabled or model.device.type != "cuda":
        return model
    return GraphedModel(model, cuda_graph_capture(model.device), settings)


def graph_counts(model: TreeModel | None) -> dict[str, int] | None:
    """How many calls of a GraphedModel were captured, replayed and run eagerly; None for a plain model."""
    return dict(model.counts) if isinstance(model, GraphedModel) else None
