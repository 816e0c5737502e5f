"""XLA attention for a few queries over a long key axis (decode steps), CPU-friendly.

Written as einsum("bskgd,btkd->..."), attention makes XLA's CPU dot move the
batch dims first, copying every [B, T, K, D] cache layer into [B, K, T, D] for
keys and again for values on every decode step. Here all kv heads are
contracted at once against a block-diagonal query matrix, so keys and values
are read in place as [B, T, K·D] by one batched matmul each. That costs K times
the FLOPs of the per-head form: negligible while S·H (queries × heads) is small,
which `use_few_query_path` checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_QUERY_HEADS = 64  # S·H at or below which the block-diagonal form pays off


def use_few_query_path(q_BSHD: jax.Array, k_BTKD: jax.Array) -> bool:
  s, h = q_BSHD.shape[1:3]
  return s * h <= MAX_QUERY_HEADS and k_BTKD.shape[1] > s and jax.default_backend() == "cpu"


def few_query_attention(q_BSHD, k_BTKD, v_BTKD, mask_BST, scale):
  """Same result as the plain XLA attention (fully masked rows give zeros)."""
  b, s, h, d = q_BSHD.shape
  t, kv_heads = k_BTKD.shape[1], k_BTKD.shape[2]
  g = h // kv_heads
  eye_KJ = jnp.eye(kv_heads, dtype=q_BSHD.dtype)
  # q_BCN[b, (k, d), (j, s, g)] = q[b, s, k·g + g', d] if k == j else 0.
  q_BCN = jnp.einsum("bskgd,kj->bkdjsg", q_BSHD.reshape(b, s, kv_heads, g, d), eye_KJ)
  q_BCN = q_BCN.reshape(b, kv_heads * d, kv_heads * s * g)
  logits_BTN = jnp.einsum(
    "btc,bcn->btn", k_BTKD.reshape(b, t, kv_heads * d), q_BCN, preferred_element_type=jnp.float32
  )
  logits_BTKSG = logits_BTN.reshape(b, t, kv_heads, s, g) * scale
  mask_BT1S1 = jnp.transpose(mask_BST, (0, 2, 1))[:, :, None, :, None]
  logits_BTKSG = jnp.where(mask_BT1S1, logits_BTKSG, jnp.finfo(jnp.float32).min)
  probs_BTKSG = jnp.where(mask_BT1S1, jax.nn.softmax(logits_BTKSG, axis=1), 0.0)
  out_BNC = jnp.einsum(
    "btn,btc->bnc",
    probs_BTKSG.reshape(b, t, kv_heads * s * g).astype(v_BTKD.dtype),
    v_BTKD.reshape(b, t, kv_heads * d),
    preferred_element_type=jnp.float32,
  )
  out_BSKGD = jnp.einsum(
    "bksgjd,kj->bskgd", out_BNC.reshape(b, kv_heads, s, g, kv_heads, d), eye_KJ.astype(jnp.float32)
  )
  return out_BSKGD.reshape(b, s, h, d).astype(q_BSHD.dtype)
