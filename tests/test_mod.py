"""Mixture-of-Depths against its masked-dense oracle, the dense model, and its own decoding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from remat_check import assert_remat_honoured

from kernels.attention import attention
from models import mod, registry, transformer

# Two layers (dense, routed) keep compile times small; num_layers=4 cases check interleaving.
TINY = dict(
  vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)


def _tokens(b, s, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, TINY["vocab_size"])


def _packed_segments(b, s):
  # Rows packed with documents of different lengths; two rows differ.
  row0 = [1] * 5 + [2] * 7 + [3] * (s - 12)
  row1 = [1] * 9 + [2] * (s - 9)
  return jnp.asarray([row0, row1][:b], jnp.int32)


def oracle_forward(model, tokens_BS, segment_ids_BS, capacity):
  """Masked-dense MoD written out independently of models/mod.py.

  Routed block: dense transformer.Block arithmetic over all S tokens with keys
  restricted to the top-k tokens (by r = wᵀx), the update r·(block(x) − x)
  applied only to the selected rows.
  """
  c = model.config
  b, s = tokens_BS.shape
  positions_BS = (
    jnp.broadcast_to(jnp.arange(s), (b, s))
    if segment_ids_BS is None
    else transformer.positions_from_segments(segment_ids_BS)
  )
  seg_BS = jnp.zeros((b, s), jnp.int32) if segment_ids_BS is None else segment_ids_BS
  k = max(1, int(math.floor(capacity * s + 0.5)))
  x = model.embed_tokens(tokens_BS)
  graphdef, state = nnx.split(model.layers)
  routed = list(range(c.routed_offset, c.num_layers, c.routed_every))
  for i in range(c.num_layers):
    blk = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
    if i not in routed:
      x, _ = blk(x, positions_BS, segment_ids_BS)
      continue
    w_D = model.router[...][routed.index(i)]
    r_BS = jnp.einsum("bsd,d->bs", x, w_D)
    order_BS = jnp.argsort(-jax.lax.stop_gradient(r_BS), axis=1, stable=True)
    rank_BS = jnp.argsort(order_BS, axis=1)
    sel_BS = rank_BS < k
    q, kk, v = blk.attn.project_qkv(blk.attn_norm(x), positions_BS)
    out = attention(
      q,
      kk,
      v,
      causal=True,
      segment_ids=seg_BS,
      positions=positions_BS,
      kv_segment_ids=jnp.where(sel_BS, seg_BS, -1),
    )
    y = x + blk.attn.o_proj(out)
    y = y + blk.mlp(blk.mlp_norm(y))
    g_BS = {"identity": r_BS, "sigmoid": jax.nn.sigmoid(r_BS), "ones": jnp.ones_like(r_BS)}[
      c.router_activation
    ]
    x = jnp.where(sel_BS[..., None], x + g_BS[..., None] * (y - x), x)
  return model.logits_from_hidden(x)


def _jit_value_and_grad(model, fn, cot):
  """(fn(model), d sum(fn(model)·cot) / d params), one jitted call (eager is slow to compile)."""
  graphdef, state = nnx.split(model)

  def loss(st):
    out = fn(nnx.merge(graphdef, st))
    logits = out[0] if isinstance(out, tuple) else out
    return jnp.sum(logits * cot), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return out, grads


def _jit(model, fn):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda st: fn(nnx.merge(graphdef, st)))(state)


def _assert_trees_close(a, b, tol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


@pytest.mark.parametrize(
  "capacity,packed,activation,layers,offset",
  [(0.25, True, "identity", 4, 1), (0.5, True, "sigmoid", 2, 1), (0.125, False, "identity", 3, 0)],
)  # 3 layers: a tail group after the (dense, routed) pairs.
def test_mod_equals_masked_dense_oracle_outputs_and_grads(
  capacity, packed, activation, layers, offset
):
  b, s = 2, 16
  config = mod.Config(
    **dict(TINY, num_layers=layers),
    capacity=capacity,
    router_activation=activation,
    routed_offset=offset,
  )
  model = mod.MoDTransformer(config, rngs=nnx.Rngs(1))
  tokens = _tokens(b, s)
  segs = _packed_segments(b, s) if packed else None
  # Cotangent scaled so gradients are O(1): the tolerance is then absolute and relative.
  cot = 0.05 * jax.random.normal(jax.random.key(3), (b, s, TINY["vocab_size"]))
  (logits, aux), g_mod = _jit_value_and_grad(model, lambda m: m(tokens, segment_ids_BS=segs), cot)
  expected, g_ref = _jit_value_and_grad(
    model, lambda m: oracle_forward(m, tokens, segs, capacity), cot
  )
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  assert float(aux["metrics"]["mod/routed_fraction"]) == pytest.approx(
    max(1, math.floor(capacity * s + 0.5)) / s
  )
  _assert_trees_close(g_mod, g_ref, 1e-5)
  # r multiplies f: the router learns from the LM loss.
  assert np.abs(np.asarray(g_mod["router"][...])).max() > 0


def test_capacity_one_unit_router_equals_dense():
  b, s = 2, 12
  config = mod.Config(**TINY, capacity=1.0, router_activation="ones")
  model = mod.MoDTransformer(config, rngs=nnx.Rngs(0))
  dense = transformer.Transformer(transformer.Config(**TINY), rngs=nnx.Rngs(7))
  nnx.update(model, nnx.state(dense))
  tokens = _tokens(b, s, 1)
  segs = _packed_segments(b, s)
  cot = 0.05 * jax.random.normal(jax.random.key(2), (b, s, TINY["vocab_size"]))
  got, g_mod = _jit_value_and_grad(model, lambda m: m(tokens, segment_ids_BS=segs)[0], cot)
  want, g_dense = _jit_value_and_grad(dense, lambda m: m(tokens, segment_ids_BS=segs)[0], cot)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  _assert_trees_close(g_mod["layers"], g_dense["layers"], 1e-5)
  np.testing.assert_allclose(g_mod["embed"][...], g_dense["embed"][...], atol=1e-5)


def test_losses_and_metrics_reported_and_predictor_is_stop_gradient():
  config = mod.Config(**TINY, capacity=0.25, router_loss_weight=0.1, predictor_loss_weight=0.2)
  model = mod.MoDTransformer(config, rngs=nnx.Rngs(0))
  tokens = _tokens(2, 16)
  aux = _jit(model, lambda m: m(tokens)[1])
  assert set(aux["losses"]) == {"mod/router_bce", "mod/predictor_bce"}
  for name in (
    "mod/routed_fraction",
    "mod/router_weight_selected",
    "mod/router_accuracy",
    "mod/predictor_accuracy",
  ):
    assert np.isfinite(float(aux["metrics"][name]))
  np.testing.assert_allclose(
    aux["losses"]["mod/predictor_bce"], 0.2 * aux["metrics"]["mod/predictor_bce"], rtol=1e-6
  )

  graphdef, state = nnx.split(model)
  grads = jax.jit(
    jax.grad(lambda st: nnx.merge(graphdef, st)(tokens)[1]["losses"]["mod/predictor_bce"])
  )(state)
  assert np.abs(np.asarray(grads["predictor_w1"][...])).max() > 0
  # stop_gradient(x): the predictor loss does not reach the transformer.
  for leaf in jax.tree.leaves(grads["layers"]) + [grads["embed"][...]]:
    assert np.abs(np.asarray(leaf)).max() == 0


@pytest.mark.parametrize("decode_router,layers,offset", [("predictor", 4, 1), ("router", 3, 0)])
def test_decoding_equals_teacher_forced_threshold_routing(decode_router, layers, offset):
  b, s, prompt = 2, 10, 4
  config = mod.Config(
    **dict(TINY, num_layers=layers),
    capacity=0.25,
    decode_router=decode_router,
    routed_offset=offset,
  )
  model = mod.MoDTransformer(config, rngs=nnx.Rngs(5))
  tokens = _tokens(b, s, 3)
  expected, aux = _jit(model, lambda m: m(tokens, routing="threshold"))
  frac = float(aux["metrics"]["mod/routed_fraction"])
  assert 0.05 < frac < 0.95, frac  # Both decisions occur, so the test means something.

  step = jax.jit(lambda state, t, p, c: nnx.merge(graphdef, state).forward_cached(t, p, c))
  graphdef, state = nnx.split(model)
  cache = model.init_cache(b, s + 2)
  pos = jnp.broadcast_to(jnp.arange(prompt), (b, prompt))
  logits, cache = step(state, tokens[:, :prompt], pos, cache)
  got = [logits]
  for t in range(prompt, s):
    logits, cache = step(state, tokens[:, t : t + 1], jnp.full((b, 1), t), cache)
    got.append(logits)
  np.testing.assert_allclose(jnp.concatenate(got, 1), expected, atol=1e-5, rtol=1e-5)
  # The cache of a routed layer holds exactly the routed tokens; dense layers hold all.
  valid = np.asarray(cache.valid_LBT)
  for layer in range(config.num_layers):
    if layer in config.routed_layers:
      assert 0 < valid[layer, :, :s].sum() < b * s
    else:
      assert valid[layer, :, :s].all()
  assert not valid[:, :, s:].any()


def test_config_validation_names_field():
  with pytest.raises(ValueError, match="model.capacity"):
    mod.Config(**TINY, capacity=0.0)
  with pytest.raises(ValueError, match="model.router_activation"):
    mod.Config(**TINY, router_activation="relu")
  with pytest.raises(ValueError, match="model.routed_offset"):
    mod.Config(**TINY, routed_every=2, routed_offset=2)
  with pytest.raises(ValueError, match="model.decode_router"):
    mod.Config(**TINY, decode_router="oracle")


def test_registered():
  config = registry.make_config("mod", dict(TINY, capacity=0.5))
  model = registry.build("mod", config, rngs=nnx.Rngs(0))
  assert isinstance(model, mod.MoDTransformer)
  logits, aux = _jit(model, lambda m: m(_tokens(1, 8)))
  assert logits.shape == (1, 8, TINY["vocab_size"]) and "losses" in aux


@pytest.mark.parametrize("layers,every,offset", [(4, 2, 1), (3, 2, 0), (2, 1, 0)])
def test_scan_layers_equals_unrolled_in_training_and_decoding(layers, every, offset):
  """lax.scan over (dense, routed) groups, plus a tail group: same as the unrolled loop."""
  b, s, prompt = 2, 12, 9
  tokens, segs = _tokens(b, s, 4), _packed_segments(b, s)
  cot = 0.05 * jax.random.normal(jax.random.key(5), (b, s, TINY["vocab_size"]))
  results = []
  for scan in (False, True):
    config = mod.Config(
      **dict(TINY, num_layers=layers),
      capacity=0.25,
      routed_every=every,
      routed_offset=offset,
      scan_layers=scan,
    )
    model = mod.MoDTransformer(config, rngs=nnx.Rngs(2))
    topk = _jit_value_and_grad(model, lambda m: m(tokens, segment_ids_BS=segs), cot)
    threshold = _jit(model, lambda m: m(tokens, routing="threshold"))
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda st, t, p, c, g=graphdef: nnx.merge(g, st).forward_cached(t, p, c))
    cache = model.init_cache(b, s)
    logits, cache = step(
      state, tokens[:, :prompt], jnp.broadcast_to(jnp.arange(prompt), (b, prompt)), cache
    )
    decoded = [logits]
    for t in range(prompt, s):
      logits, cache = step(state, tokens[:, t : t + 1], jnp.full((b, 1), t), cache)
      decoded.append(logits)
    results.append((topk, threshold, jnp.concatenate(decoded, 1), cache))
  _assert_trees_close(results[0], results[1], 1e-5)
  # The decode equals its teacher-forced rule here too (threshold logits).
  np.testing.assert_allclose(results[1][2], results[1][1][0], atol=1e-5, rtol=1e-5)


def test_remat_recomputes_same_grads():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, TINY["vocab_size"])
  assert_remat_honoured(
    lambda remat: mod.MoDTransformer(
      mod.Config(**TINY, capacity=0.5, remat=remat), rngs=nnx.Rngs(0)
    ),
    tokens,
  )
