"""The float32 einsum reference against jax.nn.dot_product_attention, the XLA impl of
`attention` against the reference (incl. fully masked rows), and dispatch errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.attention import attention
from kernels.reference import reference_attention, reference_mask


def _qkv(seed, b, s, t, h, k, d):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(keys[0], (b, s, h, d)),
    jax.random.normal(keys[1], (b, t, k, d)),
    jax.random.normal(keys[2], (b, t, k, d)),
  )


@functools.partial(jax.jit, static_argnames=("causal", "window"))
def _reference_and_jax_nn(q, k, v, ids, *, causal, window):
  out, lse = reference_attention(
    q,
    k,
    v,
    causal=causal,
    q_pos_BS=ids[0],
    kv_pos_BT=ids[1],
    q_seg_BS=ids[2],
    kv_seg_BT=ids[3],
    sliding_window=window,
  )
  mask_BST = reference_mask(*ids, causal=causal, sliding_window=window)
  expected = jax.nn.dot_product_attention(q, k, v, mask=mask_BST[:, None], implementation="xla")
  logits = (
    jnp.einsum(
      "bshd,bthd->bhst", q, jnp.repeat(k, q.shape[2] // k.shape[2], 2), precision="highest"
    )
    * q.shape[-1] ** -0.5
  )
  expected_lse = jax.nn.logsumexp(jnp.where(mask_BST[:, None], logits, -jnp.inf), axis=-1)
  return out, lse, expected, expected_lse, mask_BST.any(-1)


@settings(max_examples=5, deadline=None)
@given(
  k=st.sampled_from([1, 4]),
  st_len=st.sampled_from([(6, 11)]),
  causal=st.booleans(),
  window=st.sampled_from([None, 3]),
  seed=st.integers(0, 999),
)
def test_reference_matches_jax_nn(k, st_len, causal, window, seed):
  s, t = st_len
  q, kk, v = _qkv(seed, 2, s, t, 4, k, 8)
  rng = np.random.default_rng(seed)
  ids = tuple(
    jnp.asarray(rng.integers(0, hi, (2, n)), jnp.int32)
    for hi, n in ((12, s), (12, t), (2, s), (2, t))
  )
  out, lse, expected, expected_lse, seen_BS = _reference_and_jax_nn(
    q, kk, v, ids, causal=causal, window=window
  )
  # jax.nn gives an average of V on fully masked rows; ours gives zeros.
  expected = np.where(np.asarray(seen_BS)[..., None, None], expected, 0.0)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_reference_lse_gradient_is_softmax():
  q, k, v = _qkv(0, 1, 5, 7, 2, 2, 4)
  grad = jax.jit(jax.grad(lambda q: reference_attention(q, k, v, causal=True)[1][0, 0, 4]))(q)
  probs = jax.nn.softmax(jnp.einsum("d,td->t", q[0, 4, 0], k[0, :5, 0]) * 0.5)
  np.testing.assert_allclose(grad[0, 4, 0], 0.5 * probs @ k[0, :5, 0], rtol=1e-5, atol=1e-6)


@functools.partial(jax.jit, static_argnames=("causal", "window"))
def _xla_and_reference(q, k, v, pos, seg, kv_seg, *, causal, window):
  """(out, grads) of the XLA impl and of the reference for one weighted-sum loss."""
  ours = lambda q, k, v: attention(
    q,
    k,
    v,
    impl="xla",
    causal=causal,
    positions=pos,
    segment_ids=seg,
    kv_segment_ids=kv_seg,
    sliding_window=window,
  )
  ref = lambda q, k, v: reference_attention(
    q,
    k,
    v,
    causal=causal,
    q_pos_BS=pos,
    kv_pos_BT=pos,
    q_seg_BS=seg,
    kv_seg_BT=kv_seg,
    sliding_window=window,
  )[0]
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * jnp.arange(8.0))
  return [(fn(q, k, v), jax.grad(loss(fn), (0, 1, 2))(q, k, v)) for fn in (ours, ref)]


@settings(max_examples=6, deadline=None)
@given(
  k=st.sampled_from([1, 3]),
  causal=st.booleans(),
  window=st.sampled_from([None, 2]),
  seed=st.integers(0, 999),
)
def test_xla_impl_matches_reference_with_blind_rows(k, causal, window, seed):
  q, kk, v = _qkv(seed, 2, 9, 9, 3, k, 8)
  rng = np.random.default_rng(seed)
  pos = jnp.asarray(np.sort(rng.choice(40, (2, 9)), -1))
  seg = jnp.asarray(rng.integers(0, 3, (2, 9))).at[0, 0].set(2)
  kv_seg = jnp.where(seg == 2, 0, seg)  # segment 2 queries see no key
  (out, grads), (ref_out, ref_grads) = _xla_and_reference(
    q, kk, v, pos, seg, kv_seg, causal=causal, window=window
  )
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for g, r in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  blind = np.asarray(seg == 2)
  assert np.all(np.asarray(out)[blind] == 0) and np.all(np.asarray(grads[0])[blind] == 0)


def test_dispatch_errors_on_cpu():
  q, k, v = _qkv(0, 1, 4, 4, 2, 1, 8)
  with pytest.raises(ValueError, match="impl='bogus'"):
    attention(q, k, v, causal=True, impl="bogus")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="NVIDIA"):
      attention(q, k, v, causal=True, impl="cudnn")
    with pytest.raises(ValueError, match="interpret=True"):
      attention(q, k, v, causal=True, impl="pallas")
  with pytest.raises(ValueError, match="pallas_platform"):
    attention(q, k, v, causal=True, impl="pallas", interpret=True, pallas_platform="cuda")
