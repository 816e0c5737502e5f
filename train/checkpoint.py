"""Orbax checkpoints of a run: {train state, data iterator states}, restorable onto any mesh.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3)
    ckpt.save(step, state, data_state)              # async; every process calls it
    step = ckpt.latest_step()                        # None when there is none
    state, data_state = ckpt.restore(step, abstract_state)

One checkpoint step directory holds two items (ocp.args.Composite):

    state   the train state pytree (params, opt_state, step, rng, counters), saved with
            StandardSave; restored with the *current* run's abstract state, whose
            ShapeDtypeStructs carry the target shardings, so a checkpoint written on 8
            devices restores onto 4 (or onto another mesh layout).
    data    JSON {"process_count": P, "states": [iterator state of process 0..P-1]}
            (ocp.args.JsonSave, written by process 0 after an all-gather).

Orbax writes into a temporary directory and renames it when every process has
finished (atomic finalize), so a crash during a save leaves the previous good
checkpoint as the latest one.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order (a collective: all must call)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: raw.size] = raw
  everything = multihost_utils.process_allgather(padded)
  return [
    json.loads(bytes(row[: int(n)]).decode())
    for row, n in zip(everything, np.asarray(lengths).reshape(-1), strict=True)
  ]


class Checkpointer:
  """Keep-last-N async checkpoints of one run directory."""

  def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data")
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any) -> bool:
    """Starts an async save of `state` and this process's `data_state` at `step`."""
    states = gather_json(data_state)
    data = {"process_count": len(states), "states": states}
    return self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
      force=True,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """(state laid out as `abstract_state`'s shardings, this process's data iterator state)."""
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
      ),
    )
    data = restored["data"]
    if data["process_count"] != jax.process_count():
      raise ValueError(
        f"checkpoint {self.directory}/{step} was written by {data['process_count']} processes "
        f"and this run has {jax.process_count()}; the data iterator position cannot be "
        f"carried over (start a new workdir with init_from={str(self.directory)!r})"
      )
    return restored["state"], data["states"][jax.process_index()]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _state_item_dir(path: epath.Path) -> epath.Path:
  """The `state` item of a checkpoint: `path` may be a run's checkpoint dir or a step dir."""
  if (path / "state").is_dir():
    return path / "state"
  manager = ocp.CheckpointManager(
    path, options=ocp.CheckpointManagerOptions(read_only=True), item_names=("state", "data")
  )
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise ValueError(
      f"init_from={str(path)!r}: no checkpoint found there (expected an orbax "
      f"checkpoint directory, one of its step directories, or a Hugging Face "
      f"model directory with config.json)"
    )
  return path / str(step) / "state"


def load_params(path: str, abstract_params: Any) -> Any:
  """Parameters of another run's checkpoint, laid out as `abstract_params` (with shardings)."""
  item = _state_item_dir(epath.Path(path))
  logging.info("init_from: restoring parameters from %s", item)
  target = {"params": abstract_params}
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
      item,
      args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      ),
    )
  return restored["params"]


def is_hf_directory(path: str) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, "config.json"))
