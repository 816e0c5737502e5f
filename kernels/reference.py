"""Float32 einsum attention: the oracle every kernel is tested against.

Written independently of the kernels: K/V heads are repeated explicitly, the
[B, H, S, T] mask is materialised, and the softmax is done by hand in float32.
`tests/test_kernels_reference.py` checks it against `jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_mask(q_pos_BS, kv_pos_BT, q_seg_BS, kv_seg_BT, *, causal, sliding_window):
  """Boolean [B, S, T]: query s may attend to key t."""
  mask_BST = q_seg_BS[:, :, None] == kv_seg_BT[:, None, :]
  delta_BST = q_pos_BS[:, :, None] - kv_pos_BT[:, None, :]
  if causal:
    mask_BST &= delta_BST >= 0
  if sliding_window is not None:
    mask_BST &= delta_BST < sliding_window
  return mask_BST


def reference_attention(
  q_BSHD,
  k_BTKD,
  v_BTKD,
  *,
  causal,
  q_pos_BS=None,
  kv_pos_BT=None,
  q_seg_BS=None,
  kv_seg_BT=None,
  sliding_window=None,
  scale=None,
):
  """Returns (out [B, S, H, D] float32, lse [B, H, S] float32, -inf if no key is visible).

  Missing positions default to 0..S-1 / 0..T-1, missing segments to one segment.
  """
  b, s, h, d = q_BSHD.shape
  t, kv_heads = k_BTKD.shape[1], k_BTKD.shape[2]
  if q_pos_BS is None:
    q_pos_BS = jnp.broadcast_to(jnp.arange(s), (b, s))
  if kv_pos_BT is None:
    kv_pos_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
  if q_seg_BS is None:
    q_seg_BS = jnp.zeros((b, s), jnp.int32)
  if kv_seg_BT is None:
    kv_seg_BT = jnp.zeros((b, t), jnp.int32)
  scale = d**-0.5 if scale is None else scale
  k_BTHD = jnp.repeat(k_BTKD.astype(jnp.float32), h // kv_heads, axis=2)
  v_BTHD = jnp.repeat(v_BTKD.astype(jnp.float32), h // kv_heads, axis=2)
  logits_BHST = (
    jnp.einsum(
      "bshd,bthd->bhst", q_BSHD.astype(jnp.float32), k_BTHD, precision=jax.lax.Precision.HIGHEST
    )
    * scale
  )
  mask_B1ST = reference_mask(
    q_pos_BS, kv_pos_BT, q_seg_BS, kv_seg_BT, causal=causal, sliding_window=sliding_window
  )[:, None]
  logits_BHST = jnp.where(mask_B1ST, logits_BHST, -jnp.inf)
  any_BHS1 = jnp.any(mask_B1ST, axis=-1, keepdims=True)
  # The max only stabilises exp; it carries no gradient (lse' = softmax).
  max_BHS1 = jax.lax.stop_gradient(
    jnp.where(any_BHS1, jnp.max(logits_BHST, axis=-1, keepdims=True), 0.0)
  )
  weights_BHST = jnp.exp(logits_BHST - max_BHS1)
  total_BHS1 = jnp.sum(weights_BHST, axis=-1, keepdims=True)
  safe_total_BHS1 = jnp.where(any_BHS1, total_BHS1, 1.0)
  probs_BHST = weights_BHST / safe_total_BHS1
  out_BSHD = jnp.einsum("bhst,bthd->bshd", probs_BHST, v_BTHD, precision=jax.lax.Precision.HIGHEST)
  lse_BHS = jnp.where(any_BHS1, jnp.log(safe_total_BHS1) + max_BHS1, -jnp.inf)[..., 0]
  return out_BSHD, lse_BHS
