"""Models give the same logits with the XLA attention and the Pallas kernels (interpreted)."""

import importlib
from unittest import mock

import jax
import numpy as np
import pytest
from flax import nnx

from models import mod, transformer

# The package exports the function `kernels.attention`, which shadows the submodule name.
attention_module = importlib.import_module("kernels.attention")

SHAPE = dict(
  vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=64
)


@pytest.mark.parametrize("kind", ["dense", "mod"])
def test_xla_and_interpreted_pallas_give_the_same_logits(kind):
  if kind == "dense":
    config, build = transformer.Config(**SHAPE, attention_impl="xla"), transformer.Transformer
  else:
    config, build = mod.Config(**SHAPE, attention_impl="xla", capacity=0.5), mod.MoDTransformer
  tokens_BS = jax.random.randint(jax.random.key(0), (2, 24), 0, 64)
  segment_ids_BS = np.array([[1] * 10 + [2] * 14, [1] * 24])
  xla_model = build(config, rngs=nnx.Rngs(0))
  logits_xla, _ = xla_model(tokens_BS, segment_ids_BS=segment_ids_BS)

  pallas_model = build(
    config.replace(attention_impl="pallas", attention_interpret=True), rngs=nnx.Rngs(1)
  )
  nnx.update(pallas_model, nnx.state(xla_model))
  real_kernel = attention_module.pallas_attention
  with mock.patch.object(attention_module, "pallas_attention", side_effect=real_kernel) as kernel:
    logits_pallas, _ = pallas_model(tokens_BS, segment_ids_BS=segment_ids_BS)
  assert kernel.call_count == config.num_layers
  np.testing.assert_allclose(logits_pallas, logits_xla, atol=1e-5, rtol=1e-5)
