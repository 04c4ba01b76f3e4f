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

Two EAGLE-3 (arXiv 2503.01840) changes, both optional and recorded in the config marker:
  fused features   the draft may read several target layers (`target_layers`, HF `hidden_states` numbering;
                   EAGLE-3 takes low, middle and high: 2, L // 2, L - 3) instead of the final hidden state.
                   `target_fc` maps the k layers' states [k * d] to one feature [d], which `fc` then reads
                   beside the token's embedding: the composition is one linear map over [embedding; the
                   k states] (any [d, k * d] matrix factors through d), and the d-wide point between them
                   is where the draft's own predicted features enter at deeper tree nodes. A draft without
                   `target_layers` (every checkpoint before them) reads the final state with no `target_fc`.
  training-time test   `forward` runs the draft k times, each step on the previous step's predictions, with
                   the attention pattern of a tree chain (`ttt_attention_mask`), so training sees the inputs
                   deeper tree nodes see at inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model import TreeModel, decoder_stack

FEATURE_DRAFT_KEY = "treespec_feature_draft"  # config.json entry that marks a feature draft folder
FROZEN_PREFIXES = ("embed.", "head.")  # the target's embedding and LM head: never trained, never saved


def target_layers_of(config) -> tuple[int, ...] | None:
    """The target layers a draft config's marker names (None: the final hidden state, the EAGLE default)."""
    layers = (getattr(config, FEATURE_DRAFT_KEY, None) or {}).get("target_layers")
    return None if layers is None else tuple(int(i) for i in layers)


def ttt_attention_mask(length: int, step: int, device: torch.device | str) -> torch.Tensor:
    """Training-time-test attention of unrolled step `step` (0 = teacher-forced) over the keys of steps
    0..step side by side: [length, (step + 1) * length] bool (True = attend).

    Row t of step j is the depth-j node of a tree chain whose root sits at position t - j: it sees the
    committed context (step 0's keys at rows <= t - j) and its own ancestors (step i's key at row t - j + i,
    i = 1..j, itself included), as the engine's tree mask lets it at inference (EAGLE-3, arXiv 2503.01840).
    """
    rows = torch.arange(length, device=device)[:, None]
    cols = torch.arange(length, device=device)[None]
    blocks = [cols <= rows - step] + [cols == rows - step + i for i in range(1, step + 1)]
    return torch.cat(blocks, dim=1)


class FeatureDraftNet(nn.Module):
    """fc([embed(token); feature]) -> Llama decoder layers -> RMSNorm: the predicted feature.

    `embed` and `head` are the target's embedding and (row-subset) LM head, frozen; `fc`, `layers`, `norm`
    and, for a fused-layer draft, `target_fc` are trained and saved (`trainable_state_dict`).
    """

    def __init__(self, config, embed_weight: torch.Tensor, head_weight: torch.Tensor) -> None:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        self.config = config
        d = config.hidden_size
        self.target_layers = target_layers_of(config)
        self.target_fc = None if self.target_layers is None else nn.Linear(len(self.target_layers) * d, d, bias=True)
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

    def target_feature(self, states: torch.Tensor) -> torch.Tensor:
        """[..., k * d] the target's states at its `target_layers` -> [..., d] the feature the draft reads
        (for a draft of the final hidden state, `states` [..., d] is that feature already)."""
        return states if self.target_fc is None else self.target_fc(states.to(self.target_fc.weight.dtype))

    def fuse(self, token_ids: torch.Tensor, prev_features: torch.Tensor) -> torch.Tensor:
        """[..., n] target ids and [..., n, d] features -> [..., n, d] decoder input."""
        embedded = self.embed(token_ids)
        return self.fc(torch.cat([embedded, prev_features.to(embedded.dtype)], dim=-1))

    def forward(self, token_ids: torch.Tensor, target_states: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """Training forward over whole rows, with training-time test (EAGLE-3): `steps` passes, pass j + 1
        reading pass j's predictions. Right padding is harmless.

        token_ids [b, n]; target_states [b, n, k * d] the target's states at each row's own position (its
        `target_layers`, or [b, n, d] its final hidden state): row t reads those of position t - 1, fused by
        `target_feature`. Pass 0 is teacher-forced; at pass j, row t reads pass j - 1's prediction at row
        t - 1 and attends as `ttt_attention_mask` says, so row t (t >= j) is the depth-j node of a chain rooted
        at t - j, at its tree position t. Returns the predicted features of every pass, [steps, b, n, d]; row t
        of every pass predicts the target's final hidden state h(t). Gradients flow through the whole unroll,
        as in EAGLE-3.
        """
        prev_features = shift_features(self.target_feature(target_states))
        b, n = token_ids.shape
        positions = torch.arange(n, device=token_ids.device)[None].expand(b, -1)
        gqa = self.kv_heads != self.num_heads
        past: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]
        outputs = []
        for step in range(steps):
            mask = None if step == 0 else ttt_attention_mask(n, step, token_ids.device)[None, None]

            def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None = mask) -> torch.Tensor:
                past[index].append((k, v))
                if mask is None:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                keys = torch.cat([key for key, _ in past[index]], dim=2)      # [b, kv_heads, (step + 1) n, hd]
                values = torch.cat([value for _, value in past[index]], dim=2)
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)

            hidden, _ = decoder_stack(list(self.layers), self.fuse(token_ids, prev_features), self.rotary_emb,
                                      positions, self.num_heads, self.kv_heads, self.head_dim, attend)
            outputs.append(self.norm(hidden))
            prev_features = shift_features(outputs[-1])
        return torch.stack(outputs)


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

    @property
    def target_layers(self) -> tuple[int, ...] | None:
        return self.net.target_layers

    @torch.inference_mode()
    def target_feature(self, states: torch.Tensor) -> torch.Tensor:
        """[n, k * d] the target's states at `target_layers` (final hidden state: [n, d]) -> [n, d] features."""
        return self.net.target_feature(states).to(self.dtype)

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
