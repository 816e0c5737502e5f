"""Flash attention for GPU: Pallas kernels lowered through Triton.

Layout stays [B, S, H, D]: a query tile is q[b, i*bq:(i+1)*bq, h, :] (a strided
block with the head squeezed), and keys come from kv head h // (H/K), so GQA
and MQA read K/V once per query head without copying them.

Kernels (each program holds one tile in registers and loops over the other
axis inside the kernel, from the tile range of `flash_common.block_ranges`):
  forward  grid (S/bq, B, H):  online softmax over key tiles -> O, lse.
  dq       grid (S/bq, B, H):  dq = scale * sum_j dS_ij K_j.
  dk/dv    grid (T/bkv, B, K): loops over the H/K query heads of the kv head
           and over query tiles; q and dO are viewed as [B, S, K, (H/K)*D]
           so one block holds a kv head's whole group.

`interpret=True` runs the same kernels through the Pallas HLO interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.flash_common import NEG_INF, backward_delta, block_ranges, visible

# jax <= 0.4.3x called it TritonCompilerParams.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams


def _dot_nt(a, b):
  """a [m, d] @ b[n, d]^T in float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  """a [m, n] @ b [n, d] in float32."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


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
  *,
  cfg,
):
  i = pl.program_id(0)
  bkv = cfg.blocks.block_kv
  q = q_ref[...]  # [bq, D]
  q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]
  bq, d = q.shape

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * bkv, bkv)
    s = _dot_nt(q, k_ref[keys, :]) * cfg.scale  # [bq, bkv]
    mask = visible(
      q_pos,
      kv_pos_ref[keys][None, :],
      q_seg,
      kv_seg_ref[keys][None, :],
      causal=cfg.causal,
      window=cfg.window,
    )
    s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    l = alpha * l + jnp.sum(p, axis=1)
    v = v_ref[keys, :]
    acc = acc * alpha[:, None] + _dot_nn(p.astype(v.dtype), v)
    return acc, m_new, l

  init = (
    jnp.zeros((bq, d), jnp.float32),
    jnp.full((bq,), NEG_INF, jnp.float32),
    jnp.zeros((bq,), jnp.float32),
  )
  acc, m, l = lax.fori_loop(kv_lo_ref[i], kv_hi_ref[i], body, init)
  seen = l > 0.0
  o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


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
  *,
  cfg,
):
  i = pl.program_id(0)
  bkv = cfg.blocks.block_kv_bwd
  q, do = q_ref[...], do_ref[...]  # [bq, D]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]

  def body(j, dq):
    keys = pl.ds(j * bkv, bkv)
    k = k_ref[keys, :]
    s = _dot_nt(q, k) * cfg.scale
    mask = visible(
      q_pos,
      kv_pos_ref[keys][None, :],
      q_seg,
      kv_seg_ref[keys][None, :],
      causal=cfg.causal,
      window=cfg.window,
    )
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    ds = p * (_dot_nt(do, v_ref[keys, :]) - delta)
    return dq + _dot_nn(ds.astype(k.dtype), k)

  dq = lax.fori_loop(kv_lo_ref[i], kv_hi_ref[i], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


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
  *,
  cfg,
  groups,
  head_dim,
  q_len,
):
  j = pl.program_id(0)
  bq = cfg.blocks.block_q_bwd
  k, v = k_ref[...], v_ref[...]  # [bkv, D]
  kv_pos, kv_seg = kv_pos_ref[...][:, None], kv_seg_ref[...][:, None]

  def body(g, i, carry):
    dk, dv = carry
    rows, cols = pl.ds(i * bq, bq), pl.ds(g * head_dim, head_dim)
    q, do = q_ref[rows, cols], do_ref[rows, cols]  # [bq, D]
    lse = lse_ref[pl.ds(g * q_len + i * bq, bq)][None, :]
    delta = delta_ref[pl.ds(g * q_len + i * bq, bq)][None, :]
    s_t = _dot_nt(k, q) * cfg.scale  # [bkv, bq]
    mask_t = visible(
      q_pos_ref[rows][None, :],
      kv_pos,
      q_seg_ref[rows][None, :],
      kv_seg,
      causal=cfg.causal,
      window=cfg.window,
    )
    p_t = jnp.where(mask_t, jnp.exp(s_t - lse), 0.0)
    dv = dv + _dot_nn(p_t.astype(do.dtype), do)
    ds_t = p_t * (_dot_nt(v, do) - delta)
    dk = dk + _dot_nn(ds_t.astype(q.dtype), q)
    return dk, dv

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  for g in range(groups):
    carry = lax.fori_loop(q_lo_ref[j], q_hi_ref[j], functools.partial(body, g), carry)
  dk, dv = carry
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(cfg):
  return _CompilerParams(num_warps=cfg.blocks.num_warps, num_stages=cfg.blocks.num_stages)


def _ids_specs(q_block, kv_block):
  """BlockSpecs of (q_pos, q_seg, kv_pos, kv_seg) given tile lengths."""
  q_spec = pl.BlockSpec((None, q_block[0]), q_block[1])
  kv_spec = pl.BlockSpec((None, kv_block[0]), kv_block[1])
  return [q_spec, q_spec, kv_spec, kv_spec]


def forward(q, k, v, ids, cfg):
  """q [B,S,H,D], k/v [B,T,K,D] padded -> (o [B,S,H,D], lse [B,H,S] f32)."""
  b, s, h, d = q.shape
  t, kv_heads = k.shape[1], k.shape[2]
  group = h // kv_heads
  bq, bkv = cfg.blocks.block_q, cfg.blocks.block_kv
  kv_lo, kv_hi, _, _ = block_ranges(ids, bq, bkv, causal=cfg.causal, window=cfg.window)
  q_pos, kv_pos, q_seg, kv_seg = ids
  nq = s // bq
  range_spec = pl.BlockSpec((None, nq), lambda i, b_, h_: (b_, 0))
  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0))
  kv_spec = pl.BlockSpec((None, t, None, d), lambda i, b_, h_: (b_, 0, h_ // group, 0))
  ids_specs = _ids_specs((bq, lambda i, b_, h_: (b_, i)), (t, lambda i, b_, h_: (b_, 0)))
  return pl.pallas_call(
    functools.partial(_forward_kernel, cfg=cfg),
    grid=(nq, b, h),
    in_specs=[range_spec, range_spec, q_spec, kv_spec, kv_spec] + ids_specs,
    out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i))],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((b, h, s), jnp.float32),
    ],
    compiler_params=_params(cfg),
    interpret=cfg.interpret,
    name="flash_fwd_gpu",
  )(kv_lo, kv_hi, q, k, v, q_pos, q_seg, kv_pos, kv_seg)


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

  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0))
  kv_spec = pl.BlockSpec((None, t, None, d), lambda i, b_, h_: (b_, 0, h_ // group, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i))
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, cfg=cfg),
    grid=(nq, b, h),
    in_specs=[pl.BlockSpec((None, nq), lambda i, b_, h_: (b_, 0))] * 2
    + [q_spec, q_spec, row_spec, row_spec, kv_spec, kv_spec]
    + _ids_specs((bq, lambda i, b_, h_: (b_, i)), (t, lambda i, b_, h_: (b_, 0))),
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_params(cfg),
    interpret=cfg.interpret,
    name="flash_dq_gpu",
  )(kv_lo, kv_hi, q, do, lse, delta, k, v, q_pos, q_seg, kv_pos, kv_seg)

  # View a kv head's query heads as one [S, group*D] block (free reshapes).
  q_grp = q.reshape(b, s, kv_heads, group * d)
  do_grp = do.reshape(b, s, kv_heads, group * d)
  lse_grp = lse.reshape(b, kv_heads, group * s)
  delta_grp = delta.reshape(b, kv_heads, group * s)
  grp_spec = pl.BlockSpec((None, s, None, group * d), lambda j, b_, k_: (b_, 0, k_, 0))
  grp_row_spec = pl.BlockSpec((None, None, group * s), lambda j, b_, k_: (b_, k_, 0))
  kv_tile_spec = pl.BlockSpec((None, bkv, None, d), lambda j, b_, k_: (b_, j, k_, 0))
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, cfg=cfg, groups=group, head_dim=d, q_len=s),
    grid=(nk, b, kv_heads),
    in_specs=[pl.BlockSpec((None, nk), lambda j, b_, k_: (b_, 0))] * 2
    + [grp_spec, grp_spec, grp_row_spec, grp_row_spec, kv_tile_spec, kv_tile_spec]
    + _ids_specs((s, lambda j, b_, k_: (b_, 0)), (bkv, lambda j, b_, k_: (b_, j))),
    out_specs=[kv_tile_spec, kv_tile_spec],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=_params(cfg),
    interpret=cfg.interpret,
    name="flash_dkv_gpu",
  )(q_lo, q_hi, q_grp, do_grp, lse_grp, delta_grp, k, v, q_pos, q_seg, kv_pos, kv_seg)
  return dq, dk, dv
