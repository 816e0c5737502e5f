"""Split-K decode attention (interpret mode and XLA) against the float32 einsum reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import decode_attention
from kernels.block_sizes import BlockSizes
from kernels.reference import reference_attention


def decode_case(seed, b, nq, h, k, d, t, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, kc, vc = (
    jnp.asarray(rng.standard_normal(shape), dtype)
    for shape in ((b, nq, h, d), (b, t, k, d), (b, t, k, d))
  )
  # Row 0 fills the cache, row 1 holds a single token, the rest are random.
  lengths = jnp.asarray(np.concatenate([[t, 1], rng.integers(nq, t + 1, b - 2)]), jnp.int32)
  return q, kc, vc, lengths


def reference_decode(q, kc, vc, lengths, q_pos, *, window):
  t = kc.shape[1]
  kv_seg = (jnp.arange(t)[None, :] >= lengths[:, None]).astype(jnp.int32)  # 1 = empty slot
  out, _ = reference_attention(
    q.astype(jnp.float32),
    kc.astype(jnp.float32),
    vc.astype(jnp.float32),
    causal=True,
    q_pos_BS=q_pos,
    q_seg_BS=jnp.zeros(q_pos.shape, jnp.int32),
    kv_seg_BT=kv_seg,
    sliding_window=window,
  )
  return out


@pytest.mark.parametrize(
  "platform,impl,nq,h,k,window,splits,dtype,tol",
  [
    ("gpu", "pallas", 1, 8, 2, None, 3, jnp.float32, 1e-5),  # GQA 4:1, one token
    ("gpu", "pallas", 3, 4, 1, 40, 2, jnp.float32, 1e-5),  # MQA, 3 tokens, window
    ("gpu", "pallas", 2, 4, 2, None, 4, jnp.bfloat16, 2e-2),
    ("tpu", "pallas", 2, 4, 2, 40, 2, jnp.float32, 1e-5),
    (None, "xla", 2, 4, 2, 40, None, jnp.float32, 1e-5),
  ],
)
def test_decode_matches_reference(platform, impl, nq, h, k, window, splits, dtype, tol):
  b, d, t = 4, 32, 300
  q, kc, vc, lengths = decode_case(0, b, nq, h, k, d, t, dtype)
  blocks = BlockSizes(16, 16, 16, 16, block_kv_decode=32 if platform == "gpu" else 128)
  out = decode_attention(
    q,
    kc,
    vc,
    lengths,
    sliding_window=window,
    impl=impl,
    interpret=impl == "pallas",
    pallas_platform=platform,
    num_splits=splits,
    block_sizes=blocks,
  )
  q_pos = lengths[:, None] - nq + jnp.arange(nq)[None, :]
  ref = reference_decode(q, kc, vc, lengths, q_pos, window=window)
  assert out.shape == q.shape and out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=tol, atol=tol)


def test_decode_explicit_positions_and_blind_rows():
  """Explicit query positions; a query at position -1 sees nothing and returns zeros."""
  q, kc, vc, lengths = decode_case(1, 3, 2, 4, 2, 24, 70)  # head dim 24: padded to 32
  q_pos = jnp.asarray([[5, 69], [-1, 0], [10, 30]], jnp.int32)
  out = decode_attention(
    q,
    kc,
    vc,
    lengths,
    q_positions=q_pos,
    impl="pallas",
    interpret=True,
    num_splits=3,
    block_sizes=BlockSizes(16, 16, 16, 16, block_kv_decode=16),
  )
  ref = reference_decode(q, kc, vc, lengths, q_pos, window=None)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out)[1, 0] == 0)
