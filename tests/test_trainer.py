"""Train step: loss against a numpy reference, aux losses, accumulation, non-finite skip, bf16."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm_dense
from models import registry, transformer
from train import config_lib, main, sharding, trainer


def tiny_config(**changes):
  c = lm_dense.get_config()
  c.total_steps = 6
  c.batch_size = 8
  c.seq_len = 16
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 0
  c.model.update(
    dict(
      dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, dtype="float32"
    )
  )
  c.optimizer.warmup_steps = 2
  c.data.prefetch = 0
  c.mesh.data = 2
  for key, value in changes.items():  # dotted paths: "optimizer.grad_accum_steps"
    *parents, leaf = key.split(".")
    target = c
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return c


def make_setup(config, devices=None):
  devices = jax.devices()[:2] if devices is None else devices
  run = config_lib.validate(config, num_devices=len(devices))
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  return run, trainer.setup(run, config, mesh, donate=False)


def random_batch(seed, b=8, s=16, vocab=320):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (b, s)).astype(np.int32)
  segment_ids = np.ones((b, s), np.int32)
  segment_ids[:, s // 2 :] = 2
  segment_ids[0, -3:] = 0  # padding
  positions = np.concatenate([np.arange(s // 2)] * 2)[None].repeat(b, 0).astype(np.int32)
  loss_mask = (segment_ids > 0).astype(np.float32)
  return {
    "tokens": tokens,
    "targets": np.roll(tokens, -1, 1),
    "segment_ids": segment_ids,
    "positions": positions,
    "loss_mask": loss_mask,
  }


def numpy_loss(setup, state, batch):
  """Masked next-token cross entropy from the model's logits, written out in numpy."""
  model = nnx.merge(setup.graphdef, jax.device_get(state["params"]))
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  logits = np.asarray(logits, np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  return float((nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum())


def test_loss_matches_numpy_reference():
  _, setup = make_setup(tiny_config())
  state = setup.init()
  batch = random_batch(0)
  expected = numpy_loss(setup, state, batch)
  _, metrics = setup.train_step(state, trainer.device_batch(batch, setup))
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["loss_tokens"]) == batch["loss_mask"].sum()


def test_gradient_accumulation_equals_one_big_batch():
  batches = [random_batch(i) for i in range(3)]
  losses, params = {}, {}
  for accum in (1, 4):
    # Adam divides by sqrt(v) + eps: at the default eps a gradient that is ~0 up to float32
    # rounding still moves its parameter by ~lr, so the two summation orders would differ there.
    changes = {"optimizer.grad_accum_steps": accum, "optimizer.eps": 1e-4}
    _, setup = make_setup(tiny_config(**changes))
    state = setup.init()
    losses[accum] = []
    for batch in batches:
      state, metrics = setup.train_step(state, trainer.device_batch(batch, setup))
      losses[accum].append(float(metrics["loss"]))
    params[accum] = jax.device_get(state["params"])
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params[4], params[1])


def test_nonfinite_step_is_skipped_and_counted():
  _, setup = make_setup(tiny_config())
  state = setup.init()
  good = random_batch(0)
  bad = dict(good, loss_mask=good["loss_mask"].copy())
  bad["loss_mask"][1, 2] = np.nan
  before = jax.device_get(state)
  state, m = setup.train_step(state, trainer.device_batch(bad, setup))
  assert float(m["finite"]) == 0 and int(m["nonfinite_streak"]) == 1
  after = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, after["params"], before["params"])
  jax.tree.map(np.testing.assert_array_equal, after["opt_state"], before["opt_state"])
  assert int(after["step"]) == 1 and int(after["nonfinite_total"]) == 1
  state, m = setup.train_step(state, trainer.device_batch(good, setup))
  assert float(m["finite"]) == 1 and int(m["nonfinite_streak"]) == 0
  assert int(m["nonfinite_total"]) == 1 and int(state["step"]) == 2
  assert trainer.state_is_finite(setup, state)
  broken = dict(state, params=jax.tree.map(lambda x: x * np.nan, state["params"]))
  assert not trainer.state_is_finite(setup, broken)


def test_run_stops_after_max_nonfinite_steps(tmp_path, monkeypatch):
  make = main.make_data_iterator

  def poisoned(config, split):
    it = make(config, split)

    class Poisoned:
      def __next__(self):
        batch = dict(next(it))
        batch["loss_mask"] = batch["loss_mask"] * np.nan
        return batch

      get_state, set_state = it.get_state, it.set_state

    return Poisoned()

  monkeypatch.setattr(main, "make_data_iterator", poisoned)
  config = tiny_config(max_nonfinite_steps=3, total_steps=20, checkpoint_every=2)
  with pytest.raises(main.NonFiniteError, match="max_nonfinite_steps=3"):
    main.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:2])


@dataclasses.dataclass(frozen=True)
class AuxConfig(transformer.Config):
  aux_weight: float = 0.25


class AuxModel(transformer.Transformer):
  """The dense model plus a reported auxiliary loss and metric (like the adaptive variants)."""

  def __call__(self, tokens_BS, positions_BS=None, segment_ids_BS=None):
    logits, _ = super().__call__(tokens_BS, positions_BS, segment_ids_BS)
    z = self.config.aux_weight * jnp.mean(jnp.square(self.final_norm.scale[...]))
    return logits, {"losses": {"z": z}, "metrics": {"skip_fraction": jnp.float32(0.5)}}


def test_aux_losses_are_added_and_metrics_reported(monkeypatch):
  monkeypatch.setitem(registry.MODELS, "aux_test", (AuxConfig, AuxModel))
  config = tiny_config()
  config.model.kind = "aux_test"
  with config.model.unlocked():
    config.model.aux_weight = 0.25
  _, setup = make_setup(config)
  state = setup.init()
  batch = random_batch(1)
  _, metrics = setup.train_step(state, trainer.device_batch(batch, setup))
  lm = numpy_loss(setup, state, batch)
  assert float(metrics["lm_loss"]) == pytest.approx(lm, rel=1e-5)
  assert float(metrics["aux_loss/z"]) == pytest.approx(0.25)  # scales start at 1
  assert float(metrics["loss"]) == pytest.approx(lm + 0.25, rel=1e-5)
  assert float(metrics["aux/skip_fraction"]) == 0.5


def test_bfloat16_compute_keeps_float32_state():
  _, setup = make_setup(tiny_config(**{"model.dtype": "bfloat16"}))
  state = setup.init()
  losses = []
  for _ in range(3):
    state, m = setup.train_step(state, trainer.device_batch(random_batch(0), setup))
    losses.append(float(m["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  dtypes = {x.dtype for x in jax.tree.leaves(state["params"])}
  dtypes |= {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim}
  assert dtypes == {jnp.dtype("float32")}


def test_schedules():
  opt = tiny_config().optimizer
  opt.update(dict(learning_rate=1.0, warmup_steps=10, min_learning_rate_ratio=0.1))
  cosine = trainer.make_schedule(opt, 110)
  assert float(cosine(0)) == pytest.approx(0.1)
  assert float(cosine(9)) == pytest.approx(1.0)
  assert float(cosine(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
  assert float(cosine(110)) == pytest.approx(0.1)
  opt.schedule = "constant"
  assert float(trainer.make_schedule(opt, 110)(100)) == pytest.approx(1.0)
  opt.schedule = "linear"
  assert float(trainer.make_schedule(opt, 110)(60)) == pytest.approx(0.55)


def test_weight_decay_skips_norms():
  config = tiny_config()
  kind, fields = config_lib.model_fields(config)
  abstract = nnx.eval_shape(
    lambda: registry.build(kind, registry.make_config(kind, fields), rngs=nnx.Rngs(0))
  )
  mask = trainer.weight_decay_mask(nnx.state(abstract, nnx.Param))
  assert mask["layers"]["mlp"]["up"]["kernel"] and mask["embed"]
  assert not mask["layers"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]


def test_eval_and_rescoring_run_without_layerskip_layer_drop():
  """Evaluation and rollout re-scoring use the model in eval mode: no layer drop, no schedule."""
  config = tiny_config()
  config.model.kind = "early_exit"
  with config.model.unlocked():
    config.model.exit_layers = (1,)
    config.model.layer_drop_max = 0.9
  _, setup = make_setup(config)
  state = setup.init()
  batch = random_batch(2)
  device_batch = trainer.device_batch(batch, setup)
  first = setup.eval_step(state, device_batch)
  second = setup.eval_step(state, device_batch)
  model = nnx.merge(
    setup.graphdef, jax.device_get(state["params"]), jax.device_get(state["model_state"])
  )
  model.eval()
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
  expected = float((nll * batch["loss_mask"]).sum())
  assert float(first["ce_sum"]) == float(second["ce_sum"])
  assert float(first["ce_sum"]) == pytest.approx(expected, rel=1e-5)
