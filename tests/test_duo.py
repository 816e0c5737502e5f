"""Duo-LLM FFN routing: oracle "all big" is the dense model; capacity dispatch; decoding; oracle search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from remat_check import assert_remat_honoured

from models import decoding, duo, registry, transformer

TINY = dict(
  vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)


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
  # The forward is exactly the chosen option, replayed independently layer by layer.
  m = nnx.merge(graphdef, state)
  expected, _ = _replay(m, tokens)
  learned = _jit(model, lambda mm: mm(tokens)[0])
  np.testing.assert_allclose(learned, expected, atol=1e-5, rtol=1e-5)


def _replay(m, tokens, slots=None, probe=False):
  """Reference Duo forward: routers' argmax, every MLP on every token, masked by the choice.

  With `slots` = (small, big) per row, a token is dropped to SKIP when it is
  past the first `slots` tokens of its row that chose the option. Weights are
  straight-through, onehot + p − stop_gradient(p): on every token for an
  option without slots given (capacity 1), on its slotted tokens otherwise;
  with `probe`, the slots left spare go to the tokens that did not choose the
  option with the highest p of it (their weight is 0 + p − stop_gradient(p)).
  Returns (logits, executed choices [L, B, S]).
  """
  b, s = tokens.shape
  x = m.embed_tokens(tokens)
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  lg, sm = nnx.split(m.layers), nnx.split(m.small_mlps)
  executed = []
  for i in range(m.config.num_layers):
    blk = nnx.merge(lg[0], jax.tree.map(lambda a, i=i: a[i], lg[1]))
    small = nnx.merge(sm[0], jax.tree.map(lambda a, i=i: a[i], sm[1]))
    h = x + blk.attn(blk.attn_norm(x), pos, None)[0]
    n = blk.mlp_norm(h)
    p = jax.nn.softmax(n @ m.ffn_router[...][i], -1)
    choice = jnp.argmax(p, -1)
    w = jax.nn.one_hot(choice, 3) + p - jax.lax.stop_gradient(p)
    for option in (duo.SMALL, duo.BIG):
      if slots is not None:
        wants = choice == option
        dropped = wants & (jnp.cumsum(wants, axis=1) > slots[option - 1])
        slotted = wants & ~dropped
        if probe:
          spare = slots[option - 1] - jnp.sum(slotted, axis=1, keepdims=True)
          score = jnp.where(wants, -jnp.inf, jax.lax.stop_gradient(p[..., option]))
          rank = jnp.argsort(jnp.argsort(-score, axis=1, stable=True), axis=1)
          slotted = slotted | (~wants & (rank < spare))
        w = w.at[..., option].multiply(jnp.where(slotted, 1.0, 0.0))
        choice = jnp.where(dropped, duo.SKIP, choice)
    executed.append(choice)
    x = h + w[..., 2:] * blk.mlp(n) + w[..., 1:2] * small(n)
  return m.logits_from_hidden(x), np.stack(executed)


@pytest.mark.parametrize(
  "capacity,slots,probe", [(1.0, None, False), (0.25, (4, 4), False), (0.25, (4, 4), True)]
)
def test_router_gradient_matches_straight_through_reference(capacity, slots, probe):
  """Capacity 1: every option's gradient reaches the router; dispatched: the slotted ones,
  and with probing also the tokens in the spare slots."""
  tokens = jax.random.randint(jax.random.key(7), (2, 16), 0, 64)
  model = _model(7, small_capacity=capacity, big_capacity=capacity, probe_spare_slots=probe)
  graphdef, state = nnx.split(model)
  loss = lambda logits: jnp.mean(jax.nn.logsumexp(logits, -1))  # noqa
  got = jax.grad(lambda st: loss(nnx.merge(graphdef, st)(tokens)[0]))(state)
  want = jax.grad(lambda st: loss(_replay(nnx.merge(graphdef, st), tokens, slots, probe)[0]))(state)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)
  assert np.abs(np.asarray(got["ffn_router"][...])).max() > 0
  if probe:  # The probes give the router gradient, and never change the forward.
    unprobed = jax.grad(lambda st: loss(_replay(nnx.merge(graphdef, st), tokens, slots)[0]))(state)
    assert np.abs(np.asarray(got["ffn_router"][...] - unprobed["ffn_router"][...])).max() > 1e-4
    np.testing.assert_allclose(
      nnx.merge(graphdef, state)(tokens)[0], _replay(model, tokens, slots)[0], atol=1e-5, rtol=1e-5
    )


def test_capacity_dispatch_runs_first_come_tokens_and_drops_the_rest():
  b, s = 2, 16
  model = _model(3, small_capacity=0.25, big_capacity=0.25)  # 4 slots per row and option.
  tokens = jax.random.randint(jax.random.key(3), (b, s), 0, 64)
  logits, aux = _jit(model, lambda m: m(tokens))
  expected, executed = _replay(model, tokens, slots=(4, 4))
  np.testing.assert_array_equal(aux["routing_LBS"], executed)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  _, unconstrained = _replay(model, tokens)
  dropped = float(np.mean(executed != unconstrained))
  assert dropped > 0  # The capacity binds in this example, so the drop path is exercised.
  assert float(aux["metrics"]["duo/frac_dropped"]) == pytest.approx(dropped)
  for option in (duo.SMALL, duo.BIG):
    assert (np.sum(executed == option, axis=2) <= 4).all()


def test_capacity_dispatch_gradients_equal_the_masked_dense_model():
  """A fixed routing over capacity: gather/scatter grads = every MLP on every token, masked."""
  b, s = 2, 12
  tokens = jax.random.randint(jax.random.key(4), (b, s), 0, 64)
  segs = jnp.asarray([[1] * 5 + [2] * 7, [1] * 10 + [0] * 2])
  routing = jax.random.randint(jax.random.key(5), (TINY["num_layers"], b, s), 0, 3)
  narrow = _model(4, small_capacity=0.25, big_capacity=0.5)  # 3 and 6 slots per row.
  wants = lambda o: np.asarray(routing) == o  # noqa
  executed = np.where(
    (wants(duo.SMALL) & (np.cumsum(wants(duo.SMALL), -1) > 3))
    | (wants(duo.BIG) & (np.cumsum(wants(duo.BIG), -1) > 6)),
    duo.SKIP,
    np.asarray(routing),
  )
  # Every MLP on every token (one-hot weights, no capacity), the executed routing.
  one_hot = jax.nn.one_hot(executed, 3)
  results = []
  for kw in (dict(routing_LBS=routing), dict(routing_weights_LBSO=one_hot)):
    graphdef, state = nnx.split(narrow)

    def loss(st, kw=kw, graphdef=graphdef):
      logits, aux = nnx.merge(graphdef, st)(tokens, segment_ids_BS=segs, **kw)
      return jnp.mean(jax.nn.logsumexp(logits, -1) * jnp.arange(s)), aux["routing_LBS"]

    results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(state))
  (got, got_routing), got_grads = results[0]
  (want, _), want_grads = results[1]
  np.testing.assert_array_equal(got_routing, executed)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


def test_decoding_routes_each_token_like_the_teacher_forced_forward():
  lengths = np.array([5, 3], np.int32)
  model = _model(5)
  prompts = np.asarray(jax.random.randint(jax.random.key(6), (2, 5), 1, 64), np.int32)
  out = decoding.generate(model, prompts, lengths, max_new_tokens=6)
  _, aux = model(prompts[:1])
  assert 0 < float(aux["metrics"]["duo/frac_big"]) < 1  # The routers do mix options.
  for r in range(2):
    seq = np.concatenate([prompts[r, : lengths[r]], np.asarray(out.tokens_BN[r])])
    logits, _ = model(jnp.asarray(seq)[None])
    logp = jax.nn.log_softmax(logits[0, lengths[r] - 1 : -1], -1)
    teacher = np.take_along_axis(np.asarray(logp), np.asarray(out.tokens_BN[r])[:, None], -1)
    np.testing.assert_allclose(np.asarray(out.logprobs_BN[r]), teacher[:, 0], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.tokens_BN[r]), np.argmax(logp, -1))


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
  routing = duo.greedy_oracle_routing(
    model, tokens, budget, init_routing_LBS=big, segment_ids_BS=segs
  )
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
  with pytest.raises(ValueError, match="model.probe_spare_slots='yes'"):
    duo.Config(**TINY, small_mlp_dim=16, probe_spare_slots="yes")
  config = registry.make_config("duo", dict(TINY, small_mlp_dim=8))
  assert isinstance(registry.build("duo", config, rngs=nnx.Rngs(0)), duo.DuoTransformer)


@pytest.mark.parametrize("field", ["small_capacity", "big_capacity"])
@pytest.mark.parametrize("value", [0, 1.5, True, "half"])
def test_capacity_validation_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"model.{field}="):
    duo.Config(**TINY, small_mlp_dim=16, **{field: value})


def test_scan_layers_equals_unrolled_and_remat_recomputes_same_grads():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, TINY["vocab_size"])
  results = []
  for scan in (False, True):
    graphdef, state = nnx.split(_model(6, scan_layers=scan, small_capacity=0.5))

    def loss(st, graphdef=graphdef):
      logits, aux = nnx.merge(graphdef, st)(tokens)
      return jnp.mean(logits**2) + sum(aux["losses"].values()), aux["routing_LBS"]

    results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(state))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
  assert_remat_honoured(lambda remat: _model(remat=remat), tokens)
