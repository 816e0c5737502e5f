"""Decode attention: a few new query tokens per row against a KV cache.

    decode_attention(q_BQHD, k_cache_BTKD, v_cache_BTKD, lengths_B, ...)

Cache slot t holds the key at position t and is valid iff t < lengths_B[b].
Query positions default to the last Q valid slots (lengths - Q + 0..Q-1), i.e.
the new tokens were written into the cache before the call. A query sees key t
iff t is valid, (causal) t <= q_pos and (window) q_pos - t < W; a query that
sees nothing returns zeros.

Split-K ("flash decoding"): the cache axis is cut into `num_splits` chunks
that run in parallel, each producing a partial output and logsumexp; an XLA
combine step weights the partials by exp(lse_split - lse_total). Per (row,
split) only the key tiles inside [first visible, last visible] are visited.
The H/K query heads of one kv head are packed as rows of one [G*Q, D] tile, so
K/V are read once per kv head (GQA/MQA).

  GPU (Triton) grid (B, K, splits): in-kernel loop over the split's tiles.
  TPU (Mosaic) grid (B, splits, tiles): the cache is viewed as [B, T, K*D]
      (a free reshape) and one block carries every kv head, so the cache is
      read once without any transpose.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels.block_sizes import default_block_sizes, fit
from kernels.flash_common import NEG_INF

_TPUParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
_GPUParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams


def _mask(q_pos, t, length, *, causal, window):
  """q_pos [R, 1] against cache slots t [1, bkv] -> bool [R, bkv]."""
  mask = t < length
  if causal:
    mask = mask & (t <= q_pos)
  if window is not None:
    mask = mask & (q_pos - t < window)
  return mask


def _online_softmax_step(q, k, v, mask, m, l, acc, scale):
  """One key tile of the online softmax; m, l [R, 1], acc [R, D] float32."""
  prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
  s = (
    lax.dot_general(
      q, k, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
    )
    * scale
  )
  s = jnp.where(mask, s, NEG_INF)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + lax.dot_general(
    p.astype(v.dtype),
    v,
    (((1,), (0,)), ((), ())),
    precision=prec,
    preferred_element_type=jnp.float32,
  )
  return m_new, l, acc


def _finish(m, l, acc):
  seen = l > 0.0
  safe_l = jnp.where(seen, l, 1.0)
  return acc / safe_l, jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)


def _gpu_kernel(
  lo_ref,
  hi_ref,
  len_ref,
  q_ref,
  q_pos_ref,
  k_ref,
  v_ref,
  o_ref,
  lse_ref,
  *,
  scale,
  causal,
  window,
  bkv,
  chunk,
  splits,
):
  b, split = pl.program_id(0), pl.program_id(2)
  q = q_ref[...]  # [R, D]
  q_pos = q_pos_ref[...][:, None]
  length = len_ref[b]

  def body(j, carry):
    keys = pl.ds(j * bkv, bkv)
    t = (split * chunk + j * bkv + jnp.arange(bkv, dtype=jnp.int32))[None, :]
    mask = _mask(q_pos, t, length, causal=causal, window=window)
    return _online_softmax_step(q, k_ref[keys, :], v_ref[keys, :], mask, *carry, scale)

  r, d = q.shape
  init = (
    jnp.full((r, 1), NEG_INF, jnp.float32),
    jnp.zeros((r, 1), jnp.float32),
    jnp.zeros((r, d), jnp.float32),
  )
  o, lse = _finish(
    *lax.fori_loop(lo_ref[b * splits + split], hi_ref[b * splits + split], body, init)
  )
  o_ref[...] = o
  lse_ref[...] = lse[:, 0]


def _tpu_kernel(
  lo_ref,
  hi_ref,
  len_ref,
  q_ref,
  q_pos_ref,
  k_ref,
  v_ref,
  o_ref,
  lse_ref,
  m_scr,
  l_scr,
  acc_scr,
  *,
  scale,
  causal,
  window,
  bkv,
  chunk,
  splits,
  head_dim,
):
  b, split, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kv_heads = q_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when((j >= lo_ref[b * splits + split]) & (j < hi_ref[b * splits + split]))
  def _step():
    t = split * chunk + j * bkv + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
    mask = _mask(q_pos_ref[...], t, len_ref[b], causal=causal, window=window)
    for kh in range(kv_heads):
      cols = slice(kh * head_dim, (kh + 1) * head_dim)
      m, l, acc = _online_softmax_step(
        q_ref[kh], k_ref[:, cols], v_ref[:, cols], mask, m_scr[kh], l_scr[kh], acc_scr[kh], scale
      )
      m_scr[kh], l_scr[kh], acc_scr[kh] = m, l, acc

  @pl.when(j == pl.num_programs(2) - 1)
  def _done():
    for kh in range(kv_heads):
      o_ref[kh], lse_ref[kh] = _finish(m_scr[kh], l_scr[kh], acc_scr[kh])


def _tile_ranges(q_pos_BQ, lengths_B, *, causal, window, splits, chunk, bkv):
  """[B*splits] first and end tile (within each split) that may hold visible keys."""
  t_end = lengths_B
  if causal:
    t_end = jnp.minimum(t_end, jnp.max(q_pos_BQ, axis=1) + 1)
  t_begin = jnp.zeros_like(lengths_B)
  if window is not None:
    t_begin = jnp.maximum(0, jnp.min(q_pos_BQ, axis=1) - window + 1)
  offset = (jnp.arange(splits) * chunk)[None, :]
  tiles = chunk // bkv
  lo = jnp.clip((t_begin[:, None] - offset) // bkv, 0, tiles)
  hi = jnp.clip(-((offset - t_end[:, None]) // bkv), 0, tiles)
  hi = jnp.maximum(hi, lo)
  return lo.reshape(-1).astype(jnp.int32), hi.reshape(-1).astype(jnp.int32)


def _default_splits(platform, batch, kv_heads, kv_len, bkv):
  """GPU: enough programs to fill ~132 SMs twice; TPU: 2 (megacore)."""
  tiles = max(1, -(-kv_len // bkv))
  want = 2 if platform == "tpu" else max(1, 264 // (batch * kv_heads))
  return max(1, min(want, tiles))


def pallas_decode_attention(
  q_BQHD,
  k_BTKD,
  v_BTKD,
  lengths_B,
  q_pos_BQ,
  *,
  causal,
  window,
  scale,
  platform,
  num_splits=None,
  block_sizes=None,
  interpret=False,
):
  """Split-K decode on `platform` ("tpu" | "gpu"); see the module docstring."""
  d_in = q_BQHD.shape[3]
  d_pad = 0 if platform == "tpu" else max(16, 1 << (d_in - 1).bit_length()) - d_in
  if d_pad:  # Triton tiles are powers of two; zero columns change nothing
    pad_d = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, d_pad),))
    q_BQHD, k_BTKD, v_BTKD = pad_d(q_BQHD), pad_d(k_BTKD), pad_d(v_BTKD)
  b, nq, h, d = q_BQHD.shape
  t, kv_heads = k_BTKD.shape[1], k_BTKD.shape[2]
  group = h // kv_heads
  blocks = fit(block_sizes or default_block_sizes(platform, d), nq, t, platform)
  bkv = blocks.block_kv_decode
  splits = num_splits or _default_splits(platform, b, kv_heads, t, bkv)
  chunk = -(-t // (splits * bkv)) * bkv
  rows = group * nq
  rows_pad = -(-rows // 8) * 8 if platform == "tpu" else max(16, 1 << (rows - 1).bit_length())
  # Pack row r = g * Q + i of kv head kh: query head kh * G + g, token i.
  q_BKRD = q_BQHD.reshape(b, nq, kv_heads, group, d).transpose(0, 2, 3, 1, 4)
  q_BKRD = jnp.pad(
    q_BKRD.reshape(b, kv_heads, rows, d), ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0))
  )
  pos_BR = jnp.pad(
    jnp.tile(q_pos_BQ.astype(jnp.int32), (1, group)),
    ((0, 0), (0, rows_pad - rows)),
    constant_values=-1,
  )
  pad_t = ((0, 0), (0, splits * chunk - t), (0, 0), (0, 0))
  k, v = jnp.pad(k_BTKD, pad_t), jnp.pad(v_BTKD, pad_t)
  lo, hi = _tile_ranges(
    q_pos_BQ,
    lengths_B.astype(jnp.int32),
    causal=causal,
    window=window,
    splits=splits,
    chunk=chunk,
    bkv=bkv,
  )
  static = dict(scale=scale, causal=causal, window=window, bkv=bkv, chunk=chunk, splits=splits)
  out_shape = [
    jax.ShapeDtypeStruct((b, splits, kv_heads, rows_pad, d), jnp.float32),
    jax.ShapeDtypeStruct((b, splits, kv_heads, rows_pad, 1), jnp.float32),
  ]
  if platform == "gpu":
    o_part, lse_part = pl.pallas_call(
      functools.partial(_gpu_kernel, **static),
      grid=(b, kv_heads, splits),
      in_specs=[pl.BlockSpec((b * splits,), lambda *_: (0,))] * 2
      + [
        pl.BlockSpec((b,), lambda *_: (0,)),
        pl.BlockSpec((None, None, rows_pad, d), lambda b_, kh, s: (b_, kh, 0, 0)),
        pl.BlockSpec((None, rows_pad), lambda b_, kh, s: (b_, 0)),
      ]
      + [pl.BlockSpec((None, chunk, None, d), lambda b_, kh, s: (b_, s, kh, 0))] * 2,
      out_specs=[
        pl.BlockSpec((None, None, None, rows_pad, d), lambda b_, kh, s: (b_, s, kh, 0, 0)),
        pl.BlockSpec((None, None, None, rows_pad, None), lambda b_, kh, s: (b_, s, kh, 0, 0)),
      ],
      out_shape=out_shape,
      compiler_params=_GPUParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="decode_attention_gpu",
    )(lo, hi, lengths_B.astype(jnp.int32), q_BKRD, pos_BR, k, v)
  else:
    tiles = chunk // bkv
    kv_spec = pl.BlockSpec(
      (None, bkv, kv_heads * d),
      lambda b_, s, j, lo_, hi_, len_: (
        b_,
        s * tiles + jnp.maximum(jnp.minimum(j, hi_[b_ * splits + s] - 1), lo_[b_ * splits + s]),
        0,
      ),
    )
    o_part, lse_part = pl.pallas_call(
      functools.partial(_tpu_kernel, head_dim=d, **static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, splits, tiles),
        in_specs=[
          pl.BlockSpec((None, kv_heads, rows_pad, d), lambda b_, *_: (b_, 0, 0, 0)),
          pl.BlockSpec((None, rows_pad, 1), lambda b_, *_: (b_, 0, 0)),
          kv_spec,
          kv_spec,
        ],
        out_specs=[
          pl.BlockSpec((None, None, kv_heads, rows_pad, d), lambda b_, s, *_: (b_, s, 0, 0, 0)),
          pl.BlockSpec((None, None, kv_heads, rows_pad, 1), lambda b_, s, *_: (b_, s, 0, 0, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((kv_heads, rows_pad, 1), jnp.float32)] * 2
        + [pltpu.VMEM((kv_heads, rows_pad, d), jnp.float32)],
      ),
      out_shape=out_shape,
      compiler_params=_TPUParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="decode_attention_tpu",
    )(
      lo,
      hi,
      lengths_B.astype(jnp.int32),
      q_BKRD,
      pos_BR[:, :, None],
      k.reshape(b, -1, kv_heads * d),
      v.reshape(b, -1, kv_heads * d),
    )
  out_BKRD = combine_splits(o_part, lse_part[..., 0])[:, :, :rows]
  out = out_BKRD.reshape(b, kv_heads, group, nq, d).transpose(0, 3, 1, 2, 4)
  return out.reshape(b, nq, h, d)[..., :d_in].astype(q_BQHD.dtype)


def combine_splits(o_BNKRD, lse_BNKR):
  """Merges per-split partial outputs [B, N, K, R, D] by their lse -> [B, K, R, D]."""
  m = jnp.max(lse_BNKR, axis=1, keepdims=True)
  weight = jnp.exp(lse_BNKR - jnp.where(jnp.isfinite(m), m, 0.0))  # -inf -> 0
  total = jnp.sum(weight, axis=1)
  out = jnp.sum(weight[..., None] * o_BNKRD, axis=1)
  return out / jnp.where(total > 0, total, 1.0)[..., None]


def xla_decode_attention(q_BQHD, k_BTKD, v_BTKD, lengths_B, q_pos_BQ, *, causal, window, scale):
  """Plain-XLA decode attention with the same semantics (GQA without repeats)."""
  b, nq, h, d = q_BQHD.shape
  t, kv_heads = k_BTKD.shape[1], k_BTKD.shape[2]
  q = q_BQHD.reshape(b, nq, kv_heads, h // kv_heads, d)
  s = jnp.einsum("bqkgd,btkd->bkgqt", q, k_BTKD, preferred_element_type=jnp.float32) * scale
  mask = _mask(
    q_pos_BQ[:, :, None],
    jnp.arange(t)[None, None, :],
    lengths_B[:, None, None],
    causal=causal,
    window=window,
  )[:, None, None]
  s = jnp.where(mask, s, NEG_INF)
  p = jnp.where(mask, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  out = jnp.einsum(
    "bkgqt,btkd->bqkgd", p.astype(v_BTKD.dtype), v_BTKD, preferred_element_type=jnp.float32
  )
  return out.reshape(b, nq, h, d).astype(q_BQHD.dtype)
