"""Objectives handed to the trainer: SFT's response-only loss, log-probs through the setup."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import lm_dense
from train import config_lib, losses, sharding, trainer


def log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_sft_loss_is_cross_entropy_on_response_tokens_only():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (3, 6)).astype(np.int32)
  prompt = np.array([2, 4, 1])
  batch = {
    "targets": targets,
    "loss_mask": (np.arange(6)[None] >= prompt[:, None]).astype(np.float32),
  }
  objective = losses.sft()
  loss, metrics = objective.loss(logits, batch, objective.totals(batch))
  nll = -np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]
  response = [nll[b, t] for b in range(3) for t in range(6) if t >= prompt[b]]
  assert float(loss) == pytest.approx(np.mean(response), rel=1e-6)
  assert float(metrics["lm_loss"]) == float(loss)


def test_logprobs_equal_the_models_log_softmax():
  """Through the setup, in one batch and in the micro-batches of gradient accumulation."""
  c = lm_dense.get_config()
  c.batch_size, c.seq_len, c.data.prefetch = 4, 8, 0
  c.model.update(dict(dim=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64, dtype="float32"))
  c.mesh.data = 1
  mesh = sharding.make_mesh(dict(c.mesh), jax.devices()[:1])
  setup = trainer.setup(config_lib.validate(c, num_devices=1), c, mesh)
  state = setup.init()
  c.optimizer.grad_accum_steps = 2
  accumulating = trainer.setup(config_lib.validate(c, num_devices=1), c, mesh)
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, 300, (4, 8)).astype(np.int32)
  batch = {
    "tokens": tokens,
    "targets": np.roll(tokens, -1, 1),
    "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1)),
    "segment_ids": np.ones((4, 8), np.int32),
  }
  model = nnx.merge(setup.graphdef, jax.device_get(state["params"]))
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  expected = np.take_along_axis(log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  for s in (setup, accumulating):
    got = s.logprobs(state, trainer.device_batch(batch, s, fields=trainer.LOGPROB_FIELDS))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)
