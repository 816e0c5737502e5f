"""XLA attention for a few queries over a long key axis (decode steps), CPU-friendly.

Written as einsum("bskgd,btkd->..."), attention makes XLA's CPU dot move the
batch dims first, copying every [B, T, K, D] cache layer into [B, K, T, D] for
keys and again for values on every decode step. Here all kv heads are
contracted at once against a block-diagonal query matrix, so keys and values
are read in place as [B, T, K·D] by one batched matmul each. That costs K times
the FLOPs of the per-head form: negligible while S·H (queries × heads) is small,
which `use_few_query_path` checks.

`attention_before_cache_write` is the decode-step form: it attends over the cache as it was
plus this step's new keys, so the cache write can come after the read and update in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_QUERY_HEADS = 64  # S·H at or below which the block-diagonal form pays off


def use_few_query_path(q_BSHD: jax.Array, k_BTKD: jax.Array) -> bool:
  s, h = q_BSHD.shape[1:3]
  return s * h <= MAX_QUERY_HEADS and k_BTKD.shape[1] > s and jax.default_backend() == "cpu"


def _cache_logits(q_BSHD, k_BTKD, scale):
  """Logits float32 [B, T, K, S, G] of every query against the keys read in place."""
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
  return logits_BTN.reshape(b, t, kv_heads, s, g) * scale


def _cache_values(probs_BTKSG, v_BTKD):
  """Σ_t probs · v float32 [B, S, K, G, D], the values read in place as [B, T, K·D]."""
  b, t, kv_heads, s, g = probs_BTKSG.shape
  d = v_BTKD.shape[-1]
  out_BNC = jnp.einsum(
    "btn,btc->bnc",
    probs_BTKSG.reshape(b, t, kv_heads * s * g).astype(v_BTKD.dtype),
    v_BTKD.reshape(b, t, kv_heads * d),
    preferred_element_type=jnp.float32,
  )
  eye_KJ = jnp.eye(kv_heads, dtype=jnp.float32)
  return jnp.einsum("bksgjd,kj->bskgd", out_BNC.reshape(b, kv_heads, s, g, kv_heads, d), eye_KJ)


def _masked_softmax(logits_BTKSG, mask_BST):
  """Softmax over the key axis (1) where mask_BST allows; fully masked rows give zeros."""
  mask_BT1S1 = jnp.transpose(mask_BST, (0, 2, 1))[:, :, None, :, None]
  logits_BTKSG = jnp.where(mask_BT1S1, logits_BTKSG, jnp.finfo(jnp.float32).min)
  return jnp.where(mask_BT1S1, jax.nn.softmax(logits_BTKSG, axis=1), 0.0)


def few_query_attention(q_BSHD, k_BTKD, v_BTKD, mask_BST, scale):
  """Same result as the plain XLA attention (fully masked rows give zeros)."""
  probs_BTKSG = _masked_softmax(_cache_logits(q_BSHD, k_BTKD, scale), mask_BST)
  return _cache_values(probs_BTKSG, v_BTKD).reshape(q_BSHD.shape).astype(q_BSHD.dtype)


def attention_before_cache_write(
  q_BSHD, k_BTKD, v_BTKD, k_BSKD, v_BSKD, positions_BS, *, sliding_window, scale
):
  """Causal attention over a cache as if k_BSKD / v_BSKD were already written into it.

  Equal to writing the new keys and values at `positions_BS` (`models.kv_cache.write`: slot
  = position; a negative one wraps as an index, one outside [-T, T) is dropped) and then
  calling `few_query_attention` over the cache with key positions 0..T-1 (causal by position,
  optional sliding window), but it reads only the cache as it was: the slots this call does
  not overwrite, plus the new keys themselves. Written first, the cache is read right after
  its in-place update, and XLA (CPU) can copy whole cache layers per decode step to do that (at
  batch 1 it copied each layer's keys and values 4 times); written after this (see
  `models.kv_cache.after`), it is updated in place.

  q_BSHD [B, S, H, D]; k_BTKD, v_BTKD [B, T, K, D] the cache before the write; k_BSKD,
  v_BSKD [B, S, K, D] the new keys and values; positions_BS int [B, S], distinct slots within
  a row. Returns [B, S, H, D] in the dtype of q; queries that see no key give 0.
  """
  b, s = positions_BS.shape
  t = k_BTKD.shape[1]
  rows_BS = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
  written_BT = jnp.zeros((b, t), bool).at[rows_BS, positions_BS].set(True, mode="drop")
  # A new key sits at the slot the write puts it in (a negative position wraps, as an index).
  slot_BS = jnp.where(positions_BS < 0, positions_BS + t, positions_BS)
  slots_BT = jnp.broadcast_to(jnp.arange(t, dtype=positions_BS.dtype), (b, t))
  keys_BU = jnp.concatenate([slots_BT, slot_BS], axis=1)  # U = T + S key positions
  delta_BSU = positions_BS[:, :, None] - keys_BU[:, None, :]
  landed_BS = (slot_BS >= 0) & (slot_BS < t)
  mask_BSU = (delta_BSU >= 0) & jnp.concatenate([~written_BT, landed_BS], axis=1)[:, None]
  if sliding_window is not None:
    mask_BSU &= delta_BSU < sliding_window
  q_BSKGD = q_BSHD.reshape(b, s, k_BSKD.shape[2], -1, q_BSHD.shape[-1])
  new_logits_BSKSG = (
    jnp.einsum("bskgd,bukd->buksg", q_BSKGD, k_BSKD, preferred_element_type=jnp.float32) * scale
  )
  logits_BUKSG = jnp.concatenate([_cache_logits(q_BSHD, k_BTKD, scale), new_logits_BSKSG], axis=1)
  probs_BUKSG = _masked_softmax(logits_BUKSG, mask_BSU)
  out_BSKGD = _cache_values(probs_BUKSG[:, :t], v_BTKD) + jnp.einsum(
    "buksg,bukd->bskgd",
    probs_BUKSG[:, t:].astype(v_BSKD.dtype),
    v_BSKD,
    preferred_element_type=jnp.float32,
  )
  return out_BSKGD.reshape(q_BSHD.shape).astype(q_BSHD.dtype)
