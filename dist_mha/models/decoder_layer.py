"""One decoder layer of the Llama/Gemma families: pre-norm attention and gated MLP, TP end to end.

Shape legend: B batch, T sequence (T/tp per rank under sequence parallelism), E features.

    x -> attn_norm -> GroupQueryAttention (RoPE, heads split) [-> attn_out_norm] -> + x
      -> mlp_norm -> GatedMLP (column- then row-parallel) [-> mlp_out_norm] -> +

The bracketed norms are Gemma2's "sandwich" norms (its `post_attention_layernorm`
and `post_feedforward_layernorm`); Llama-style layers have only the two pre-norms.
Per call: one all-reduce forward and one backward in each sublayer, as in
`TransformerBlock`.
"""

from __future__ import annotations

from torch import nn


class DecoderLayer(nn.Module):
    """Pre-norm residual attention + MLP, with optional post-sublayer norms.

    Args:
        attention: a `GroupQueryAttention` (or any module called as
            `attention(h, h, use_causal_mask=True, **extras)`).
        mlp: a `GatedMLP` (or any `(B, T, E) -> (B, T, E)` module).
        attn_norm, mlp_norm: the norms before each sublayer.
        attn_out_norm, mlp_out_norm: optional norms of each sublayer's output (Gemma2).

    Call arguments:
        x: `(B, T, E)` (`(B, T/tp, E)` under sequence parallelism, this rank's part under CP).
        segment_ids: optional int `(B, T)` document ids of packed rows (global).
        position_ids: optional int `(B, T)` rotary positions (global).
        cache: optional `KVCache` of `attention`.

    Returns:
        A tensor shaped like `x`.
    """

    def __init__(self, attention, mlp, *, attn_norm, mlp_norm, attn_out_norm=None, mlp_out_norm=None):
        super().__init__()
        self.attn_norm, self.attention, self.attn_out_norm = attn_norm, attention, attn_out_norm
        self.mlp_norm, self.mlp, self.mlp_out_norm = mlp_norm, mlp, mlp_out_norm

    def forward(self, x, *, segment_ids=None, position_ids=None, cache=None):
        extras = {k: v for k, v in (("segment_ids", segment_ids), ("position_ids", position_ids), ("cache", cache))
                  if v is not None}
        h = self.attn_norm(x)
        h = self.attention(h, h, use_causal_mask=True, **extras)
        if self.attn_out_norm is not None:
            h = self.attn_out_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.mlp_out_norm is not None:
            h = self.mlp_out_norm(h)
        return x + h
