"""The one attention entry point of `adaptive`.

Every model calls `attention(...)`; the implementation behind it is chosen by
`impl`. Shapes use these letters:

  B batch, S query length, T key/value length, H query heads,
  K key/value heads (H % K == 0; K == H is multi-head, K == 1 multi-query),
  D head dimension.

Masking is expressed with positions and segment ids rather than a dense mask,
so the same call serves training (packed sequences), prefill and decoding over
a KV cache, and so fused kernels never materialise an [S, T] mask:

  * a query attends to a key only if their segment ids are equal;
  * with `causal=True`, only if key_position <= query_position;
  * with `sliding_window=W`, only if query_position - key_position < W.

A query that can see no key at all returns zeros (and zero gradients).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Impl = Literal["auto", "xla"]
IMPLS = ("auto", "xla")


def _default_positions(batch: int, length: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def visibility_mask(
    q_positions_BS: jax.Array,
    kv_positions_BT: jax.Array,
    q_segment_ids_BS: jax.Array | None,
    kv_segment_ids_BT: jax.Array | None,
    *,
    causal: bool,
    sliding_window: int | None,
) -> jax.Array:
  """Boolean [B, S, T]: True where query s may attend to key t."""
  b, s = q_positions_BS.shape
  t = kv_positions_BT.shape[1]
  mask_BST = jnp.ones((b, s, t), dtype=bool)
  if q_segment_ids_BS is not None:
    mask_BST &= q_segment_ids_BS[:, :, None] == kv_segment_ids_BT[:, None, :]
  delta_BST = q_positions_BS[:, :, None] - kv_positions_BT[:, None, :]
  if causal:
    mask_BST &= delta_BST >= 0
  if sliding_window is not None:
    mask_BST &= delta_BST < sliding_window
  return mask_BST


def _xla_attention(q_BSHD, k_BTKD, v_BTKD, mask_BST, scale):
  """Grouped-query attention in plain XLA without repeating K/V in memory."""
  b, s, h, d = q_BSHD.shape
  num_kv_heads = k_BTKD.shape[2]
  group = h // num_kv_heads
  q_BSKGD = q_BSHD.reshape(b, s, num_kv_heads, group, d)
  logits_BKGST = jnp.einsum(
      "bskgd,btkd->bkgst", q_BSKGD, k_BTKD,
      preferred_element_type=jnp.float32) * scale
  mask_B11ST = mask_BST[:, None, None, :, :]
  # A finite "minus infinity" keeps fully masked rows free of NaNs; those rows
  # are zeroed explicitly below so every implementation agrees on them.
  logits_BKGST = jnp.where(mask_B11ST, logits_BKGST, jnp.finfo(jnp.float32).min)
  probs_BKGST = jax.nn.softmax(logits_BKGST, axis=-1)
  probs_BKGST = jnp.where(mask_B11ST, probs_BKGST, 0.0)
  out_BSKGD = jnp.einsum(
      "bkgst,btkd->bskgd", probs_BKGST.astype(v_BTKD.dtype), v_BTKD,
      preferred_element_type=jnp.float32)
  return out_BSKGD.reshape(b, s, h, d).astype(q_BSHD.dtype)


def attention(
    q_BSHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    *,
    causal: bool,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    impl: Impl = "auto",
) -> jax.Array:
  """Scaled dot-product attention with GQA, causality by position and segments.

  Args:
    q_BSHD: queries [B, S, H, D].
    k_BTKD: keys [B, T, K, D]; H must be a multiple of K.
    v_BTKD: values [B, T, K, D].
    causal: mask keys whose position is after the query's position.
    segment_ids: int [B, S] segment of each query (packed sequences). When
      `kv_segment_ids` is None and S == T they are also the keys' segments.
    positions: int [B, S] position of each query; default 0..S-1.
    kv_segment_ids: int [B, T] segment of each key.
    kv_positions: int [B, T] position of each key; default 0..T-1.
    sliding_window: if set, a query sees only keys fewer than this many
      positions behind it.
    scale: logit scale; default 1/sqrt(D).
    impl: "xla" (plain XLA) or "auto" (the best available for the backend).

  Returns:
    [B, S, H, D] in the dtype of `q_BSHD`; rows with no visible key are zero.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r}; allowed: {IMPLS}")
  b, s, h, d = q_BSHD.shape
  t, num_kv_heads = k_BTKD.shape[1], k_BTKD.shape[2]
  if k_BTKD.shape != v_BTKD.shape or k_BTKD.shape[0] != b or k_BTKD.shape[3] != d:
    raise ValueError(
        f"attention: q {q_BSHD.shape}, k {k_BTKD.shape}, v {v_BTKD.shape} do not"
        " fit [B, S, H, D], [B, T, K, D], [B, T, K, D]")
  if h % num_kv_heads:
    raise ValueError(f"attention: {h} query heads not a multiple of {num_kv_heads} kv heads")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"attention sliding_window={sliding_window}; must be >= 1 or None")
  if (segment_ids is None) != (kv_segment_ids is None) and s != t:
    raise ValueError("attention: give both segment_ids and kv_segment_ids when S != T")
  if positions is None:
    positions = _default_positions(b, s)
  if kv_positions is None:
    kv_positions = positions if s == t else _default_positions(b, t)
  if segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = segment_ids
  if kv_segment_ids is not None and segment_ids is None:
    segment_ids = kv_segment_ids
  scale = d ** -0.5 if scale is None else scale
  mask_BST = visibility_mask(
      positions, kv_positions, segment_ids, kv_segment_ids,
      causal=causal, sliding_window=sliding_window)
  return _xla_attention(q_BSHD, k_BTKD, v_BTKD, mask_BST, scale)
