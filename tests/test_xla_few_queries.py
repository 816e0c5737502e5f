"""The CPU few-query (decode) attention path equals the float32 einsum reference; attending
before the cache write equals writing first, and lets the decode loop update the cache in place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels import reference, xla_few_queries
from kernels.attention import attention, visibility_mask
from models import decoding, kv_cache, transformer


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


@pytest.mark.parametrize("s,h,k,window", [(1, 8, 2, None), (3, 4, 1, 5), (2, 6, 3, None)])
def test_attending_before_the_cache_write_equals_writing_first(s, h, k, window):
  """Rows: decoding mid-cache, a write partly past the capacity (dropped), a position that
  wraps (-1: the last slot), and one whose queries see no key."""
  b, t, d = 4, 11, 16
  keys = jax.random.split(jax.random.key(2), 5)
  q = jax.random.normal(keys[0], (b, s, h, d))
  cache_k, cache_v = (jax.random.normal(x, (b, t, k, d)) for x in keys[1:3])
  new_k, new_v = (jax.random.normal(x, (b, s, k, d)) for x in keys[3:5])
  positions = jnp.stack(
    [6 + jnp.arange(s), t - 1 + jnp.arange(s), -1 - jnp.arange(s), -t - 1 - jnp.arange(s)]
  )
  kv_pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  scale = d**-0.5

  def write_first(q, cache_k, cache_v, new_k, new_v):
    written = [kv_cache.write(c, n, positions) for c, n in ((cache_k, new_k), (cache_v, new_v))]
    mask = visibility_mask(positions, kv_pos, None, None, causal=True, sliding_window=window)
    return xla_few_queries.few_query_attention(q, *written, mask, scale)

  def before(*args):
    return xla_few_queries.attention_before_cache_write(
      *args, positions, sliding_window=window, scale=scale
    )

  args = (q, cache_k, cache_v, new_k, new_v)
  np.testing.assert_allclose(before(*args), write_first(*args), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(before(*args)[3], 0.0)
  cotangent = jax.random.normal(jax.random.key(3), q.shape)
  grads = [
    jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=tuple(range(5)))(*args)
    for f in (before, write_first)
  ]
  for g, g_ref in zip(*grads, strict=True):
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


def test_after_returns_its_arrays_unchanged_even_when_the_value_is_nan():
  x = jnp.array([-0.5, 2.0, 3.0])
  for value in (jnp.ones(3), jnp.array([1.0, jnp.nan, 2.0])):
    (y,) = kv_cache.after(value, x)
    np.testing.assert_array_equal(y, x)


def test_a_cpu_decode_step_updates_the_cache_in_place(monkeypatch):
  """The compiled decode loop of `decoding.generate` copies no cache layer (writing before the
  read made XLA copy each layer's keys and values 4 times per step)."""
  config = transformer.Config(
    vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=64
  )
  model = transformer.Transformer(config, rngs=nnx.Rngs(0))
  compiled = []
  real = decoding._decode

  def spy(*args, **kwargs):
    compiled.append(real.lower(*args, **kwargs).compile().as_text())
    return real(*args, **kwargs)

  monkeypatch.setattr(decoding, "_decode", spy)
  prompt = np.ones((1, 1008), np.int32)  # a cache of T·K·D >= 2^15 elements per layer
  decoding.generate(model, prompt, np.array([1000]), max_new_tokens=17, cache_growth=None)
  (text,) = compiled
  cache_shape = "f32[1,1024,2,16]"  # capacity 1008 + 17 - 1
  assert 1024 * 2 * 16 >= transformer.MIN_CACHE_ELEMENTS_TO_READ_FIRST
  assert cache_shape in text
  copies = [line for line in text.splitlines() if " copy(" in line and cache_shape in line]
  assert not copies, copies[:4]
