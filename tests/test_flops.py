"""adaptive/flops.py: dense and adaptive accounting, checked against XLA's own cost analysis."""

import types

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from adaptive import flops
from models import duo, early_exit, first, m2r2, mod, transformer

# Matmuls dominate: wide layers, short rows, small vocabulary.
WIDE = dict(
  vocab_size=256, dim=256, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=1024
)


def _xla_forward_flops(model, b, s):
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((b, s), jnp.int32)
  # Return aux too, so the router/predictor work is not dead code.
  compiled = jax.jit(lambda st: nnx.merge(graphdef, st)(tokens)).lower(state).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


def test_dense_forward_matches_xla_cost_analysis():
  b, s = 2, 64
  config = transformer.Config(**WIDE)
  model = transformer.Transformer(config, rngs=nnx.Rngs(0))
  xla = _xla_forward_flops(model, b, s)
  # XLA multiplies the full S×S score matrix (masked half included): add that half.
  ours = flops.executed_forward_flops(
    config, b, s
  ) + config.num_layers * flops.attention_score_flops(config, b, s)
  assert ours == pytest.approx(xla, rel=0.10), (ours, xla)
  assert flops.executed_train_flops(config, b, s, {}) == 3 * flops.dense_forward_flops(config, b, s)


@pytest.mark.parametrize("capacity", [0.25, 0.5])
def test_mod_forward_matches_xla_cost_analysis(capacity):
  b, s = 2, 64
  config = mod.Config(
    **WIDE, capacity=capacity, routed_every=2, routed_offset=1, predictor_hidden=64
  )
  model = mod.MoDTransformer(config, rngs=nnx.Rngs(0))
  xla = _xla_forward_flops(model, b, s)
  k = flops.mod_routed_tokens(config, s)
  assert k == round(capacity * s)
  ours = (
    flops.executed_forward_flops(config, b, s, {"mod/routed_fraction": k / s})
    + flops.attention_score_flops(config, b, s)  # dense layer: masked half
    + flops.attention_score_flops(config, b, k)
  )  # routed layer over k tokens
  assert ours == pytest.approx(xla, rel=0.10), (ours, xla)
  # And it really is cheaper than the dense model.
  assert ours < 0.85 * (
    flops.dense_forward_flops(config, b, s) + 2 * flops.attention_score_flops(config, b, s)
  )


def test_mod_scaling_rules():
  c = types.SimpleNamespace(
    **WIDE, capacity=0.125, routed_every=2, routed_offset=1, predictor_hidden=0, sliding_window=None
  )
  b, s = 4, 1024
  k = flops.mod_routed_tokens(c, s)
  routed = flops.mod_forward_flops(c, b, s)
  dense_layer = flops.dense_layer_flops(c, b, s)
  linear = 2.0 * b * s * (flops.attention_projection_params(c) + flops.mlp_params(c))
  expected_routed_layer = linear * k / s + flops.attention_score_flops(c, b, s) * (k / s) ** 2
  router = 2.0 * b * s * c.dim
  assert routed == pytest.approx(
    dense_layer + expected_routed_layer + router + flops.lm_head_flops(c, b * s)
  )
  assert flops.executed_train_flops(c, b, s) == pytest.approx(3 * routed)


@pytest.mark.parametrize("small_capacity,big_capacity", [(0.5, 0.25), (1.0, 1.0)])
def test_duo_forward_matches_xla_cost_analysis(small_capacity, big_capacity):
  """The dispatched MLPs run on their slots only: XLA's count follows the capacities."""
  b, s = 2, 64
  config = duo.Config(
    **WIDE, small_mlp_dim=256, small_capacity=small_capacity, big_capacity=big_capacity
  )
  xla = _xla_forward_flops(duo.DuoTransformer(config, rngs=nnx.Rngs(0)), b, s)
  ours = flops.executed_forward_flops(
    config, b, s
  ) + config.num_layers * flops.attention_score_flops(config, b, s)  # masked half
  assert ours == pytest.approx(xla, rel=0.10), (ours, xla)
  # Executed = the options' slots, whatever the routing was.
  slots = flops.duo_routed_forward_flops(
    config, b, s, {"duo/frac_small": small_capacity, "duo/frac_big": big_capacity}
  )
  assert flops.executed_forward_flops(config, b, s, {"duo/frac_big": 0.0}) == slots


def test_duo_routed_and_first_use_realised_fractions():
  b, s = 2, 32
  dc = duo.Config(**WIDE, small_mlp_dim=256)
  dense = flops.dense_forward_flops(dc, b, s)
  router = dc.num_layers * 2.0 * b * s * dc.dim * 3
  all_big = flops.duo_routed_forward_flops(dc, b, s, {"duo/frac_small": 0.0, "duo/frac_big": 1.0})
  assert all_big == pytest.approx(dense + router)
  mixed = flops.duo_routed_forward_flops(dc, b, s, {"duo/frac_small": 0.5, "duo/frac_big": 0.25})
  ffn_saved = (
    dc.num_layers * 2.0 * b * s * (0.75 * flops.mlp_params(dc) - 0.5 * flops.mlp_params(dc, 256))
  )
  assert mixed == pytest.approx(all_big - ffn_saved)
  # Capacity 1 for both options executes both MLPs on every token.
  assert flops.executed_forward_flops(dc, b, s) == pytest.approx(
    all_big + dc.num_layers * 2.0 * b * s * flops.mlp_params(dc, 256)
  )

  fc = first.Config(**WIDE)
  none_skipped = flops.executed_forward_flops(fc, b, s, {"first/skip_fraction": 0.0})
  half = flops.executed_forward_flops(fc, b, s, {"first/skip_fraction": 0.5})
  assert none_skipped - half == pytest.approx(
    0.5 * fc.num_layers * flops.dense_layer_flops(fc, b, s)
  )
  assert flops.executed_train_flops(fc, b, s, {"first/skip_fraction": 0.5}) == pytest.approx(
    3 * half
  )


def _xla_flops(fn, *args):
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


# A vocabulary large enough that one LM head costs about as much as a layer.
EXITS = dict(WIDE, vocab_size=4096)


def test_early_exit_training_forward_matches_xla_cost_analysis():
  b, s = 2, 64
  config = early_exit.Config(**EXITS, exit_layers=(1,), exit_classifier=True, layer_drop_max=0.2)
  xla = _xla_forward_flops(early_exit.EarlyExitTransformer(config, rngs=nnx.Rngs(0)), b, s)
  masked_half = config.num_layers * flops.attention_score_flops(config, b, s)
  ours = flops.executed_forward_flops(config, b, s) + masked_half
  assert ours == pytest.approx(xla, rel=0.10), (ours, xla)
  print(f"early-exit training forward: ours/xla = {ours / xla:.3f}")
  # The exit's head is counted (leaving it out would miss by more than the tolerance).
  head = flops.lm_head_flops(config, b * s)
  assert abs(ours - head - xla) > 0.10 * xla
  # Dropped layers are masked, so training executes every layer: no discount for them.
  dense_plus_head = flops.dense_forward_flops(config, b, s) + head
  assert flops.executed_forward_flops(config, b, s, {"early_exit/layer_drop_fraction": 0.5}) > (
    dense_plus_head
  )
  # A curriculum that computed no exit head this step: the dense model plus the classifier.
  none = flops.executed_forward_flops(config, b, s, {"early_exit/exit_heads": 0.0})
  assert none == pytest.approx(flops.dense_forward_flops(config, b, s) + 2.0 * b * s * config.dim)
  assert flops.executed_train_flops(config, b, s) == pytest.approx(
    3 * flops.executed_forward_flops(config, b, s)
  )


def test_m2r2_training_forward_counts_its_adapters():
  b, s = 2, 64
  config = m2r2.Config(**EXITS, exit_layers=(1,), adapter_rank=WIDE["dim"])
  xla = _xla_forward_flops(m2r2.M2R2Transformer(config, rngs=nnx.Rngs(0)), b, s)
  masked_half = config.num_layers * flops.attention_score_flops(config, b, s)
  ours = flops.executed_forward_flops(config, b, s) + masked_half
  assert ours == pytest.approx(xla, rel=0.10), (ours, xla)
  adapters = flops.m2r2_adapter_flops(config, b * s)
  assert adapters == config.num_layers * 4 * b * s * config.dim * config.adapter_rank
  assert abs(ours - xla) < abs(ours - adapters - xla)  # counting them brings us closer to XLA
  print(f"m2r2 training forward: ours/xla = {ours / xla:.3f}")


def test_early_exit_decode_step_matches_xla_cost_analysis():
  b, t = 2, 64
  config = early_exit.Config(**dict(EXITS, num_layers=4))
  model = early_exit.EarlyExitTransformer(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens_B1 = jnp.zeros((b, 1), jnp.int32)
  positions_B1 = jnp.full((b, 1), t - 1, jnp.int32)  # Every cache slot is visible.

  def step(st, cache, **kw):
    return nnx.merge(graphdef, st).forward_cached_exits(tokens_B1, positions_B1, cache, **kw)

  cache = model.init_cache(b, t)
  measured = {}
  for exit_layer in (1, 2, 4):  # A fixed exit: blocks after it only project K/V.
    xla = _xla_flops(lambda st, c, e=exit_layer: step(st, c, exit_layer=e), state, cache)
    ours = flops.early_exit_decode_step_flops(config, b, t, [exit_layer] * b, measure=None)
    assert ours == pytest.approx(xla, rel=0.10), (exit_layer, ours, xla)
    print(f"fixed exit {exit_layer}: ours/xla = {ours / xla:.3f}")
    measured[exit_layer] = xla
  assert measured[1] < 0.5 * measured[4]  # Exiting early saves most of the step.
  # Confident exits: XLA counts each lax.cond at its dearer branch, i.e. no row ever leaves
  # and every exit computes its confidence (here the LM head).
  thresholds_B = jnp.full((b,), 0.5)
  for measure in ("softmax_diff", "cosine"):
    xla = _xla_flops(
      lambda st, c, m=measure: step(st, c, thresholds_B=thresholds_B, measure=m), state, cache
    )
    ours = flops.early_exit_decode_step_flops(config, b, t, [4] * b, measure=measure)
    assert ours == pytest.approx(xla, rel=0.10), (measure, ours, xla)
    print(f"confident exits, {measure}: ours/xla = {ours / xla:.3f}")
  # Rows at different depths: the deepest row keeps the others' blocks running (masked).
  mixed = flops.early_exit_decode_step_flops(config, b, t, [1, 3])
  assert mixed == pytest.approx(
    3 * 2.0 * b * (flops.attention_projection_params(config) + flops.mlp_params(config))
    + 3 * flops.decode_attention_flops(config, b, t)
    + flops.kv_projection_flops(config, b)
    + 3 * flops.lm_head_flops(config, b)  # Checks at exits 1, 2, 3, then the head.
    + flops.lm_head_flops(config, b)
  )
