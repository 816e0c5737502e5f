"""FiRST: prompt-decided skipping equals the dense model with those layers removed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from remat_check import assert_remat_honoured

from models import first, registry, transformer

TINY = dict(
  vocab_size=64, dim=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)


def _dense_without(model, keep):
  """An independent dense Transformer holding only the layers in `keep`."""
  dense = transformer.Transformer(
    transformer.Config(**dict(TINY, num_layers=len(keep))), rngs=nnx.Rngs(0)
  )
  state = nnx.state(model)
  sub = nnx.state(dense)
  sub["embed"] = state["embed"]
  sub["final_norm"] = state["final_norm"]
  sub["lm_head"] = state["lm_head"]
  sub["layers"] = jax.tree.map(lambda a: a[jnp.asarray(keep)], state["layers"])
  nnx.update(dense, sub)
  return dense


def _decode_all(model, tokens, prompt_len, lengths):
  graphdef, state = nnx.split(model)
  b, s = tokens.shape
  prefill = jax.jit(lambda st, t, n, c: nnx.merge(graphdef, st).prefill(t, n, c))
  step = jax.jit(lambda st, t, p, c: nnx.merge(graphdef, st).forward_cached(t, p, c))
  cache = model.init_cache(b, s)
  logits, cache = prefill(state, tokens[:, :prompt_len], lengths, cache)
  out = [logits]
  for t in range(prompt_len, s):
    logits, cache = step(state, tokens[:, t : t + 1], jnp.full((b, 1), t), cache)
    out.append(logits)
  return jnp.concatenate(out, 1), cache


def test_decode_with_prompt_skip_set_equals_dense_without_those_layers():
  b, s, prompt = 2, 9, 4
  model = first.FiRSTTransformer(first.Config(**TINY), rngs=nnx.Rngs(1))
  # Decisions that depend on the prompt: row-specific skip sets.
  w = jax.random.normal(jax.random.key(0), (TINY["num_layers"], TINY["dim"])) * 0.5
  model.skip_router_w[...] = w
  model.skip_router_b[...] = jnp.asarray([8.0, 0.0, 0.0, -8.0])
  tokens = jax.random.randint(jax.random.key(1), (b, s), 0, 64)
  got, cache = _decode_all(model, tokens, prompt, jnp.full((b,), prompt))
  execute = np.asarray(cache.execute_BL)
  assert execute[:, 0].all() and not execute[:, 3].any()
  assert (execute[0] != execute[1]).any()  # The rows differ: per-sequence decisions.
  for row in range(b):
    keep = [i for i in range(TINY["num_layers"]) if execute[row, i]]
    dense = _dense_without(model, keep)
    want, _ = dense(tokens[row : row + 1])
    np.testing.assert_allclose(got[row : row + 1], want, atol=1e-5, rtol=1e-5)
    # Skipped layers never wrote the cache.
    for i in range(TINY["num_layers"]):
      if not execute[row, i]:
        assert not np.asarray(cache.k_LBTKD[i, row]).any()


def test_prefill_pools_only_real_prompt_tokens():
  b, s = 2, 6
  model = first.FiRSTTransformer(first.Config(**TINY), rngs=nnx.Rngs(1))
  model.skip_router_w[...] = jax.random.normal(jax.random.key(0), (4, 32)) * 3
  model.skip_router_b[...] = jnp.zeros(4)
  tokens = jax.random.randint(jax.random.key(1), (b, s), 0, 64)
  padded = tokens.at[1, 3:].set(7)  # Row 1 has 3 real tokens; padding must not matter.
  lengths = jnp.asarray([s, 3])
  _, c1 = model.prefill(tokens, lengths, model.init_cache(b, s))
  _, c2 = model.prefill(padded, lengths, model.init_cache(b, s))
  np.testing.assert_array_equal(c1.execute_BL, c2.execute_BL)


def test_training_relaxed_gates_hard_mode_and_loading_dense():
  b, s = 2, 8
  dense = transformer.Transformer(transformer.Config(**TINY), rngs=nnx.Rngs(3))
  model = first.FiRSTTransformer(
    first.Config(**TINY, skip_penalty=0.1, router_init_bias=30.0), rngs=nnx.Rngs(4)
  )
  first.load_dense(model, nnx.state(dense))
  tokens = jax.random.randint(jax.random.key(2), (b, s), 0, 64)
  graphdef, state = nnx.split(model)
  # Gates saturated open: the model is the dense model it was loaded from.
  logits, aux = jax.jit(lambda st: nnx.merge(graphdef, st)(tokens, gates="hard"))(state)
  np.testing.assert_allclose(logits, dense(tokens)[0], atol=1e-5, rtol=1e-5)
  assert float(aux["metrics"]["first/skip_fraction"]) == 0.0
  # Routers get gradients from LM loss + compute penalty; only they are selected to train.
  model.skip_router_b[...] = jnp.zeros(4)
  graphdef, state = nnx.split(model)

  def loss(st):
    logits, aux = nnx.merge(graphdef, st)(tokens)
    return jnp.mean(logits**2) * 1e-3 + sum(aux["losses"].values())

  grads = jax.jit(jax.grad(loss))(state)
  assert np.abs(np.asarray(grads["skip_router_b"][...])).min() > 0
  routers = nnx.state(model, first.ROUTER_PARAMS)
  assert set(routers.keys()) == {"skip_router_w", "skip_router_b"}


def test_validation_and_registry():
  with pytest.raises(ValueError, match="model.gate_temperature"):
    first.Config(**TINY, gate_temperature=0.0)
  with pytest.raises(ValueError, match="model.prompt_length"):
    first.Config(**TINY, prompt_length=-1)
  config = registry.make_config("first", dict(TINY, skip_penalty=0.0))
  assert isinstance(registry.build("first", config, rngs=nnx.Rngs(0)), first.FiRSTTransformer)


def _routed_model(scan_layers=False):
  model = first.FiRSTTransformer(first.Config(**TINY, scan_layers=scan_layers), rngs=nnx.Rngs(1))
  model.skip_router_w[...] = jax.random.normal(jax.random.key(0), (4, 32)) * 0.5
  model.skip_router_b[...] = jnp.asarray([8.0, 0.0, 0.0, -8.0])
  return model


def test_scan_layers_equals_unrolled_in_training_and_decoding():
  b, s, prompt = 2, 9, 4
  tokens = jax.random.randint(jax.random.key(1), (b, s), 0, 64)
  results = []
  for scan in (False, True):
    model = _routed_model(scan)
    graphdef, state = nnx.split(model)

    def loss(st, graphdef=graphdef):
      logits, aux = nnx.merge(graphdef, st)(tokens)
      return jnp.mean(logits**2) + sum(aux["losses"].values())

    decoded, cache = _decode_all(model, tokens, prompt, jnp.asarray([prompt, 3]))
    results.append((jax.jit(jax.value_and_grad(loss))(state), decoded, cache))
  for a, b_ in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-6, rtol=1e-5)
  execute = np.asarray(results[1][2].execute_BL)
  assert execute[:, 0].all() and not execute[:, 3].any()  # Both branches of the layer cond ran.


def test_remat_recomputes_same_grads():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, TINY["vocab_size"])
  assert_remat_honoured(
    lambda remat: first.FiRSTTransformer(first.Config(**TINY, remat=remat), rngs=nnx.Rngs(0)),
    tokens,
  )
