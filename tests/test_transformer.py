"""The dense transformer: causality, packing, layer scan, remat, cache, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import transformer

TINY = transformer.Config(
  vocab_size=61, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48
)


def _model(config=TINY, seed=0):
  return transformer.Transformer(config, rngs=nnx.Rngs(seed))


def _tokens(shape, seed=1, vocab=TINY.vocab_size):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.mark.parametrize("changed", [0, 5, 11])
def test_changing_a_token_never_changes_earlier_logits(changed):
  model = _model(TINY.replace(qk_norm=True, qkv_bias=True))
  tokens_BS = _tokens((2, 12))
  logits, aux = model(tokens_BS)
  assert aux == {}
  other = tokens_BS.at[:, changed].set((tokens_BS[:, changed] + 1) % TINY.vocab_size)
  logits_other, _ = model(other)
  np.testing.assert_array_equal(logits[:, :changed], logits_other[:, :changed])
  assert np.abs(logits[:, changed:] - logits_other[:, changed:]).max() > 1e-3


def test_packed_batch_equals_sequences_run_separately():
  model = _model()
  lengths = [5, 3, 8]  # three documents packed in one row of 16, then 0-padding
  docs = [_tokens((1, n), seed=10 + i) for i, n in enumerate(lengths)]
  packed_BS = jnp.concatenate(docs + [jnp.zeros((1, 16 - sum(lengths)), jnp.int32)], axis=1)
  segment_ids_BS = jnp.array([[1] * 5 + [2] * 3 + [3] * 8])
  packed_logits, _ = model(packed_BS, segment_ids_BS=segment_ids_BS)
  start = 0
  for doc in docs:
    alone, _ = model(doc)
    n = doc.shape[1]
    np.testing.assert_allclose(packed_logits[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
    start += n


def test_positions_restart_per_segment():
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(
    transformer.positions_from_segments(segment_ids), [[0, 1, 2, 0, 1, 0, 0, 1]]
  )


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_remat_match_unrolled_forward_and_gradients(remat):
  tokens_BS = _tokens((2, 10))
  reference = _model()
  variant = _model(TINY.replace(scan_layers=True, remat=remat))

  def loss_and_grads(model):
    graphdef, state = nnx.split(model)

    def loss(state):
      logits, _ = nnx.merge(graphdef, state)(tokens_BS)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    return jax.value_and_grad(loss)(state)

  loss_ref, grads_ref = loss_and_grads(reference)
  loss_var, grads_var = loss_and_grads(variant)
  np.testing.assert_allclose(loss_var, loss_ref, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_var, grads_ref
  )


def test_cached_forward_matches_teacher_forcing():
  model = _model(TINY.replace(sliding_window=4))
  tokens_BS = _tokens((2, 9))
  full, _ = model(tokens_BS)
  cache = model.init_cache(batch=2, capacity=12)
  positions_BS = jnp.broadcast_to(jnp.arange(9), (2, 9))
  pieces = []
  for start, stop in [(0, 5), (5, 6), (6, 9)]:
    logits, cache = model.forward_cached(
      tokens_BS[:, start:stop], positions_BS[:, start:stop], cache
    )
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_every_parameter_has_logical_axes_matching_its_rank():
  model = _model(TINY.replace(qk_norm=True, qkv_bias=True, tie_embeddings=False))
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert leaves
  for variable in leaves:
    axes = variable.get_metadata()["logical_axes"]
    assert len(axes) == variable[...].ndim
  assert params["layers"]["mlp"]["gate"]["kernel"].get_metadata()["logical_axes"] == (
    "layers",
    "embed",
    "mlp",
  )


def test_bfloat16_compute_with_float32_params():
  model = _model(TINY.replace(dtype="bfloat16", tie_embeddings=True))
  logits, _ = model(_tokens((1, 6)))
  assert logits.dtype == jnp.float32
  assert model.embed[...].dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("num_kv_heads", 3, "model.num_heads=4 must be a multiple of model.num_kv_heads=3"),
    ("dim", 0, "model.dim=0"),
    ("head_dim", 7, "model.head_dim=7"),
    ("dtype", "fp8", "model.dtype='fp8'"),
    ("remat", "some", "model.remat='some'"),
    ("attention_impl", "magic", "model.attention_impl='magic'"),
    ("sliding_window", 0, "model.sliding_window=0"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "model.rope_scaling"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "model.rope_scaling"),
    ("norm_eps", 0.0, "model.norm_eps=0.0"),
  ],
)
def test_bad_config_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
    TINY.replace(**{field: value})
