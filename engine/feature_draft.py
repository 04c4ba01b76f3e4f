"""Feature-level drafts (EAGLE, arXiv 2401.15077): a draft that reads the target's own hidden states.

A token-level draft must re-derive from tokens alone what the target has already computed. A feature draft
is given, at each position p, the target's final hidden state h(p-1) (the "feature" that produced the
target's logits for token p) together with token p, and predicts h(p); the target's own LM head turns
that prediction into next-token logits. One decoder layer on top of the target's features predicts the
target far better than a small model on tokens (the target did the hard work), and it costs a fraction of
one target layer plus the head.

Layout (slot p of the draft cache holds the pair (token p, feature p-1); slot 0 gets a zero feature):
  committed slots  the feature is the target's real h(p-1), recorded after each target forward;
  tree nodes       the feature is the draft's own prediction for the node's parent (the parent's output),
                   so those cache entries are thrown away after each step and the accepted tokens are run
                   again with the target's real features (`DraftCache` in engine/drafters.py).

The draft's embedding and LM head are the target's (frozen, never saved with the draft); the LM head may be
restricted to a subset of the vocabulary (`head_ids`), which is what keeps the draft cheap: SmolLM2-135M's
full head alone costs a fifth of its forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model import TreeModel, decoder_stack

FEATURE_DRAFT_KEY = "treespec_feature_draft"  # config.json entry that marks a feature draft folder
FROZEN_PREFIXES = ("embed.", "head.")  # the target's embedding and LM head: never trained, never saved


class FeatureDraftNet(nn.Module):
    """fc([embed(token); feature]) -> Llama decoder layers -> RMSNorm: the predicted feature.

    `embed` and `head` are the target's embedding and (row-subset) LM head, frozen; only `fc`, `layers` and
    `norm` are trained and saved (`trainable_state_dict`).
    """

    def __init__(self, config, embed_weight: torch.Tensor, head_weight: torch.Tensor) -> None:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        self.config = config
        d = config.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=True)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.embed = nn.Embedding.from_pretrained(embed_weight.detach(), freeze=True)
        self.head = nn.Linear(d, head_weight.shape[0], bias=False)
        self.head.weight = nn.Parameter(head_weight.detach(), requires_grad=False)
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or d // self.num_heads

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The draft's own weights (what a checkpoint stores): everything but the target's embedding and head."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}

    def fuse(self, token_ids: torch.Tensor, prev_features: torch.Tensor) -> torch.Tensor:
        """[..., n] target ids and [..., n, d] features -> [..., n, d] decoder input."""
        embedded = self.embed(token_ids)
        return self.fc(torch.cat([embedded, prev_features.to(embedded.dtype)], dim=-1))

    def forward(self, token_ids: torch.Tensor, prev_features: torch.Tensor) -> torch.Tensor:
        """Training forward, causal over each row: token_ids [b, n], prev_features [b, n, d] (row t holds the
        target's feature of position t - 1) -> predicted features [b, n, d]. Right padding is harmless."""
        hidden = self.fuse(token_ids, prev_features)
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
        gqa = self.kv_heads != self.num_heads

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        hidden = decoder_stack(list(self.layers), hidden, self.rotary_emb, positions, self.num_heads,
                               self.kv_heads, self.head_dim, attend)
        return self.norm(hidden)


class FeatureDraftModel(TreeModel):
    """A FeatureDraftNet run by the engine over its own KV cache (one cache layer per draft layer).

    `forward` is TreeModel's, plus the previous-position features of the n tokens (`prev_features` [n, d]);
    with `return_hidden` the hidden states it returns are its predicted features [n, d].
    """

    uses_target_features = True

    def __init__(self, net: FeatureDraftNet, max_len: int, head_ids: torch.Tensor | None) -> None:
        self.net = net
        self._setup(net.config, net.embed, list(net.layers), net.norm, net.head, net.rotary_emb, max_len,
                    None, head_ids)

    @property
    def target_vocab_size(self) -> int:
        return self.embed.num_embeddings

    def placeholder_features(self, count: int) -> torch.Tensor:
        return torch.zeros(count, self.hidden_size, dtype=self.dtype, device=self.device)

    def embed_inputs(self, token_ids: torch.Tensor, prev_features: torch.Tensor | None) -> torch.Tensor:
        if prev_features is None:
            raise ValueError("a feature draft needs the previous positions' target features (prev_features)")
        return self.net.fuse(token_ids, prev_features)


def shift_features(features: torch.Tensor) -> torch.Tensor:
    """[..., L, d] features of positions 0..L-1 -> what positions 0..L-1 read: the feature of the previous
    position (zero for position 0)."""
    return torch.cat([torch.zeros_like(features[..., :1, :]), features[..., :-1, :]], dim=-2)
