"""What the TPU and GPU flash-attention kernels share, in plain JAX.

* `visible`: the masking rule, written on broadcastable position/segment tiles
  so one function serves [bq, bkv] tiles and transposed [bkv, bq] tiles.
* `block_ranges`: for every query tile the contiguous range of key tiles that
  can hold a visible key (and the converse for the dk/dv kernel), from the
  per-tile min/max of positions and segment ids. Kernels loop (GPU) or clamp
  their DMAs (TPU) to that range, so causal/windowed/packed attention skips
  fully masked tiles for any positions, sorted or not (routed tokens).
* `flash_attention`: padding to whole tiles, the `jax.custom_vjp` with
  logsumexp residuals, and the backward's delta = rowsum(dO * O) - dlse.

Padding: padded queries get segment id Q_PAD and padded keys KV_PAD, which
never match, so padded rows are fully masked (output 0, lse = -inf) and padded
keys are invisible.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sizes import BlockSizes

# Finite "minus infinity" for masked logits: exp(NEG_INF - m) underflows to 0
# and NEG_INF - NEG_INF = 0 stays finite (no NaN in fully masked rows).
NEG_INF = -0.5 * float(np.finfo(np.float32).max)
Q_PAD = np.iinfo(np.int32).min
KV_PAD = np.iinfo(np.int32).min + 1
_BIG = 1 << 30


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Static parameters of one flash-attention call (hashable)."""

  causal: bool
  window: int | None
  scale: float
  blocks: BlockSizes
  interpret: Any = False


def visible(q_pos, kv_pos, q_seg, kv_seg, *, causal: bool, window: int | None):
  """Boolean tile: True where the query may attend to the key (broadcasting)."""
  mask = q_seg == kv_seg
  if causal:
    mask = mask & (kv_pos <= q_pos)
  if window is not None:
    mask = mask & (q_pos - kv_pos < window)
  return mask


def _tile_stats(pos_BL, seg_BL, pad_id, block):
  """Per-tile (any valid, pos min, pos max, seg min, seg max), each [B, L/block]."""
  b, length = pos_BL.shape
  valid = (seg_BL != pad_id).reshape(b, length // block, block)
  pos = pos_BL.reshape(valid.shape)
  seg = seg_BL.reshape(valid.shape)
  lo = lambda x: jnp.min(jnp.where(valid, x, _BIG), axis=-1)
  hi = lambda x: jnp.max(jnp.where(valid, x, -_BIG), axis=-1)
  return jnp.any(valid, axis=-1), lo(pos), hi(pos), lo(seg), hi(seg)


def _first_last(possible_BXY):
  """[B, X] start and end (exclusive) of the True run along Y; 0, 0 if none."""
  n = possible_BXY.shape[-1]
  any_ = jnp.any(possible_BXY, axis=-1)
  first = jnp.argmax(possible_BXY, axis=-1)
  last = n - jnp.argmax(possible_BXY[..., ::-1], axis=-1)
  return (jnp.where(any_, first, 0).astype(jnp.int32), jnp.where(any_, last, 0).astype(jnp.int32))


def block_ranges(ids, block_q: int, block_kv: int, *, causal, window):
  """Tile ranges that may hold visible keys.

  Args:
    ids: (q_pos_BS, kv_pos_BT, q_seg_BS, kv_seg_BT), padded to whole tiles.

  Returns:
    kv_lo_BI, kv_hi_BI: key tiles [lo, hi) to visit for each query tile I.
    q_lo_BJ, q_hi_BJ: query tiles [lo, hi) to visit for each key tile J.
  """
  q_pos, kv_pos, q_seg, kv_seg = ids
  qa, qp0, qp1, qs0, qs1 = _tile_stats(q_pos, q_seg, Q_PAD, block_q)
  ka, kp0, kp1, ks0, ks1 = _tile_stats(kv_pos, kv_seg, KV_PAD, block_kv)
  e = lambda x: x[:, :, None]  # query tile axis
  f = lambda x: x[:, None, :]  # key tile axis
  possible = e(qa) & f(ka) & (e(qs0) <= f(ks1)) & (f(ks0) <= e(qs1))
  if causal:
    possible &= f(kp0) <= e(qp1)
  if window is not None:
    possible &= e(qp0) - f(kp1) < window
  kv_lo, kv_hi = _first_last(possible)
  q_lo, q_hi = _first_last(jnp.swapaxes(possible, 1, 2))
  return kv_lo, kv_hi, q_lo, q_hi


def backward_delta(o_BSHD, do_BSHD, dlse_BHS):
  """[B, H, S] float32 rowsum(dO * O) - dlse (dlse enters as d lse/d s = p)."""
  delta_BSH = jnp.sum(o_BSHD.astype(jnp.float32) * do_BSHD.astype(jnp.float32), -1)
  return jnp.transpose(delta_BSH, (0, 2, 1)) - dlse_BHS


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash_core(forward, backward, cfg, q, k, v, ids):
  return forward(q, k, v, ids, cfg)


def _flash_core_fwd(forward, backward, cfg, q, k, v, ids):
  o, lse = forward(q, k, v, ids, cfg)
  return (o, lse), (q, k, v, ids, o, lse)


def _flash_core_bwd(forward, backward, cfg, residuals, cotangents):
  q, k, v, ids, o, lse = residuals
  do, dlse = cotangents
  dq, dk, dv = backward(q, k, v, ids, o, lse, do, dlse, cfg)
  return dq, dk, dv, tuple(None for _ in ids)


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def flash_attention(
  q_BSHD,
  k_BTKD,
  v_BTKD,
  q_pos_BS,
  kv_pos_BT,
  q_seg_BS,
  kv_seg_BT,
  *,
  cfg: FlashConfig,
  forward: Callable,
  backward: Callable,
  head_dim_pad: int = 0,
):
  """Pads to whole tiles, runs the kernels under custom_vjp, slices back.

  `forward(q, k, v, ids, cfg) -> (o_BSHD, lse_BHS)` and
  `backward(q, k, v, ids, o, lse, do, dlse, cfg) -> (dq, dk, dv)` see padded
  arrays only. Returns (out [B, S, H, D] in q's dtype, lse [B, H, S] float32,
  -inf on rows with no visible key).
  """
  b, s, h, d = q_BSHD.shape
  t = k_BTKD.shape[1]
  blocks = cfg.blocks
  s_pad = _round_up(s, max(blocks.block_q, blocks.block_q_bwd))
  t_pad = _round_up(t, max(blocks.block_kv, blocks.block_kv_bwd))
  d_pad = d + head_dim_pad
  pad = lambda x, n, dn: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, dn)))
  q = pad(q_BSHD, s_pad - s, d_pad - d)
  k = pad(k_BTKD, t_pad - t, d_pad - d)
  v = pad(v_BTKD, t_pad - t, d_pad - d)
  pad_ids = lambda x, n, value: jnp.pad(
    x.astype(jnp.int32), ((0, 0), (0, n)), constant_values=value
  )
  ids = (
    pad_ids(q_pos_BS, s_pad - s, 0),
    pad_ids(kv_pos_BT, t_pad - t, 0),
    pad_ids(q_seg_BS, s_pad - s, Q_PAD),
    pad_ids(kv_seg_BT, t_pad - t, KV_PAD),
  )
  o, lse = _flash_core(forward, backward, cfg, q, k, v, ids)
  return o[:, :s, :, :d], lse[:, :, :s]
