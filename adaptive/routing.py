"""Per-token routing with static shapes: expert-choice top-k, threshold routing, router losses.

Mixture-of-Depths (Raposo et al. 2024) routes, in each routed block, the k tokens
of a row with the largest router weight through the block and lets the others
pass unchanged. k is fixed before compiling (`capacity_k`), so every shape is
static. Top-k is over the whole row, whatever the segments of a packed row are
("document choice"): a packed row is one sequence to the router.

Top-k is non-causal (whether token t is in the top-k depends on later tokens),
so decoding routes each token on its own with a threshold instead: either the
router's own logit (route iff σ(r) > 0.5, trained with `router_bce_loss` against
top-k membership) or a small MLP predictor on stop_gradient(x) trained with the
same target (`predictor_logits`, `predictor_init`).

Token-choice routing with a capacity (`first_come_slots`, `dispatch_combine`)
sends each token to the option it chose, into a static buffer of C slots per
row filled in position order; tokens past the capacity are dropped. It is
causal, and an option's compute is that of C tokens per row. The slots its
choosers leave spare can carry other tokens (`fill_spare_slots`) at no extra
cost, e.g. to give a router the gradient of options those tokens did not take.

Shapes: B batch, S sequence, K selected tokens per row (static), C slots per
row (static), D width, H predictor hidden size. Plain JAX; nothing here imports `models`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def capacity_k(capacity: float, seq_len: int) -> int:
  """Static number of tokens per row routed through a block: round(capacity·S), in [1, S]."""
  if not 0 < capacity <= 1:
    raise ValueError(f"capacity={capacity!r}: must be in (0, 1]")
  return int(min(seq_len, max(1, math.floor(capacity * seq_len + 0.5))))


class Selection(NamedTuple):
  """The k tokens of each row that a routed block processes.

  Attributes:
    indices_BK: int32 indices into the row, ascending (original order).
    mask_BS: bool, True at selected tokens (top-k membership).
    positions_BK: original positions of the selected tokens.
    segment_ids_BK: segment ids of the selected tokens, or None.
  """

  indices_BK: jax.Array
  mask_BS: jax.Array
  positions_BK: jax.Array
  segment_ids_BK: jax.Array | None


def top_k_indices(scores_BS: jax.Array, k: int) -> jax.Array:
  """Indices [B, k] of the k largest scores of each row, sorted by position (int32).

  Ties go to the earlier position. No gradient flows through the choice.
  """
  _, idx_BK = jax.lax.top_k(jax.lax.stop_gradient(scores_BS), k)
  return jnp.sort(idx_BK, axis=-1).astype(jnp.int32)


def gather_tokens(x_BS_: jax.Array, indices_BK: jax.Array) -> jax.Array:
  """x[b, indices[b, k], ...] -> [B, K, ...]."""
  return jnp.take_along_axis(
    x_BS_, indices_BK.reshape(indices_BK.shape + (1,) * (x_BS_.ndim - 2)), axis=1
  )


def scatter_tokens(x_BS_: jax.Array, updates_BK_: jax.Array, indices_BK: jax.Array) -> jax.Array:
  """x with rows indices[b, k] replaced by updates[b, k] (the inverse of `gather_tokens`)."""
  rows_BK = jnp.broadcast_to(jnp.arange(x_BS_.shape[0])[:, None], indices_BK.shape)
  return x_BS_.at[rows_BK, indices_BK].set(updates_BK_.astype(x_BS_.dtype), unique_indices=True)


def membership_mask(indices_BK: jax.Array, seq_len: int) -> jax.Array:
  """Bool [B, S]: True at the given indices."""
  b = indices_BK.shape[0]
  rows_BK = jnp.broadcast_to(jnp.arange(b)[:, None], indices_BK.shape)
  return jnp.zeros((b, seq_len), bool).at[rows_BK, indices_BK].set(True)


def expert_choice(
  scores_BS: jax.Array, k: int, positions_BS: jax.Array, segment_ids_BS: jax.Array | None = None
) -> Selection:
  """Expert-choice top-k over each row, with the selected tokens' positions and segments."""
  indices_BK = top_k_indices(scores_BS, k)
  return Selection(
    indices_BK=indices_BK,
    mask_BS=membership_mask(indices_BK, scores_BS.shape[1]),
    positions_BK=gather_tokens(positions_BS, indices_BK),
    segment_ids_BK=None if segment_ids_BS is None else gather_tokens(segment_ids_BS, indices_BK),
  )


class Slots(NamedTuple):
  """Token-choice dispatch of one option into a static buffer of C slots per row.

  Attributes:
    indices_BC: int32 row index of the token in each slot: the kept tokens
      first, ascending; then any `fill_spare_slots` tokens; 0 in unused
      slots, which `valid_BC` marks.
    valid_BC: bool, True at slots that hold a token.
    kept_BS: bool, True at tokens that asked for the option and got a slot.
  """

  indices_BC: jax.Array
  valid_BC: jax.Array
  kept_BS: jax.Array


def first_come_slots(wants_BS: jax.Array, slots: int) -> Slots:
  """Gives the first `slots` tokens of each row that want an option a slot, in order.

  First come, first served by position (the Switch/GShard capacity rule): token
  s keeps its slot iff fewer than `slots` earlier tokens of its row want the
  option, so the decision is causal (it never depends on later tokens), unlike
  expert-choice top-k. Tokens past the capacity are dropped (`kept_BS` False).
  """
  b, s = wants_BS.shape
  rank_BS = jnp.cumsum(wants_BS.astype(jnp.int32), axis=1) - 1
  kept_BS = wants_BS & (rank_BS < slots)
  slot_BS = jnp.where(kept_BS, rank_BS, slots)  # Out of range: dropped by the scatter.
  rows_BS = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
  positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  indices_BC = jnp.zeros((b, slots), jnp.int32).at[rows_BS, slot_BS].set(positions_BS, mode="drop")
  valid_BC = jnp.arange(slots)[None, :] < jnp.sum(kept_BS, axis=1, keepdims=True)
  return Slots(indices_BC, valid_BC, kept_BS)


def fill_spare_slots(slots_: Slots, score_BS: jax.Array, eligible_BS: jax.Array) -> Slots:
  """Gives the slots the kept tokens leave unused to the eligible tokens of highest score.

  A dispatched option computes C slots per row whatever fills them, so the
  spare ones cost nothing extra. `kept_BS` is unchanged: a filler is not a
  token that took the option (combine it with weight 0 in the forward, e.g. a
  straight-through weight, and it only probes the option for the gradient).
  Eligible tokens must not be kept ones. No gradient flows through the choice.
  """
  b, c = slots_.indices_BC.shape
  masked_BS = jnp.where(eligible_BS, jax.lax.stop_gradient(score_BS).astype(jnp.float32), -jnp.inf)
  best_BC = jax.lax.top_k(masked_BS, c)[1].astype(jnp.int32)  # Best first.
  n_kept_B1 = jnp.sum(slots_.kept_BS, axis=1, keepdims=True)
  rank_BC = jnp.maximum(jnp.arange(c)[None, :] - n_kept_B1, 0)  # Filler rank of each slot.
  filler_BC = jnp.take_along_axis(best_BC, rank_BC, axis=1)
  spare_BC = ~slots_.valid_BC
  fills_BC = spare_BC & jnp.take_along_axis(eligible_BS, filler_BC, axis=1)
  return Slots(
    indices_BC=jnp.where(spare_BC, filler_BC, slots_.indices_BC),
    valid_BC=slots_.valid_BC | fills_BC,
    kept_BS=slots_.kept_BS,
  )


def dispatch_combine(fn, x_BSD: jax.Array, slots_: Slots, weights_BS: jax.Array) -> jax.Array:
  """Σ over slotted tokens of weight · fn(x) written back at their rows; 0 elsewhere.

  `fn` maps [B, C, D] -> [B, C, D'] and runs on the C slotted tokens per row
  only (so its cost is C/S of running it on every token). Returns [B, S, D']
  in fn's dtype; unused slots contribute nothing (their scatter is dropped).
  """
  b, s = x_BSD.shape[:2]
  y_BCD = fn(gather_tokens(x_BSD, slots_.indices_BC))
  w_BC = gather_tokens(weights_BS, slots_.indices_BC)
  rows_BC = jnp.broadcast_to(jnp.arange(b)[:, None], slots_.indices_BC.shape)
  target_BC = jnp.where(slots_.valid_BC, slots_.indices_BC, s)  # Unused slots: dropped.
  update_BCD = (w_BC[..., None] * y_BCD.astype(jnp.float32)).astype(y_BCD.dtype)
  return (
    jnp.zeros((b, s) + y_BCD.shape[2:], y_BCD.dtype)
    .at[rows_BC, target_BC]
    .add(update_BCD, mode="drop")
  )


def threshold_route(logits_BS: jax.Array) -> jax.Array:
  """Token-choice decision for decoding: σ(logit) > 0.5, i.e. logit > 0 (bool)."""
  return logits_BS > 0


def bce_with_logits(
  logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
  """Mean binary cross-entropy of float32 logits against {0, 1} targets (optionally weighted)."""
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  per = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  if weights is None:
    return jnp.mean(per)
  weights = weights.astype(jnp.float32)
  return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def router_bce_loss(
  router_logits_BS: jax.Array, selected_BS: jax.Array, weights_BS: jax.Array | None = None
) -> jax.Array:
  """Auxiliary loss on the router's own logits: BCE to top-k membership.

  The gradient reaches the router; route at decode time with `threshold_route`.
  """
  return bce_with_logits(router_logits_BS, jax.lax.stop_gradient(selected_BS), weights_BS)


def predictor_init(key: jax.Array, dim: int, hidden: int, dtype=jnp.float32) -> dict:
  """Parameters of the MoD predictor MLP: D -> H (ReLU) -> 1."""
  k1, k2 = jax.random.split(key)
  return {
    "w1_DH": jax.random.normal(k1, (dim, hidden), dtype) * dim**-0.5,
    "b1_H": jnp.zeros((hidden,), dtype),
    "w2_H": jax.random.normal(k2, (hidden,), dtype) * hidden**-0.5,
    "b2": jnp.zeros((), dtype),
  }


def predictor_logits(params: dict, x_BSD: jax.Array) -> jax.Array:
  """Logits [B, S] float32 of "this token is in the top-k", from stop_gradient(x).

  The stop-gradient keeps the predictor's loss from shaping the residual stream
  (paper: the predictor is an auxiliary classifier, not part of the model).
  """
  x = jax.lax.stop_gradient(x_BSD).astype(jnp.float32)
  h_BSH = jax.nn.relu(x @ params["w1_DH"].astype(jnp.float32) + params["b1_H"].astype(jnp.float32))
  return h_BSH @ params["w2_H"].astype(jnp.float32) + params["b2"].astype(jnp.float32)


def predictor_loss(
  params: dict, x_BSD: jax.Array, selected_BS: jax.Array, weights_BS: jax.Array | None = None
) -> jax.Array:
  """BCE of the predictor on stop_gradient(x) against top-k membership."""
  return bce_with_logits(
    predictor_logits(params, x_BSD), jax.lax.stop_gradient(selected_BS), weights_BS
  )


def routing_accuracy(logits_BS: jax.Array, selected_BS: jax.Array) -> jax.Array:
  """Fraction of tokens where the threshold decision agrees with top-k membership."""
  return jnp.mean((threshold_route(logits_BS) == selected_BS).astype(jnp.float32))
