"""The CPU few-query (decode) attention path equals the float32 einsum reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import reference, xla_few_queries
from kernels.attention import attention


@pytest.mark.parametrize("s,h,k", [(1, 8, 8), (1, 8, 2), (3, 4, 1), (2, 6, 3)])
def test_few_query_path_matches_reference_with_gqa_window_and_blind_rows(s, h, k):
  b, t, d = 2, 11, 16
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, s, h, d))
  kk = jax.random.normal(keys[1], (b, t, k, d))
  v = jax.random.normal(keys[2], (b, t, k, d))
  # Row 0 decodes at positions 6.., row 1 at negative positions (sees no key: zeros).
  q_pos = jnp.stack([6 + jnp.arange(s), -1 - jnp.arange(s)])
  kv_pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  assert xla_few_queries.use_few_query_path(q, kk)

  def ours(q, kk, v):
    return attention(
      q, kk, v, causal=True, positions=q_pos, kv_positions=kv_pos, sliding_window=5, impl="xla"
    )

  def expected(q, kk, v):
    return reference.reference_attention(
      q, kk, v, causal=True, q_pos_BS=q_pos, kv_pos_BT=kv_pos, sliding_window=5
    )[0]

  np.testing.assert_allclose(ours(q, kk, v), expected(q, kk, v), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(ours(q, kk, v)[1], 0.0)
  cotangent = jax.random.normal(jax.random.key(1), q.shape)
  grads = jax.grad(lambda *a: jnp.sum(ours(*a) * cotangent), argnums=(0, 1, 2))(q, kk, v)
  grads_ref = jax.grad(lambda *a: jnp.sum(expected(*a) * cotangent), argnums=(0, 1, 2))(q, kk, v)
  for g, g_ref in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)
