"""Checkpoints: exact restore, resharding 8 -> 4 devices, init_from, torn saves (8 fake devices)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import lm_dense
from train import checkpoint as checkpoint_lib
from train import config_lib, main, sharding, trainer


def tiny_config(total_steps, **mesh):
  c = lm_dense.get_config()
  c.total_steps = total_steps
  c.batch_size = 8
  c.seq_len = 32
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 2
  c.model.update(
    dict(
      dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, dtype="float32"
    )
  )
  c.optimizer.warmup_steps = 2
  c.optimizer.schedule = "constant"  # runs of different lengths share the schedule
  c.data.prefetch = 0
  c.mesh.update(mesh)
  return c


def abstract_state(config, devices):
  run = config_lib.validate(config, num_devices=len(devices))
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  return trainer.setup(run, config, mesh).abstract_state


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
  """4 steps on 8 devices with (data=2, fsdp=2, tensor=2); checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("run8")
  config = tiny_config(4, data=2, fsdp=2, tensor=2)
  summary = main.train_and_evaluate(config, str(workdir), devices=jax.devices())
  return workdir, config, summary


def test_checkpoint_restores_onto_4_devices_and_continues(run8, tmp_path):
  workdir, config8, summary8 = run8
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=2)
  assert ckpt.all_steps() == [2, 4]
  state8, data8 = ckpt.restore(4, abstract_state(config8, jax.devices()))
  config4 = tiny_config(6, data=2, fsdp=1, tensor=2)
  devices4 = jax.devices()[:4]
  state4, data4 = ckpt.restore(4, abstract_state(config4, devices4))
  ckpt.close()
  assert data4 == data8
  assert int(state4["step"]) == 4
  kernel4 = state4["params"]["layers"]["mlp"]["up"]["kernel"]
  assert set(kernel4.sharding.device_set) == set(devices4)
  assert kernel4.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state4), jax.device_get(state8))

  # The 8-device run's workdir continues on 4 devices, to the same losses as 6 steps on 8.
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir / "checkpoints", resumed / "checkpoints")
  summary4 = main.train_and_evaluate(config4, str(resumed), devices=devices4)
  assert sorted(summary4["losses"]) == [5, 6]
  reference = main.train_and_evaluate(
    tiny_config(6, data=2, fsdp=2, tensor=2), str(tmp_path / "reference"), devices=jax.devices()
  )
  for step in (5, 6):
    assert summary4["losses"][step] == pytest.approx(reference["losses"][step], abs=1e-5)


def test_init_from_another_runs_checkpoint(run8, tmp_path, capsys):
  workdir, config8, _ = run8
  config = tiny_config(6, data=2, tensor=2)
  config.init_from = str(workdir / "checkpoints")
  abstract = abstract_state(config, jax.devices()[:4])
  params = checkpoint_lib.load_params(config.init_from, abstract["params"])
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=2)
  saved, _ = ckpt.restore(4, abstract)
  ckpt.close()
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(params), jax.device_get(saved["params"])
  )
  # A step directory works too, and a directory without checkpoints is an error.
  params2 = checkpoint_lib.load_params(str(workdir / "checkpoints" / "2"), abstract["params"])
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="init_from"):
    checkpoint_lib.load_params(str(tmp_path), abstract["params"])
  # Through the trainer: parameters from run8, a fresh optimizer and step 0.
  summary = main.train_and_evaluate(config, str(tmp_path / "new"), devices=jax.devices()[:4])
  assert "initialised from" in capsys.readouterr().out
  assert sorted(summary["losses"]) == list(range(1, 7))
  assert summary["losses"][1] < 5.0  # run8 started at 6.2 and reached 4.98


def test_unfinished_save_is_ignored(run8, tmp_path):
  workdir, _, _ = run8
  copy = tmp_path / "checkpoints"
  shutil.copytree(workdir / "checkpoints", copy)
  # What a crash in the middle of writing step 6 leaves behind.
  torn = copy / "6.orbax-checkpoint-tmp-1234567"
  os.makedirs(torn / "state")
  (torn / "state" / "garbage").write_bytes(b"\0" * 100)
  ckpt = checkpoint_lib.Checkpointer(copy, keep=2)
  assert ckpt.latest_step() == 4
  ckpt.close()


def test_crash_before_first_commit_restarts_fresh_without_duplicate_records(run8, tmp_path):
  """A kill -9 before any save committed leaves a torn save and metrics of steps to redo."""
  _, config, summary8 = run8
  workdir = tmp_path / "crashed"
  torn = workdir / "checkpoints" / "2.orbax-checkpoint-tmp-1234567" / "state"
  os.makedirs(torn)
  (torn / "garbage").write_bytes(b"\0" * 100)
  with open(run8[0] / "metrics.jsonl") as f:
    stale = f.readlines()[:3]
  (workdir / "metrics.jsonl").write_text("".join(stale) + '{"step": 4, "lo')  # cut short
  summary = main.train_and_evaluate(config, str(workdir), devices=jax.devices())
  with open(workdir / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3, 4]
  for step in steps:
    assert summary["losses"][step] == pytest.approx(summary8["losses"][step], abs=1e-6)
