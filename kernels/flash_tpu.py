"""Flash attention for TPU: Pallas kernels lowered through Mosaic.

Mosaic tiles the last two dims of every block by (8, 128), so a [B, S, H, D]
block with a squeezed head is not expressible. With D % 128 == 0 (production
head dims 128, 256) the operands are viewed as [B, S, H*D] (free reshape) and a
head's tile is a lane-aligned (rows, D) block of it: no copies. Other head dims
are transposed to head-major [B, H, S, D] (one XLA transpose per operand,
O(BSHD) bytes against O(BS^2HD) flops). Query head h reads kv head h // (H/K)
through its index_map: GQA/MQA never repeats K/V in memory.

All three kernels walk a 4/5-d grid whose last axes are reductions that
accumulate in VMEM scratch:
  forward  (B, H, S/bq, T/bkv):            online softmax -> O, lse.
  dq       (B, H, S/bq, T/bkv):            dq = scale * sum_j dS_ij K_j.
  dk/dv    (B, K, T/bkv, H/K, S/bq):       sums over the kv head's query heads.
Tiles outside the range from `flash_common.block_ranges` (scalar-prefetched
to SMEM) skip their compute, and their index_map is clamped into the range so
Pallas re-uses the resident block instead of issuing a DMA.

Positions/segments enter as columns [B, S, 1] (one per sublane) or rows
[B, 1, S] (one per lane), whichever broadcasts against the tile being masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.flash_common import NEG_INF, backward_delta, block_ranges, visible

# jax <= 0.4.3x called it TPUCompilerParams.
_CompilerParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
_PARALLEL, _ARBITRARY = "parallel", "arbitrary"


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _dot_nt(a, b):
  """a [m, d] @ b [n, d]^T in float32."""
  return lax.dot_general(
    a,
    b,
    (((1,), (1,)), ((), ())),
    precision=_precision(a.dtype),
    preferred_element_type=jnp.float32,
  )


def _dot_nn(a, b):
  """a [m, n] @ b [n, d] in float32."""
  return lax.dot_general(
    a,
    b,
    (((1,), (0,)), ((), ())),
    precision=_precision(a.dtype),
    preferred_element_type=jnp.float32,
  )


def _clamp(x, lo, hi):
  """x clamped into [lo, hi) (to lo when the range is empty)."""
  return jnp.maximum(jnp.minimum(x, hi - 1), lo)


def _forward_kernel(
  kv_lo_ref,
  kv_hi_ref,
  q_ref,
  k_ref,
  v_ref,
  q_pos_ref,
  q_seg_ref,
  kv_pos_ref,
  kv_seg_ref,
  o_ref,
  lse_ref,
  m_scr,
  l_scr,
  acc_scr,
  *,
  cfg,
  nq,
  nk,
):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when((j >= kv_lo_ref[b * nq + i]) & (j < kv_hi_ref[b * nq + i]))
  def _step():
    s = _dot_nt(q_ref[...], k_ref[...]) * cfg.scale  # [bq, bkv]
    mask = visible(
      q_pos_ref[...],
      kv_pos_ref[...],
      q_seg_ref[...],
      kv_seg_ref[...],
      causal=cfg.causal,
      window=cfg.window,
    )
    s = jnp.where(mask, s, NEG_INF)
    m_prev = m_scr[...]  # [bq, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = alpha * acc_scr[...] + _dot_nn(p.astype(v_ref.dtype), v_ref[...])
    m_scr[...] = m_new

  @pl.when(j == nk - 1)
  def _finish():
    l = l_scr[...]
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_scr[...] / safe_l).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(safe_l), -jnp.inf)


def _dq_kernel(
  kv_lo_ref,
  kv_hi_ref,
  q_ref,
  do_ref,
  lse_ref,
  delta_ref,
  k_ref,
  v_ref,
  q_pos_ref,
  q_seg_ref,
  kv_pos_ref,
  kv_seg_ref,
  dq_ref,
  dq_scr,
  *,
  cfg,
  nq,
  nk,
):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when((j >= kv_lo_ref[b * nq + i]) & (j < kv_hi_ref[b * nq + i]))
  def _step():
    k = k_ref[...]
    s = _dot_nt(q_ref[...], k) * cfg.scale  # [bq, bkv]
    mask = visible(
      q_pos_ref[...],
      kv_pos_ref[...],
      q_seg_ref[...],
      kv_seg_ref[...],
      causal=cfg.causal,
      window=cfg.window,
    )
    p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
    ds = p * (_dot_nt(do_ref[...], v_ref[...]) - delta_ref[...])
    dq_scr[...] += _dot_nn(ds.astype(k.dtype), k)

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
  q_lo_ref,
  q_hi_ref,
  q_ref,
  do_ref,
  lse_ref,
  delta_ref,
  k_ref,
  v_ref,
  q_pos_ref,
  q_seg_ref,
  kv_pos_ref,
  kv_seg_ref,
  dk_ref,
  dv_ref,
  dk_scr,
  dv_scr,
  *,
  cfg,
  nk,
  nq,
  groups,
):
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when((i >= q_lo_ref[b * nk + j]) & (i < q_hi_ref[b * nk + j]))
  def _step():
    q, do = q_ref[...], do_ref[...]  # [bq, D]
    s_t = _dot_nt(k_ref[...], q) * cfg.scale  # [bkv, bq]
    mask_t = visible(
      q_pos_ref[...],
      kv_pos_ref[...],
      q_seg_ref[...],
      kv_seg_ref[...],
      causal=cfg.causal,
      window=cfg.window,
    )
    p_t = jnp.where(mask_t, jnp.exp(s_t - lse_ref[...]), 0.0)
    dv_scr[...] += _dot_nn(p_t.astype(do.dtype), do)
    ds_t = p_t * (_dot_nt(v_ref[...], do) - delta_ref[...])
    dk_scr[...] += _dot_nn(ds_t.astype(q.dtype), q)

  @pl.when((g == groups - 1) & (i == nq - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


class _Layout:
  """How [B, L, N, D] operands (L tokens, N heads) are shown to the kernels.

  D % 128 == 0: viewed as [B, L, N*D] (a free reshape); a (rows, D) tile of
  head n is block (row_block, n) of the last two dims, lane-aligned.
  Otherwise: transposed to head-major [B, N, L, D], tile (b, n, row_block, 0).
  """

  def __init__(self, head_dim):
    self.flat = head_dim % 128 == 0
    self.d = head_dim

  def to_kernel(self, x_BLND):
    b, l, n, d = x_BLND.shape
    return x_BLND.reshape(b, l, n * d) if self.flat else jnp.transpose(x_BLND, (0, 2, 1, 3))

  def from_kernel(self, x):
    if self.flat:
      return x.reshape(x.shape[0], x.shape[1], -1, self.d)
    return jnp.transpose(x, (0, 2, 1, 3))

  def shape(self, b, l, n, dtype):
    shape = (b, l, n * self.d) if self.flat else (b, n, l, self.d)
    return jax.ShapeDtypeStruct(shape, dtype)

  def tile(self, rows, index):
    """BlockSpec of a (rows, D) tile; index(*grid, *prefetch) -> (b, head, row block)."""
    if self.flat:
      return pl.BlockSpec((None, rows, self.d), lambda *a: _flat_index(*index(*a)))
    return pl.BlockSpec((None, None, rows, self.d), lambda *a: _head_major_index(*index(*a)))


def _flat_index(b, n, r):
  return b, r, n


def _head_major_index(b, n, r):
  return b, n, r, 0


def _call(kernel, *, grid, in_specs, out_specs, out_shape, scratch, semantics, cfg, name):
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch],
    ),
    out_shape=out_shape,
    compiler_params=_CompilerParams(dimension_semantics=semantics),
    interpret=cfg.interpret,
    name=name,
  )


def _query_major_specs(layout, bq, bkv, group, nq):
  """Specs for grids (b, h, i, j): q-like tiles, kv tiles (clamped), lse col, id col/rows."""

  def kv_block(b, i, j, lo, hi):
    return _clamp(j, lo[b * nq + i], hi[b * nq + i])

  q_spec = layout.tile(bq, lambda b, h, i, j, lo, hi: (b, h, i))
  kv_spec = layout.tile(
    bkv, lambda b, h, i, j, lo, hi: (b, lax.div(h, group), kv_block(b, i, j, lo, hi))
  )
  col_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, lo, hi: (b, h, i, 0))
  q_id_spec = pl.BlockSpec((None, bq, 1), lambda b, h, i, j, lo, hi: (b, i, 0))
  kv_id_spec = pl.BlockSpec(
    (None, 1, bkv), lambda b, h, i, j, lo, hi: (b, 0, kv_block(b, i, j, lo, hi))
  )
  return q_spec, col_spec, kv_spec, [q_id_spec, q_id_spec, kv_id_spec, kv_id_spec]


def forward(q, k, v, ids, cfg):
  """q [B,S,H,D], k/v [B,T,K,D] padded -> (o [B,S,H,D], lse [B,H,S] f32)."""
  b, s, h, d = q.shape
  t, kv_heads = k.shape[1], k.shape[2]
  bq, bkv = cfg.blocks.block_q, cfg.blocks.block_kv
  nq, nk = s // bq, t // bkv
  kv_lo, kv_hi, _, _ = block_ranges(ids, bq, bkv, causal=cfg.causal, window=cfg.window)
  q_pos, kv_pos, q_seg, kv_seg = ids
  layout = _Layout(d)
  q_spec, col_spec, kv_spec, id_specs = _query_major_specs(layout, bq, bkv, h // kv_heads, nq)
  o, lse = _call(
    functools.partial(_forward_kernel, cfg=cfg, nq=nq, nk=nk),
    grid=(b, h, nq, nk),
    in_specs=[q_spec, kv_spec, kv_spec] + id_specs,
    out_specs=[q_spec, col_spec],
    out_shape=[layout.shape(b, s, h, q.dtype), jax.ShapeDtypeStruct((b, h, s, 1), jnp.float32)],
    scratch=[(bq, 1), (bq, 1), (bq, d)],
    cfg=cfg,
    name="flash_fwd_tpu",
    semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY),
  )(
    kv_lo.reshape(-1),
    kv_hi.reshape(-1),
    layout.to_kernel(q),
    layout.to_kernel(k),
    layout.to_kernel(v),
    q_pos[:, :, None],
    q_seg[:, :, None],
    kv_pos[:, None, :],
    kv_seg[:, None, :],
  )
  return layout.from_kernel(o), lse[..., 0]


def backward(q, k, v, ids, o, lse, do, dlse, cfg):
  """Gradients (dq, dk, dv) of the padded forward, from the lse residual."""
  b, s, h, d = q.shape
  t, kv_heads = k.shape[1], k.shape[2]
  group = h // kv_heads
  bq, bkv = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd
  nq, nk = s // bq, t // bkv
  kv_lo, kv_hi, q_lo, q_hi = block_ranges(ids, bq, bkv, causal=cfg.causal, window=cfg.window)
  q_pos, kv_pos, q_seg, kv_seg = ids
  delta = backward_delta(o, do, dlse)
  layout = _Layout(d)
  q_k, do_k, k_k, v_k = (layout.to_kernel(x) for x in (q, do, k, v))

  q_spec, col_spec, kv_spec, id_specs = _query_major_specs(layout, bq, bkv, group, nq)
  dq = _call(
    functools.partial(_dq_kernel, cfg=cfg, nq=nq, nk=nk),
    grid=(b, h, nq, nk),
    in_specs=[q_spec, q_spec, col_spec, col_spec, kv_spec, kv_spec] + id_specs,
    out_specs=q_spec,
    out_shape=layout.shape(b, s, h, q.dtype),
    scratch=[(bq, d)],
    cfg=cfg,
    name="flash_dq_tpu",
    semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY),
  )(
    kv_lo.reshape(-1),
    kv_hi.reshape(-1),
    q_k,
    do_k,
    lse[..., None],
    delta[..., None],
    k_k,
    v_k,
    q_pos[:, :, None],
    q_seg[:, :, None],
    kv_pos[:, None, :],
    kv_seg[:, None, :],
  )

  def q_block(b_, j, i, lo, hi):
    return _clamp(i, lo[b_ * nk + j], hi[b_ * nk + j])

  qt_spec = layout.tile(
    bq, lambda b_, kh, j, g, i, lo, hi: (b_, kh * group + g, q_block(b_, j, i, lo, hi))
  )
  row_spec = pl.BlockSpec(
    (None, None, 1, bq),
    lambda b_, kh, j, g, i, lo, hi: (b_, kh * group + g, 0, q_block(b_, j, i, lo, hi)),
  )
  kvt_spec = layout.tile(bkv, lambda b_, kh, j, g, i, lo, hi: (b_, kh, j))
  q_row_spec = pl.BlockSpec(
    (None, 1, bq), lambda b_, kh, j, g, i, lo, hi: (b_, 0, q_block(b_, j, i, lo, hi))
  )
  kv_col_spec = pl.BlockSpec((None, bkv, 1), lambda b_, kh, j, g, i, lo, hi: (b_, j, 0))
  dk, dv = _call(
    functools.partial(_dkv_kernel, cfg=cfg, nk=nk, nq=nq, groups=group),
    grid=(b, kv_heads, nk, group, nq),
    in_specs=[
      qt_spec,
      qt_spec,
      row_spec,
      row_spec,
      kvt_spec,
      kvt_spec,
      q_row_spec,
      q_row_spec,
      kv_col_spec,
      kv_col_spec,
    ],
    out_specs=[kvt_spec, kvt_spec],
    out_shape=[layout.shape(b, t, kv_heads, k.dtype), layout.shape(b, t, kv_heads, v.dtype)],
    scratch=[(bkv, d), (bkv, d)],
    cfg=cfg,
    name="flash_dkv_tpu",
    semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY, _ARBITRARY),
  )(
    q_lo.reshape(-1),
    q_hi.reshape(-1),
    q_k,
    do_k,
    lse[:, :, None, :],
    delta[:, :, None, :],
    k_k,
    v_k,
    q_pos[:, None, :],
    q_seg[:, None, :],
    kv_pos[:, :, None],
    kv_seg[:, :, None],
  )
  return layout.from_kernel(dq), layout.from_kernel(dk), layout.from_kernel(dv)
