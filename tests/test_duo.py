"""Duo-LLM FFN routing: oracle "all big" is the dense model; oracle search; router training path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import duo, registry, transformer
from remat_check import assert_remat_honoured

TINY = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64)


def _model(seed=0, **kw):
  return duo.DuoTransformer(duo.Config(**TINY, small_mlp_dim=16, **kw), rngs=nnx.Rngs(seed))


def _jit(model, fn):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda st: fn(nnx.merge(graphdef, st)))(state)


def test_oracle_all_big_equals_dense_and_all_skip_drops_ffn():
  b, s = 2, 8
  model = _model()
  dense = transformer.Transformer(transformer.Config(**TINY), rngs=nnx.Rngs(9))
  nnx.update(model, nnx.state(dense))
  tokens = jax.random.randint(jax.random.key(0), (b, s), 0, 64)
  segs = jnp.asarray([[1] * 3 + [2] * 5, [1] * 8])
  big = jnp.full((TINY["num_layers"], b, s), duo.BIG)
  logits, aux = _jit(model, lambda m: m(tokens, segment_ids_BS=segs, routing_LBS=big))
  np.testing.assert_allclose(logits, dense(tokens, segment_ids_BS=segs)[0], atol=1e-5, rtol=1e-5)
  assert float(aux["metrics"]["duo/frac_big"]) == 1.0

  # All SKIP: an attention-only transformer written out independently.
  skip = jnp.zeros_like(big)
  got, aux = _jit(model, lambda m: m(tokens, routing_LBS=skip))
  graphdef, state = nnx.split(dense.layers)
  x = dense.embed_tokens(tokens)
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  for i in range(TINY["num_layers"]):
    blk = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
    x = x + blk.attn(blk.attn_norm(x), pos, None)[0]
  np.testing.assert_allclose(got, dense.logits_from_hidden(x), atol=1e-5, rtol=1e-5)
  assert float(aux["metrics"]["duo/frac_skip"]) == 1.0


def test_learned_router_straight_through_and_compute_penalty():
  b, s = 2, 8
  model = _model(1, compute_penalty=0.5)
  tokens = jax.random.randint(jax.random.key(1), (b, s), 0, 64)
  graphdef, state = nnx.split(model)

  def loss(st):
    logits, aux = nnx.merge(graphdef, st)(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1)), aux
  (_, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  fr = [float(aux["metrics"][f"duo/frac_{n}"]) for n in ("skip", "small", "big")]
  assert sum(fr) == pytest.approx(1.0)
  assert "duo/compute" in aux["losses"]
  # The LM loss reaches the router through the straight-through softmax weights.
  assert np.abs(np.asarray(grads["ffn_router"][...])).max() > 0
  # The forward is exactly the chosen option: same logits as the oracle with the same choices.
  m = nnx.merge(graphdef, state)
  # Recover the routers' choices layer by layer with an independent replay.
  x = m.embed_tokens(tokens)
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  lg, sm = nnx.split(m.layers), nnx.split(m.small_mlps)
  for i in range(TINY["num_layers"]):
    blk = nnx.merge(lg[0], jax.tree.map(lambda a, i=i: a[i], lg[1]))
    small = nnx.merge(sm[0], jax.tree.map(lambda a, i=i: a[i], sm[1]))
    h = x + blk.attn(blk.attn_norm(x), pos, None)[0]
    n = blk.mlp_norm(h)
    choice = jnp.argmax(n @ m.ffn_router[...][i], -1)
    x = h + jnp.where((choice == 2)[..., None], blk.mlp(n), 0) + jnp.where(
        (choice == 1)[..., None], small(n), 0)
  learned = _jit(model, lambda mm: mm(tokens)[0])
  np.testing.assert_allclose(learned, m.logits_from_hidden(x), atol=1e-5, rtol=1e-5)


def _masked_ce_sum(model, tokens, segs, routing):
  """Reference objective written out: packed segments, next token within a segment."""
  logits, _ = model(tokens, segment_ids_BS=segs, routing_LBS=jnp.asarray(routing))
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  mask = (segs[:, 1:] == segs[:, :-1]) & (segs[:, 1:] != 0)
  return float(jnp.sum(nll * mask))


def test_oracle_search_improves_on_trained_routing_within_budget():
  b, s = 2, 8
  model = _model(2)
  tokens = jax.random.randint(jax.random.key(2), (b, s), 0, 64)
  segs = jnp.asarray([[1] * 3 + [2] * 5, [1] * 6 + [0] * 2])  # Packed rows and padding.
  costs = np.asarray(model.config.option_costs)
  _, aux = model(tokens, segment_ids_BS=segs)  # Eager: the routers' own choices.
  trained = np.asarray(aux["routing_LBS"])
  trained_cost = costs[trained].mean()
  assert trained_cost == pytest.approx(float(aux["metrics"]["duo/realised_cost"]), abs=1e-6)
  found = duo.oracle_search(model, tokens, segment_ids_BS=segs)  # Start: the trained routing.
  routing = found["routing_LBS"]
  assert routing.shape == (TINY["num_layers"], b, s)
  # Same compute or less, loss no worse, on the segment-masked objective (reference CE).
  assert costs[routing].mean() <= trained_cost + 1e-9
  assert found["budget"] == pytest.approx(trained_cost)
  ref_trained = _masked_ce_sum(model, tokens, segs, trained)
  ref_found = _masked_ce_sum(model, tokens, segs, routing)
  assert found["loss_sum_init"] == pytest.approx(ref_trained, rel=1e-5)
  assert found["loss_sum"] == pytest.approx(ref_found, rel=1e-5)
  assert ref_found <= ref_trained + 1e-5
  assert found["accepted"] >= 1 and ref_found < ref_trained  # It does find a better routing.


def test_greedy_oracle_routing_meets_budget():
  b, s = 2, 8
  model = _model(2)
  tokens = jax.random.randint(jax.random.key(2), (b, s), 0, 64)
  big = np.full((TINY["num_layers"], b, s), duo.BIG)
  costs = np.asarray(model.config.option_costs)
  segs = jnp.asarray([[1] * 3 + [2] * 5, [1] * 6 + [0] * 2])  # As above: reuses the compiles.
  full = duo.greedy_oracle_routing(model, tokens, 1.0, init_routing_LBS=big, segment_ids_BS=segs)
  assert costs[full].mean() <= 1.0
  budget = 0.3  # All BIG is over budget: cheapened first, then improved.
  routing = duo.greedy_oracle_routing(model, tokens, budget, init_routing_LBS=big,
                                      segment_ids_BS=segs)
  assert routing.shape == (TINY["num_layers"], b, s)
  assert costs[routing].mean() <= budget + 1e-6
  loss = lambda r: float(jnp.mean(duo.per_token_loss(model, tokens, jnp.asarray(r))))  # noqa
  # The search beats a random small/skip routing (of lower cost, ~0.125: a weak sanity check).
  rng = np.random.default_rng(0)
  random = np.where(rng.random(routing.shape) < 0.5, duo.SMALL, duo.SKIP)
  assert loss(routing) <= loss(random)


def test_validation_and_registry():
  with pytest.raises(ValueError, match="model.small_mlp_dim"):
    duo.Config(**TINY, small_mlp_dim=64)
  config = registry.make_config("duo", dict(TINY, small_mlp_dim=8))
  assert isinstance(registry.build("duo", config, rngs=nnx.Rngs(0)), duo.DuoTransformer)


def test_scan_layers_rejected_and_remat_recomputes_same_grads():
  with pytest.raises(ValueError, match=r"model.scan_layers=True is not supported by the 'duo'"):
    duo.Config(**dict(TINY, small_mlp_dim=16), scan_layers=True)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, TINY["vocab_size"])
  assert_remat_honoured(lambda remat: _model(remat=remat), tokens)
