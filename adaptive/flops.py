"""Compute accounting: FLOPs a model executes, from its config and routing statistics.

Counts multiply-adds as 2 FLOPs. Conventions (DESIGN.md, "Compute accounting"):

  forward = 2 · tokens · (matmul parameters per token)          linear layers
          + 2 · B · L² · H · Dh per attention layer              causal QKᵀ and AV
          + 2 · tokens · D · V                                   LM head
  training = 3 × forward                                         backward ≈ 2 × forward

Embedding lookups, norms, activations and softmax are not counted. Causal
attention counts half of the L×L score matrix. With a sliding window W < L the
visible keys per query are about W, so the attention term uses L·W instead of
L²/2 (times two). Any object with the attributes of `models.transformer.Config`
works: this module never imports `models`.
"""

from __future__ import annotations

from typing import Any

TRAIN_MULTIPLIER = 3.0


def attention_projection_params(config: Any) -> int:
  """Parameters of q, k, v and o projections of one layer (biases ignored)."""
  q_and_o = 2 * config.dim * config.num_heads * config.head_dim
  k_and_v = 2 * config.dim * config.num_kv_heads * config.head_dim
  return q_and_o + k_and_v


def mlp_params(config: Any, mlp_dim: int | None = None) -> int:
  """Parameters of one SwiGLU MLP (gate, up, down)."""
  return 3 * config.dim * (config.mlp_dim if mlp_dim is None else mlp_dim)


def attention_score_flops(config: Any, batch: int, seq_len: int) -> float:
  """FLOPs of QKᵀ and AV of one causal attention layer over `seq_len` tokens."""
  # Full (non-causal) attention: 2 matmuls × 2 FLOPs × B·L·L·H·Dh; causal keeps half.
  window = getattr(config, "sliding_window", None)
  if window is None or window >= seq_len:
    visible_pairs = seq_len * seq_len / 2
  else:
    visible_pairs = seq_len * window - window * window / 2
  return 4.0 * batch * visible_pairs * config.num_heads * config.head_dim


def lm_head_flops(config: Any, tokens: int) -> float:
  return 2.0 * tokens * config.dim * config.vocab_size


def dense_forward_flops(config: Any, batch: int, seq_len: int) -> float:
  """Forward FLOPs of the dense transformer on a [batch, seq_len] batch."""
  tokens = batch * seq_len
  per_layer = (2.0 * tokens * (attention_projection_params(config) + mlp_params(config))
               + attention_score_flops(config, batch, seq_len))
  return config.num_layers * per_layer + lm_head_flops(config, tokens)


def dense_train_flops(config: Any, batch: int, seq_len: int) -> float:
  """Training (forward + backward) FLOPs of one dense step on [batch, seq_len]."""
  return TRAIN_MULTIPLIER * dense_forward_flops(config, batch, seq_len)


def executed_train_flops(config: Any, batch: int, seq_len: int,
                         metrics: dict[str, float] | None = None) -> float:
  """Training FLOPs the model actually executes on one [batch, seq_len] step.

  `metrics` are the scalar routing statistics the model reported in
  `aux["metrics"]` (realised skip fractions and the like); adaptive variants
  use them, the dense model ignores them.
  """
  del metrics  # The dense model executes every layer on every token.
  return dense_train_flops(config, batch, seq_len)
