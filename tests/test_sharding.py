"""Mesh construction, logical-axis rules and mesh-independence of training (8 fake CPU devices)."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import lm_dense
from train import config_lib, main, sharding, trainer

RULES = (
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("layers", None),
)


def tiny_config(**mesh):
  c = lm_dense.get_config()
  c.total_steps = 5
  c.batch_size = 8
  c.seq_len = 32
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
  c.mesh.update(mesh)
  return c


def test_resolve_mesh_shape_fills_the_rest():
  assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {
    "data": 4,
    "fsdp": 2,
    "tensor": 1,
  }
  assert sharding.resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8)["tensor"] == 2
  with pytest.raises(ValueError, match="mesh"):
    sharding.resolve_mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="mesh.fsdp=-1"):
    sharding.resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_logical_to_spec_follows_rules_and_divisibility():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.logical_to_spec(("layers", "embed", "mlp"), (2, 64, 128), mesh, RULES) == P(
    None, "fsdp", "tensor"
  )
  # kv_heads=1 cannot be split over tensor=2: replicated on that dimension.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh, RULES) == P(
    "fsdp", None, None
  )
  # One mesh axis never shards two dimensions of the same array.
  assert sharding.logical_to_spec(("mlp", "vocab"), (128, 256), mesh, RULES) == P("tensor", None)
  # A tuple of mesh axes.
  rules = (("embed", ("fsdp", "tensor")),)
  assert sharding.logical_to_spec(("embed",), (64,), mesh, rules) == P(("fsdp", "tensor"))


def test_sharded_init_places_shards_not_copies():
  config = tiny_config(data=2, fsdp=2, tensor=2)
  run = config_lib.validate(config, num_devices=8)
  mesh = sharding.make_mesh(dict(config.mesh))
  setup = trainer.setup(run, config, mesh)
  state = setup.init()
  kernel = state["params"]["layers"]["mlp"]["gate"]["kernel"]  # [layers, embed, mlp]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (2, 32, 64)
  mu = state["opt_state"][1][0].mu["layers"]["mlp"]["gate"]["kernel"]
  assert mu.sharding.spec == kernel.sharding.spec
  assert state["step"].sharding.spec == P()


def test_warns_when_a_large_parameter_is_replicated(caplog):
  config = tiny_config(data=2, fsdp=2, tensor=2)
  config.model.update(dict(vocab_size=4096, dim=512, num_heads=4, head_dim=16))
  config.logical_axis_rules = (("layers", None),)  # nothing is sharded
  run = config_lib.validate(config, num_devices=8)
  mesh = sharding.make_mesh(dict(config.mesh))
  with caplog.at_level(logging.WARNING):
    trainer.setup(run, config, mesh)
  assert any("embed" in r.getMessage() and "replicated" in r.getMessage() for r in caplog.records)


def _losses(config, devices, tmp_path):
  summary = main.train_and_evaluate(config, str(tmp_path), devices=devices)
  return np.array([summary["losses"][s] for s in range(1, 6)])


def test_same_losses_on_every_mesh(tmp_path):
  devices = jax.devices()
  assert len(devices) == 8
  single = _losses(tiny_config(data=1), devices[:1], tmp_path / "single")
  data8 = _losses(tiny_config(data=8), devices, tmp_path / "data8")
  mixed = _losses(tiny_config(data=2, fsdp=2, tensor=2), devices, tmp_path / "mixed")
  assert np.all(np.isfinite(single)) and single[-1] < single[0]
  np.testing.assert_allclose(data8, single, rtol=0, atol=1e-5)
  np.testing.assert_allclose(mixed, single, rtol=0, atol=1e-5)
