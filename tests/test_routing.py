"""adaptive/routing.py against plain numpy / the paper's definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive import routing


def test_capacity_k_is_static_rounded_and_bounded():
  assert routing.capacity_k(0.125, 2048) == 256
  assert routing.capacity_k(0.125, 4) == 1  # round(0.5) -> at least 1
  assert routing.capacity_k(0.3, 10) == 3
  assert routing.capacity_k(1.0, 7) == 7
  with pytest.raises(ValueError, match="capacity"):
    routing.capacity_k(0.0, 8)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.data())
def test_expert_choice_matches_numpy(b, s, data):
  k = data.draw(st.integers(1, s))
  seed = data.draw(st.integers(0, 2**16))
  scores = np.random.default_rng(seed).permutation(b * s).reshape(b, s).astype(np.float32)
  positions = np.broadcast_to(np.arange(s) + 100, (b, s))
  segs = np.random.default_rng(seed + 1).integers(0, 3, (b, s))
  sel = routing.expert_choice(jnp.asarray(scores), k, jnp.asarray(positions), jnp.asarray(segs))
  for row in range(b):
    want = np.sort(np.argsort(-scores[row])[:k])
    np.testing.assert_array_equal(sel.indices_BK[row], want)
    np.testing.assert_array_equal(sel.positions_BK[row], positions[row, want])
    np.testing.assert_array_equal(sel.segment_ids_BK[row], segs[row, want])
    mask = np.zeros(s, bool)
    mask[want] = True
    np.testing.assert_array_equal(sel.mask_BS[row], mask)


def test_gather_scatter_roundtrip_and_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 6, 3))
  idx = jnp.asarray([[0, 2, 5], [1, 3, 4]])
  g = routing.gather_tokens(x, idx)
  np.testing.assert_array_equal(routing.scatter_tokens(x, g, idx), x)
  y = routing.scatter_tokens(x, 2 * g, idx)
  mask = np.asarray(routing.membership_mask(idx, 6))
  np.testing.assert_allclose(y, np.where(mask[..., None], 2 * x, x))
  grad = jax.grad(
    lambda x: jnp.sum(routing.scatter_tokens(x, 3 * routing.gather_tokens(x, idx), idx))
  )(x)
  np.testing.assert_allclose(grad, np.broadcast_to(np.where(mask[..., None], 3.0, 1.0), x.shape))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.data())
def test_first_come_slots_and_dispatch_match_numpy(b, s, data):
  slots = data.draw(st.integers(1, s))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  wants = rng.random((b, s)) < data.draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
  x = rng.normal(size=(b, s, 3)).astype(np.float32)
  w = rng.normal(size=(b, s)).astype(np.float32)
  got = routing.first_come_slots(jnp.asarray(wants), slots)
  fn = lambda x_BCD: jnp.tanh(x_BCD) * 2.0  # a per-token function
  out = np.asarray(routing.dispatch_combine(fn, jnp.asarray(x), got, jnp.asarray(w)))
  for row in range(b):
    first = np.flatnonzero(wants[row])[:slots]
    kept = np.zeros(s, bool)
    kept[first] = True
    np.testing.assert_array_equal(got.kept_BS[row], kept)
    np.testing.assert_array_equal(got.valid_BC[row], np.arange(slots) < first.size)
    np.testing.assert_array_equal(got.indices_BC[row][: first.size], first)
    want = np.where(kept[:, None], w[row, :, None] * np.tanh(x[row]) * 2.0, 0.0)
    np.testing.assert_allclose(out[row], want, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.data())
def test_fill_spare_slots_takes_the_best_eligible_tokens(b, s, data):
  slots = data.draw(st.integers(1, s))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  wants = rng.random((b, s)) < data.draw(st.sampled_from([0.0, 0.3, 1.0]))
  eligible = ~wants & (rng.random((b, s)) < data.draw(st.sampled_from([0.5, 1.0])))
  score = rng.permutation(b * s).reshape(b, s).astype(np.float32)  # No ties.
  kept = routing.first_come_slots(jnp.asarray(wants), slots)
  got = routing.fill_spare_slots(kept, jnp.asarray(score), jnp.asarray(eligible))
  np.testing.assert_array_equal(got.kept_BS, kept.kept_BS)
  for row in range(b):
    first = np.flatnonzero(wants[row])[:slots]
    spare = slots - first.size
    best = [i for i in np.argsort(-score[row]) if eligible[row, i]][:spare]
    n = first.size + len(best)
    np.testing.assert_array_equal(got.valid_BC[row], np.arange(slots) < n)
    np.testing.assert_array_equal(got.indices_BC[row][:n], np.concatenate([first, best]))


def test_dispatch_gradient_reaches_only_slotted_tokens():
  x = jax.random.normal(jax.random.key(0), (1, 5, 2))
  w = jnp.asarray([[1.0, 2.0, 3.0, 4.0, 5.0]])
  slots = routing.first_come_slots(jnp.asarray([[True, False, True, True, True]]), 2)
  gx, gw = jax.grad(
    lambda x, w: jnp.sum(routing.dispatch_combine(lambda y: 3 * y, x, slots, w)), argnums=(0, 1)
  )(x, w)
  kept = np.array([1.0, 0, 1, 0, 0])  # The first two that want it: tokens 0 and 2.
  np.testing.assert_allclose(gx[0], np.broadcast_to((3 * kept * w[0])[:, None], (5, 2)))
  np.testing.assert_allclose(gw[0], kept * 3 * np.asarray(jnp.sum(x[0], -1)), rtol=1e-6)


def test_threshold_and_bce_losses():
  logits = jnp.asarray([[-2.0, 0.0, 0.5, 3.0]])
  np.testing.assert_array_equal(routing.threshold_route(logits), [[False, False, True, True]])
  target = jnp.asarray([[0, 1, 1, 1]], bool)
  p = 1 / (1 + np.exp(-np.asarray(logits)))
  want = -np.mean(np.where(np.asarray(target), np.log(p), np.log(1 - p)))
  np.testing.assert_allclose(routing.router_bce_loss(logits, target), want, rtol=1e-6)
  assert float(routing.routing_accuracy(logits, target)) == 0.75


def test_predictor_sees_stop_gradient_x():
  params = routing.predictor_init(jax.random.key(0), 8, 4)
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  target = jnp.asarray(np.random.default_rng(0).random((2, 5)) < 0.5)
  gx = jax.grad(lambda x: routing.predictor_loss(params, x, target))(x)
  assert not np.asarray(gx).any()
  gp = jax.grad(lambda p: routing.predictor_loss(p, x, target))(params)
  assert np.abs(np.asarray(gp["w1_DH"])).max() > 0
  h = np.maximum(np.asarray(x) @ np.asarray(params["w1_DH"]), 0)
  np.testing.assert_allclose(
    routing.predictor_logits(params, x), h @ np.asarray(params["w2_H"]), rtol=1e-5, atol=1e-5
  )
