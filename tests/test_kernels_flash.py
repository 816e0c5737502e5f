"""Flash-attention kernels (interpret mode on CPU) against the float32 einsum reference.

GPU (Triton) kernels run with `interpret=True` under a hypothesis sweep; the TPU
(Mosaic) kernels run under TPU interpret mode, which is ~10x slower per grid
step, on a few fixed cases that each cover many features at once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.attention import attention, pallas_attention
from kernels.block_sizes import BlockSizes
from kernels.flash_common import KV_PAD, Q_PAD, block_ranges
from kernels.reference import reference_attention, reference_mask

GPU_TEST_BLOCKS = BlockSizes(16, 16, 16, 16)


def make_case(seed, b, s, t, h, k, d, pos_kind, seg_kind, dtype=jnp.float32):
  """Random q/k/v plus positions and segments of the requested kind."""
  rng = np.random.default_rng(seed)
  q, kk, v = (
    rng.standard_normal(shape).astype(np.float32)
    for shape in ((b, s, h, d), (b, t, k, d), (b, t, k, d))
  )
  if pos_kind == "iota":  # queries are the last S of T tokens
    q_pos = np.broadcast_to(np.arange(s) + max(t - s, 0), (b, s))
    kv_pos = np.broadcast_to(np.arange(t), (b, t))
  else:  # routed: original positions of gathered tokens
    kv_pos = np.sort(np.stack([rng.choice(4 * t, t, replace=False) for _ in range(b)]), -1)
    q_pos = (
      kv_pos
      if s == t
      else np.sort(np.stack([rng.choice(4 * t, s, replace=False) for _ in range(b)]), -1)
    )
    if pos_kind == "shuffled":
      q_pos = np.stack([rng.permutation(row) for row in q_pos])
      kv_pos = q_pos if s == t else np.stack([rng.permutation(row) for row in kv_pos])
  if seg_kind == "none":
    q_seg, kv_seg = np.zeros((b, s)), np.zeros((b, t))
  elif seg_kind == "packed":
    kv_seg = np.sort(rng.integers(0, 3, (b, t)), -1)
    q_seg = kv_seg if s == t else np.sort(rng.integers(0, 3, (b, s)), -1)
  else:  # "orphan": queries of segment 2 have no keys at all
    q_seg, kv_seg = rng.integers(0, 3, (b, s)), rng.integers(0, 2, (b, t))
  cast = lambda x: jnp.asarray(x, dtype)
  ids = tuple(jnp.asarray(x, jnp.int32) for x in (q_pos, kv_pos, q_seg, kv_seg))
  weights = (
    jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32),
    jnp.asarray(rng.standard_normal((b, h, s)), jnp.float32),
  )
  return (cast(q), cast(kk), cast(v)), ids, weights


def _loss(fn, w_out, w_lse):
  def loss(q, k, v):
    out, lse = fn(q, k, v)
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(finite_lse * w_lse), (out, lse)

  return loss


@functools.cache
def kernel_fn(platform, causal, window, scale, blocks):
  """Jitted (out, lse), (dq, dk, dv) of the Pallas kernels in interpret mode."""

  def run(q, k, v, ids, w_out, w_lse):
    fn = lambda q, k, v: pallas_attention(
      q,
      k,
      v,
      *ids,
      causal=causal,
      sliding_window=window,
      scale=scale,
      platform=platform,
      interpret=True,
      block_sizes=blocks,
    )
    (_, aux), grads = jax.value_and_grad(_loss(fn, w_out, w_lse), (0, 1, 2), has_aux=True)(q, k, v)
    return aux, grads

  return jax.jit(run)


@functools.cache
def reference_fn(causal, window, scale):
  def run(q, k, v, ids, w_out, w_lse):
    q_pos, kv_pos, q_seg, kv_seg = ids
    fn = lambda q, k, v: reference_attention(
      q,
      k,
      v,
      causal=causal,
      q_pos_BS=q_pos,
      kv_pos_BT=kv_pos,
      q_seg_BS=q_seg,
      kv_seg_BT=kv_seg,
      sliding_window=window,
      scale=scale,
    )
    (_, aux), grads = jax.value_and_grad(_loss(fn, w_out, w_lse), (0, 1, 2), has_aux=True)(q, k, v)
    return aux, grads

  return jax.jit(run)


def check_against_reference(
  platform, blocks, shape, causal, window, pos_kind, seg_kind, dtype, seed, tol
):
  b, s, t, h, k, d = shape
  qkv, ids, weights = make_case(seed, *shape, pos_kind, seg_kind, dtype)
  scale = d**-0.5
  (out, lse), grads = kernel_fn(platform, causal, window, scale, blocks)(*qkv, ids, *weights)
  ref_qkv = tuple(x.astype(jnp.float32) for x in qkv)
  (ref_out, ref_lse), ref_grads = reference_fn(causal, window, scale)(*ref_qkv, ids, *weights)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  close = functools.partial(np.testing.assert_allclose, rtol=tol, atol=tol)
  close(np.asarray(out, np.float32), ref_out, err_msg="out")
  close(lse, ref_lse, err_msg="lse")  # -inf on fully masked rows in both
  for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
    close(np.asarray(g, np.float32), ref_g, err_msg=name)
  # Fully masked rows: exactly zero output and zero dq, and lse = -inf.
  mask = reference_mask(*ids, causal=causal, sliding_window=window)
  blind_BS = ~np.asarray(mask).any(-1)
  assert np.all(np.asarray(out)[blind_BS] == 0) and np.all(np.asarray(grads[0])[blind_BS] == 0)
  assert np.all(np.isneginf(np.asarray(lse).transpose(0, 2, 1)[blind_BS]))
  return blind_BS.any()


GPU_SHAPES = [  # B, S, T, H, K, D
  (1, 40, 40, 2, 1, 16),  # MQA, length not a multiple of the tile
  (2, 24, 50, 4, 2, 32),  # GQA 2:1, S != T
  (1, 33, 33, 4, 4, 24),  # MHA, head dim padded to 32 inside
]


@settings(max_examples=8, deadline=None)
@given(
  shape=st.sampled_from(GPU_SHAPES),
  causal=st.booleans(),
  window=st.sampled_from([None, 7]),
  pos_kind=st.sampled_from(["iota", "routed", "shuffled"]),
  seg_kind=st.sampled_from(["none", "packed", "orphan"]),
  seed=st.integers(0, 2**16),
)
def test_gpu_kernels_float32(shape, causal, window, pos_kind, seg_kind, seed):
  check_against_reference(
    "gpu", GPU_TEST_BLOCKS, shape, causal, window, pos_kind, seg_kind, jnp.float32, seed, tol=1e-5
  )


@settings(max_examples=3, deadline=None)
@given(
  causal=st.booleans(), seg_kind=st.sampled_from(["packed", "orphan"]), seed=st.integers(0, 2**16)
)
def test_gpu_kernels_bfloat16(causal, seg_kind, seed):
  check_against_reference(
    "gpu",
    GPU_TEST_BLOCKS,
    GPU_SHAPES[1],
    causal,
    7,
    "routed",
    seg_kind,
    jnp.bfloat16,
    seed,
    tol=2e-2,
  )


def test_gpu_kernels_fully_masked_rows_are_exercised():
  """The 'orphan' layout really produces rows without keys (guards the sweep above)."""
  assert check_against_reference(
    "gpu", GPU_TEST_BLOCKS, GPU_SHAPES[0], True, None, "iota", "orphan", jnp.float32, 0, tol=1e-5
  )


@pytest.mark.parametrize(
  "head_dim,dtype,causal,window,pos_kind,seg_kind,tol",
  [
    (32, jnp.float32, True, 100, "shuffled", "orphan", 1e-5),  # head-major layout
    (128, jnp.bfloat16, False, None, "iota", "packed", 2e-2),  # [B, S, H*D] layout
    (128, jnp.float32, True, None, "routed", "none", 1e-5),
  ],
)
def test_tpu_kernels(head_dim, dtype, causal, window, pos_kind, seg_kind, tol):
  # S = T = 200: two 128-wide tiles with padding; GQA 2:1.
  check_against_reference(
    "tpu",
    BlockSizes(128, 128, 128, 128),
    (1, 200, 200, 2, 1, head_dim),
    causal,
    window,
    pos_kind,
    seg_kind,
    dtype,
    1,
    tol,
  )


@settings(max_examples=30, deadline=None)
@given(
  shape=st.sampled_from([(2, 64, 64), (1, 48, 80)]),
  causal=st.booleans(),
  window=st.sampled_from([None, 5, 40]),
  pos_kind=st.sampled_from(["iota", "routed", "shuffled"]),
  seg_kind=st.sampled_from(["none", "packed", "orphan"]),
  seed=st.integers(0, 2**16),
)
def test_block_ranges_cover_every_visible_tile(shape, causal, window, pos_kind, seg_kind, seed):
  b, s, t = shape
  _, ids, _ = make_case(seed, b, s, t, 1, 1, 1, pos_kind, seg_kind)
  mask = np.asarray(reference_mask(*ids, causal=causal, sliding_window=window))
  tile_visible = mask.reshape(b, s // 16, 16, t // 16, 16).any(axis=(2, 4))
  kv_lo, kv_hi, q_lo, q_hi = map(
    np.asarray, block_ranges(ids, 16, 16, causal=causal, window=window)
  )
  i, j = np.meshgrid(np.arange(s // 16), np.arange(t // 16), indexing="ij")
  in_kv_range = (j[None] >= kv_lo[:, :, None]) & (j[None] < kv_hi[:, :, None])
  in_q_range = (i[None] >= q_lo[:, None, :]) & (i[None] < q_hi[:, None, :])
  assert np.all(in_kv_range[tile_visible]) and np.all(in_q_range[tile_visible])
  if pos_kind == "iota" and seg_kind == "none" and causal and s == t:
    # Sorted causal: exactly the lower-triangular tiles are visited (skipping works).
    np.testing.assert_array_equal(in_kv_range[0], tile_visible[0])


def test_block_ranges_ignore_padding():
  pos = jnp.arange(32)[None]
  seg = jnp.where(pos < 16, 0, Q_PAD)  # second query tile: padding only
  kv_seg = jnp.where(pos < 20, 0, KV_PAD)  # second key tile: 4 real keys
  kv_lo, kv_hi, _, _ = block_ranges((pos, pos, seg, kv_seg), 16, 16, causal=False, window=None)
  np.testing.assert_array_equal(kv_lo, [[0, 0]])
  np.testing.assert_array_equal(kv_hi, [[2, 0]])  # padded query tile visits nothing


def test_attention_dispatch_pallas_interpret_matches_xla():
  """The public entry point with impl='pallas', interpret=True (routed positions, GQA)."""
  (q, k, v), (q_pos, _, q_seg, _), _ = make_case(3, 2, 40, 40, 4, 2, 16, "shuffled", "packed")
  kwargs = dict(causal=True, positions=q_pos, segment_ids=q_seg, sliding_window=9)
  out = attention(q, k, v, impl="pallas", interpret=True, block_sizes=GPU_TEST_BLOCKS, **kwargs)
  np.testing.assert_allclose(out, attention(q, k, v, impl="xla", **kwargs), rtol=1e-5, atol=1e-5)


def test_auto_takes_cudnn_only_where_it_applies():
  """impl="auto" on an NVIDIA GPU: cuDNN for bf16/fp16, default positions, head dim <= 128."""
  from kernels.attention import auto_prefers_cudnn

  ok = dict(nvidia_gpu=True, dtype=jnp.bfloat16, head_dim=128, custom_mask=False)
  assert auto_prefers_cudnn(**ok)
  assert auto_prefers_cudnn(**ok | dict(dtype=jnp.float16))
  for change in (
    dict(nvidia_gpu=False),  # TPU, CPU or another GPU vendor
    dict(dtype=jnp.float32),  # cuDNN rejects float32
    dict(head_dim=256),  # not measured
    dict(custom_mask=True),  # segment ids or positions: Pallas
  ):
    assert not auto_prefers_cudnn(**ok | change), change
  # On this CPU "auto" is still XLA: same values as impl="xla", bit for bit.
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 8, 2, 16), jnp.bfloat16) for i in range(3))
  auto, xla = (attention(q, k, v, causal=True, impl=i) for i in ("auto", "xla"))
  np.testing.assert_array_equal(auto, xla)
