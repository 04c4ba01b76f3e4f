"""A Llama-family causal LM run over a static KV cache with explicit slots, positions and attention mask.

Weights and rotary embeddings come from a transformers model (Llama 1/2/3, TinyLlama, SmolLM2, Mistral,
Qwen2: GQA, tied or untied embeddings, q/k/v biases, any RoPE scaling the config names); the forward is
ours so that the tree mask and the cache slots are explicit arguments, never model state.
Sliding-window attention (Mistral) is not applied: trees and prompts here stay far below the window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kv_cache import KVCache
from engine.native_layers import LayerStep, native_stack


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TreeModel:
    """Runs `forward(token_ids, positions, kv_slots, attn_mask) -> logits` on a preallocated cache.

    A draft may predict over a subset of the target's vocabulary: `input_map` ([target_vocab] long) turns
    target token ids into its own, and `output_ids` ([own_vocab] long) turns its logits' columns back into
    target ids. Both are None for a model that shares the target's vocabulary.
    """

    def __init__(self, hf_model: nn.Module, max_len: int, input_map: torch.Tensor | None = None,
                 output_ids: torch.Tensor | None = None) -> None:
        # a vision-language model (LLaVA) keeps its decoder in `model.language_model` and its own config in
        # `text_config`; the engine runs only that language model (image inputs arrive as `inputs_embeds`)
        body = getattr(hf_model.model, "language_model", hf_model.model)
        self.hf_model = hf_model
        self._setup(hf_model.config.get_text_config(), body.embed_tokens, list(body.layers), body.norm,
                    hf_model.lm_head, body.rotary_emb, max_len, input_map, output_ids)

    def _setup(self, config, embed: nn.Module, layers: list[nn.Module], norm: nn.Module, lm_head: nn.Linear,
               rotary: nn.Module, max_len: int, input_map: torch.Tensor | None,
               output_ids: torch.Tensor | None) -> None:
        self.embed, self.layers, self.norm, self.lm_head, self.rotary = embed, layers, norm, lm_head, rotary
        self.num_heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        self.vocab_size = lm_head.out_features
        param = next(lm_head.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.input_map = None if input_map is None else input_map.to(self.device)
        self.output_ids = None if output_ids is None else output_ids.to(self.device)
        # target id -> column of this model's logits (None: the columns are target ids); a subset draft that
        # reads and writes the same ids has it as its input map, a subset head alone inverts `output_ids`
        self.column_of = self.input_map
        if self.column_of is None and self.output_ids is not None:
            self.column_of = torch.zeros(self.target_vocab_size, dtype=torch.long, device=self.device)
            self.column_of[self.output_ids] = torch.arange(self.output_ids.shape[0], device=self.device)
        self.cache = KVCache(len(self.layers), self.kv_heads, max_len, self.head_dim, self.dtype, self.device)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    # set for a model whose decoder layers run natively on the gguf path (utils/native_kernels.py): float32 CPU
    # forwards then take engine/native_layers.py's one call per layer instead of the torch ops of decoder_stack
    layer_step: LayerStep | None = None
    uses_target_features = False  # True for drafts that read the target's hidden states (engine/feature_draft.py)
    target_layers: tuple[int, ...] | None = None  # a feature draft's choice of target layers (None: the last)

    def placeholder_features(self, count: int) -> torch.Tensor | None:
        """`prev_features` for timing runs: None for a plain model, zeros for a feature draft (values do not
        change the cost)."""
        return None

    def embed_inputs(self, token_ids: torch.Tensor, prev_features: torch.Tensor | None) -> torch.Tensor:
        """[n] target ids -> [n, d] input of the first layer (a feature draft also reads `prev_features`)."""
        return self.embed(token_ids if self.input_map is None else self.input_map[token_ids])

    @property
    def target_vocab_size(self) -> int:
        """Size of the vocabulary this model's token ids live in (the target's, for a subset draft)."""
        return self.vocab_size if self.input_map is None else self.input_map.shape[0]

    def to_target_ids(self, own_ids: torch.Tensor) -> torch.Tensor:
        return own_ids if self.output_ids is None else self.output_ids[own_ids]

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, kv_slots: torch.Tensor,
                attn_mask: torch.Tensor, logits_rows: torch.Tensor | None = None, return_hidden: bool = False,
                prev_features: torch.Tensor | None = None,
                hidden_layers: tuple[int, ...] | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run n new tokens and return their next-token logits.

        token_ids: [n] long target-vocabulary ids; positions: [n] long RoPE positions;
        kv_slots: [n] long cache slots to write; attn_mask: [n, S] bool over cache slots [0, S)
        (True = attend; S must cover every slot written); logits_rows: optional [r] long rows to project
        through the LM head (prefill only needs the last). Returns [n or r, vocab] float32 logits over the
        model's own vocabulary (map columns with `to_target_ids`); with return_hidden also the final
        (normed) hidden states of all n tokens, [n, d] — the features a feature-level draft reads (for a
        feature draft: its predicted features). With `hidden_layers` (k indices in transformers' `hidden_states`
        numbering: 0 = the embedding, i < L = the residual stream after decoder layer i, L = the final normed
        state) the hidden states returned are those layers' side by side, [n, k * d]: what a fused-layer
        feature draft reads.
        A feature draft reads `prev_features` [n, d], the features of each token's previous position.
        `inputs_embeds` [n, d], when given, replaces the embedding of token_ids as the first layer's input: a
        multimodal prefill, whose image positions hold the vision tower's projected features (computed by
        transformers, utils/llava/).
        """
        embedded = self.embed_inputs(token_ids, prev_features) if inputs_embeds is None else inputs_embeds
        hidden, kept = self.run_layers(embedded.to(self.dtype), positions, kv_slots, attn_mask, hidden_layers or ())
        rows = hidden if logits_rows is None else hidden[logits_rows]
        logits = self.lm_head(rows).float()
        if not return_hidden:
            return logits
        return logits, (hidden if hidden_layers is None else torch.cat(kept, dim=-1))

    def run_layers(self, embedded: torch.Tensor, positions: torch.Tensor, kv_slots: torch.Tensor,
                   attn_mask: torch.Tensor, keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder stack over the cache: embedded [n, d] -> (final normed hidden states [n, d], the states
        named in `keep` [n, d] each, in `keep`'s order, numbered as `forward`'s hidden_layers)."""
        if self.layer_step is not None and embedded.dtype == torch.float32 and embedded.device.type == "cpu" \
                and attn_mask.dtype == torch.bool:
            hidden, kept = native_stack(self.layer_step, len(self.layers), embedded, self.rotary, positions,
                                        kv_slots, attn_mask, self.cache, keep)
            final = self.norm(hidden)
            return final, [final if index == len(self.layers) else state for index, state in zip(keep, kept)]
        kv_len = attn_mask.shape[1]
        mask = attn_mask[None, None]                                  # [1, 1, n, S]
        gqa = self.kv_heads != self.num_heads

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.cache.write(index, kv_slots, k[0], v[0])
            keys, values = self.cache.read(index, kv_len)
            return F.scaled_dot_product_attention(q, keys[None], values[None], attn_mask=mask, enable_gqa=gqa)

        hidden, kept = decoder_stack(self.layers, embedded[None], self.rotary, positions[None], self.num_heads,
                                     self.kv_heads, self.head_dim, attend, keep)
        final = self.norm(hidden[0])
        # index L is the final (normed) state, as in transformers' hidden_states
        return final, [final if index == len(self.layers) else state[0] for index, state in zip(keep, kept)]


def decoder_stack(layers: list[nn.Module], hidden: torch.Tensor, rotary: nn.Module, positions: torch.Tensor,
                  num_heads: int, kv_heads: int, head_dim: int, attend,
                  keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Llama decoder layers (pre-norm attention + MLP) over hidden [b, n, d] at positions [b, n].

    `attend(layer_index, q, k, v)` does the attention itself (q [b, heads, n, hd], k/v [b, kv_heads, n, hd],
    RoPE applied) and returns [b, heads, n, hd]: the engine reads and writes its KV cache there, training
    uses a plain causal attention. Shared so that a feature draft trains and runs through the same code.
    Returns the last layer's output [b, n, d] (before the final norm) and the states after the layers named
    in `keep` (0 = the input), [b, n, d] each, in `keep`'s order.
    """
    b, n = hidden.shape[:2]
    cos, sin = rotary(hidden, positions)
    cos, sin = cos[:, None], sin[:, None]
    states = {0: hidden} if 0 in keep else {}
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        # a linear path may have fused the projections that read one input (engine/linear_paths.py)
        fused = getattr(attn, "qkv_fused", None)
        q, k, v = fused(x) if fused is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
        q = q.view(b, n, num_heads, head_dim).transpose(1, 2)
        k = k.view(b, n, kv_heads, head_dim).transpose(1, 2)
        v = v.view(b, n, kv_heads, head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = attend(index, q, k, v)
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        hidden = hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden))
        if index + 1 in keep:
            states[index + 1] = hidden
    return hidden, [states[i] for i in keep]


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's gated MLP; with gate and up fused, one call for both (the same sums as transformers')."""
    fused = getattr(mlp, "gate_up_fused", None)
    if fused is None:
        return mlp(x)
    gate, up = fused(x)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def to_target_vocab(draft_values: torch.Tensor, output_ids: torch.Tensor | None, target_vocab_size: int,
                    fill: float) -> torch.Tensor:
    """Scatter a subset draft's columns into the target vocabulary, `fill` elsewhere.

    draft_values: [n, Vd] over the draft's own vocabulary; output_ids: [Vd] long target ids (None = the
    draft already uses the target's vocabulary). Returns [n, target_vocab_size].
    """
    if output_ids is None:
        return draft_values
    full = draft_values.new_full((draft_values.shape[0], target_vocab_size), fill)
    full[:, output_ids] = draft_values
    return full
