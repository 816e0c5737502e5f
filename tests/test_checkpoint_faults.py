"""A damaged newest checkpoint: the run resumes from the previous one exactly as if the bad step
had never been written, the bad one stays on disk under another name, and the CLI says so in one
warning. When no checkpoint restores, nothing is moved and the CLI ends with one error line.

The reference for "exactly" is the same workdir with the bad step removed by hand before resuming.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_env import environment
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import lm_dense
from train import checkpoint as checkpoint_lib
from train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 2
# One tiny run, set the same way in-process and on the command line.
OVERRIDES = {
  "batch_size": 4,
  "seq_len": 32,
  "log_every": 1,
  "eval_every": 0,
  "checkpoint_every": 2,
  "keep_checkpoints": 2,
  "model.dim": 32,
  "model.num_layers": 1,
  "model.num_heads": 2,
  "model.num_kv_heads": 1,
  "model.head_dim": 16,
  "model.mlp_dim": 64,
  "model.dtype": "float32",
  "optimizer.warmup_steps": 2,
  "optimizer.schedule": "constant",  # runs of different lengths share the schedule
  "data.prefetch": 0,
}
DAMAGED_STEP, GOOD_STEP, TOTAL = 4, 2, 6


def tiny_config(total_steps: int, **changes):
  config = lm_dense.get_config()
  for dotted, value in {**OVERRIDES, **changes, "total_steps": total_steps}.items():
    *parents, field = dotted.split(".")
    section = config
    for parent in parents:
      section = section[parent]
    section[field] = value
  return config


def train(workdir, total_steps: int, **changes) -> dict:
  devices = jax.devices()[:DEVICES]
  return main.train_and_evaluate(tiny_config(total_steps, **changes), str(workdir), devices=devices)


def files_under(path) -> dict[str, int]:
  """{relative path: size} of every file under `path`."""
  return {
    os.path.relpath(os.path.join(root, name), path): os.path.getsize(os.path.join(root, name))
    for root, _, names in os.walk(path)
    for name in names
  }


def largest_data_file(step_dir) -> str:
  """The biggest file of the train state: array chunks (OCDBT data), not metadata."""
  sizes = files_under(step_dir / "state")
  return str(step_dir / "state" / max(sizes, key=sizes.get))


def delete_data_file(step_dir):
  os.remove(largest_data_file(step_dir))


def truncate_data_file(step_dir):
  path = largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def delete_metadata(step_dir):
  os.remove(step_dir / "state" / "_METADATA")


def remove_commit_marker(step_dir):
  os.remove(step_dir / checkpoint_lib.COMMIT_MARKER)


def flip_one_bit(step_dir):
  """A change that still reads back: only the saved fingerprints can tell."""
  path = largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


DAMAGE = {
  "data_file_deleted": delete_data_file,
  "data_file_truncated": truncate_data_file,
  "metadata_deleted": delete_metadata,
  "commit_marker_removed": remove_commit_marker,
  "one_bit_flipped": flip_one_bit,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir after 4 steps, with checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("trained")
  train(workdir, DAMAGED_STEP)
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(GOOD_STEP), str(DAMAGED_STEP)]
  return workdir


@pytest.fixture(scope="module")
def resumed_without_the_bad_step(trained, tmp_path_factory):
  """The reference: losses of the run resumed at step 2 when step 4 was never written."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(DAMAGED_STEP))
  summary = train(workdir, TOTAL)
  assert sorted(summary["losses"]) == list(range(GOOD_STEP + 1, TOTAL + 1))
  return summary["losses"]


def copy_of(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


def moved_aside(checkpoints) -> list[str]:
  return [name for name in os.listdir(checkpoints) if name.startswith(f"{DAMAGED_STEP}.corrupt-")]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_step_resumes_from_the_previous_one(
  damage, trained, resumed_without_the_bad_step, tmp_path, caplog
):
  workdir = copy_of(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  DAMAGE[damage](checkpoints / str(DAMAGED_STEP))
  damaged_files = files_under(checkpoints / str(DAMAGED_STEP))
  with caplog.at_level(logging.WARNING):
    summary = train(workdir, TOTAL)

  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  restore_warnings = [w for w in warnings if "does not restore" in w]
  assert len(restore_warnings) == 1, warnings
  assert f"checkpoint step {DAMAGED_STEP} does not restore" in restore_warnings[0]
  assert f"resuming from step {GOOD_STEP}" in restore_warnings[0]
  # The same losses as the run that never wrote the bad step, bit for bit.
  assert summary["losses"] == resumed_without_the_bad_step
  # The damaged step is still on disk, untouched, under a name orbax does not list; the run
  # wrote a fresh step 4 and step 6 after it.
  [aside] = moved_aside(checkpoints)
  assert files_under(checkpoints / aside) == damaged_files
  assert {str(DAMAGED_STEP), str(TOTAL)} <= set(os.listdir(checkpoints))
  with open(workdir / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, TOTAL + 1))


def test_no_restorable_checkpoint_moves_nothing_and_names_the_directory(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  remove_commit_marker(checkpoints / str(DAMAGED_STEP))
  delete_metadata(checkpoints / str(GOOD_STEP))
  before = files_under(checkpoints)
  with pytest.raises(
    checkpoint_lib.NoRestorableCheckpointError, match=f"no checkpoint in {checkpoints}"
  ):
    train(workdir, TOTAL)
  assert files_under(checkpoints) == before


def test_a_config_that_no_longer_fits_moves_no_checkpoint(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  before = files_under(workdir / "checkpoints")
  with pytest.raises(checkpoint_lib.NoRestorableCheckpointError, match="step 4: .*step 2: "):
    train(workdir, TOTAL, **{"model.mlp_dim": 96})
  assert files_under(workdir / "checkpoints") == before


# -- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_sees_one_bit_and_a_swap_but_not_the_sharding():
  rng = np.random.default_rng(0)
  state = {
    "w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
    "h": jnp.asarray(rng.standard_normal(5), jnp.bfloat16),
    "step": jnp.asarray(7, jnp.int32),
    "key": jnp.asarray([1, 2], jnp.uint32),
  }
  fingerprint = checkpoint_lib.state_fingerprint(state)
  assert set(fingerprint) == {"['w']", "['h']", "['step']", "['key']"}
  assert fingerprint["['h']"]["dtype"] == "bfloat16"

  mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
  sharded = dict(state, w=jax.device_put(state["w"], NamedSharding(mesh, P("x", None))))
  assert checkpoint_lib.state_fingerprint(sharded) == fingerprint

  w = np.asarray(state["w"])
  one_bit = w.copy()
  one_bit.view(np.uint32)[3, 4] ^= 1 << 20
  swapped = w.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  for changed in (one_bit, swapped):
    other = checkpoint_lib.state_fingerprint(dict(state, w=jnp.asarray(changed)))
    assert other["['w']"] != fingerprint["['w']"]
    assert {k: v for k, v in other.items() if k != "['w']"} == {
      k: v for k, v in fingerprint.items() if k != "['w']"
    }


# -- the command line --------------------------------------------------------------------------


def run_cli(workdir, total_steps: int):
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "total_steps": total_steps}.items()]
  return subprocess.run(
    [sys.executable, "-m", "train.main", "--config=configs/lm_dense.py", f"--workdir={workdir}"]
    + flags,
    cwd=ROOT,
    env=environment(DEVICES),
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow  # ~50 s of subprocess start and compile; the in-process tests cover the same path
def test_cli_warns_once_and_finishes(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / str(DAMAGED_STEP) / "state" / "d")  # as in the issue
  done = run_cli(workdir, TOTAL)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stderr.count("does not restore") == 1, done.stderr[-3000:]
  assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr
  assert f"resumed from step {GOOD_STEP}" in done.stdout
  assert f"done: completed at step {TOTAL}" in done.stdout
  assert len(moved_aside(workdir / "checkpoints")) == 1


def test_cli_with_no_restorable_checkpoint_prints_one_error_line(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  for step in (GOOD_STEP, DAMAGED_STEP):
    shutil.rmtree(workdir / "checkpoints" / str(step) / "state" / "d")
  done = run_cli(workdir, TOTAL)
  assert done.returncode == 2, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and f"no checkpoint in {workdir / 'checkpoints'}" in errors[0]
  assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr
