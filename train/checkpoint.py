"""Orbax checkpoints of a run: {train state, data iterator states}, restorable onto any mesh.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3)
    ckpt.save(step, state, data_state)              # async; every process calls it
    restored = ckpt.restore_newest(abstract_state)   # None when there is none
    state, data_state = ckpt.restore(step, abstract_state)   # one step, verified

One checkpoint step directory holds two items (ocp.args.Composite):

    state   the train state pytree (params, opt_state, step, rng, counters), saved with
            StandardSave; restored with the *current* run's abstract state, whose
            ShapeDtypeStructs carry the target shardings, so a checkpoint written on 8
            devices restores onto 4 (or onto another mesh layout).
    data    JSON {"process_count": P, "states": [iterator state of process 0..P-1],
            "fingerprint": {leaf path: {"dtype", "sum"}}}
            (ocp.args.JsonSave, written by process 0 after an all-gather).

Orbax writes into a temporary directory and renames it when every process has
finished (atomic finalize), so a crash during a save leaves the previous good
checkpoint as the latest one.

A restore is verified before training continues from it:
  1. orbax's commit marker, <step>/commit_success.txt, must be there (orbax writes
     it last on every filesystem; on GCS it alone marks a finished save);
  2. orbax must read every array in full (a deleted, truncated or unreadable data
     or metadata file fails here);
  3. every state leaf's fingerprint, a position-weighted sum of its bits computed
     on device when it was saved, must match the restored leaf's. This catches
     bytes changed on disk that still read back (a flipped bit in a chunk), at the
     cost of one pass over the state on device per save and restore; nothing is
     re-read from storage. Checkpoints without fingerprints restore unverified.
`restore_newest` tries the steps newest first. Steps newer than the first one that
verifies are moved aside to <step>.corrupt-<time> (never deleted) with one warning
each; when none verifies, nothing is moved and NoRestorableCheckpointError lists
every step's reason (a run whose config no longer fits its checkpoints ends there
too, so a config mistake cannot cost a checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


COMMIT_MARKER = "commit_success.txt"


class CorruptCheckpointError(ValueError):
  """A checkpoint step that orbax lists but that is incomplete or whose content changed."""


class CheckpointMismatchError(ValueError):
  """An intact checkpoint this run cannot continue from (e.g. another process count)."""


class NoRestorableCheckpointError(RuntimeError):
  """A checkpoint directory whose steps all fail to restore; `failures` is [(step, reason)]."""

  def __init__(self, directory, failures: list[tuple[int, str]]):
    self.directory, self.failures = directory, failures
    reasons = "; ".join(f"step {step}: {reason}" for step, reason in failures)
    super().__init__(
      f"no checkpoint in {directory} restores ({reasons}). Nothing was moved or deleted: if "
      f"the config changed since they were written, rerun with the old one (or start a new "
      f"--workdir with init_from); if they are damaged, move them aside to start afresh."
    )


class Restored(NamedTuple):
  step: int
  state: Any  # laid out as the abstract state's shardings
  data_state: Any  # this process's data iterator state


# ----------------------------------------------------------------------------- fingerprints


def _bits_as_uint32(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as uint32 (64-bit elements as two words)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _position_weighted_sum(words: jax.Array) -> jax.Array:
  """sum_i words[i] * (2i + 1) mod 2^32 over the flat index i.

  Odd weights are invertible mod 2^32, so any single changed word changes the sum,
  and moved words change it too; integer sums are exact in any order, so the value
  does not depend on the sharding the leaf is laid out with."""
  index = jnp.zeros(words.shape, jnp.uint32)
  for axis, size in enumerate(words.shape):
    index = index * jnp.uint32(size % 2**32) + jax.lax.broadcasted_iota(
      jnp.uint32, words.shape, axis
    )
  return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> tuple[jax.Array, ...]:
  # One 0-d output per leaf: scalars are replicated, so every process can read them.
  return tuple(_position_weighted_sum(_bits_as_uint32(x)) for x in leaves)


def state_fingerprint(state: Any) -> dict[str, dict[str, Any]]:
  """{leaf path: {"dtype": name, "sum": uint32 position-weighted bit sum}} of a state pytree.

  A collective when the state spans processes (every process must call it)."""
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  sums = _leaf_sums([leaf for _, leaf in paths_and_leaves])
  return {
    jax.tree_util.keystr(path): {
      "dtype": str(leaf.dtype),
      "sum": int(np.asarray(total.addressable_data(0))),
    }
    for (path, leaf), total in zip(paths_and_leaves, sums, strict=True)
  }


def _fingerprint_mismatch(saved: dict, restored: dict) -> str | None:
  """The first leaf whose restored content differs from what was saved, as a reason."""
  for path, entry in saved.items():
    now = restored.get(path)
    if now is not None and now["dtype"] == entry["dtype"] and now["sum"] != entry["sum"]:
      return (
        f"state{path} read back differently from how it was saved (fingerprint "
        f"{now['sum']:#010x}, saved {entry['sum']:#010x}): its bytes changed on disk"
      )
  return None


# ----------------------------------------------------------------------------- failures


def short_reason(error: BaseException) -> str:
  """One line on why a restore failed (TensorStore appends kilobytes of JSON spec)."""
  innermost = error
  while innermost.__cause__ is not None:
    innermost = innermost.__cause__
  text = str(innermost) or type(innermost).__name__
  text = text.split(" [tensorstore_spec")[0].split(" See full TensorStore details")[0]
  text = " ".join(text.split())
  return text if len(text) <= 300 else text[:297] + "..."


def _is_echo(unraisable) -> bool:
  error = unraisable.exc_value
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _is_orbax_task_echo(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  return message.startswith("Task exception was never retrieved") and "orbax" in message


_echoes_quieted_for_good = False


@contextlib.contextmanager
def _echoes_quieted_if_it_fails():
  """Quiets the late echoes of an orbax read during the block, and for good if it fails.

  When one read of a restore fails, orbax closes its event loop at once; the TensorStore
  reads still in flight then report `RuntimeError: Event loop is closed` through
  sys.unraisablehook (during the failing restore, the next one, and at interpreter exit),
  and their asyncio tasks log "Task exception was never retrieved". The failure itself is
  reported once by the caller; these echoes are dropped. Any other unraisable exception or
  log record still gets through, and after a block that succeeds nothing stays installed.
  """
  global _echoes_quieted_for_good
  if _echoes_quieted_for_good:
    yield
    return
  previous_hook = sys.unraisablehook

  def hook(unraisable):
    if not _is_echo(unraisable):
      previous_hook(unraisable)

  asyncio_logger = logging.getLogger("asyncio")
  keep = lambda record: not _is_orbax_task_echo(record)
  sys.unraisablehook = hook
  asyncio_logger.addFilter(keep)
  try:
    yield
  except BaseException:
    _echoes_quieted_for_good = True
    raise
  if sys.unraisablehook is hook:
    sys.unraisablehook = previous_hook
  asyncio_logger.removeFilter(keep)


def _on_every_process(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective: all must call)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


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
    data = {
      "process_count": len(states),
      "states": states,
      "fingerprint": state_fingerprint(state),
    }
    return self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
      force=True,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """(state laid out as `abstract_state`'s shardings, this process's data iterator state).

    Verified as the module docstring says: CorruptCheckpointError when the commit
    marker is missing or a fingerprint differs, CheckpointMismatchError when the run
    cannot use an intact checkpoint, and whatever orbax raises when it cannot read it.
    """
    if not (self.directory / str(step) / COMMIT_MARKER).exists():
      raise CorruptCheckpointError(
        f"{COMMIT_MARKER} is missing (the save never finished, or the copy is incomplete)"
      )
    with _echoes_quieted_if_it_fails():
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
      )
    data = restored["data"]
    if data["process_count"] != jax.process_count():
      raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step} was written by {data['process_count']} processes "
        f"and this run has {jax.process_count()}; the data iterator position cannot be "
        f"carried over (start a new workdir with init_from={str(self.directory)!r})"
      )
    if "fingerprint" in data:
      mismatch = _fingerprint_mismatch(data["fingerprint"], state_fingerprint(restored["state"]))
      if mismatch:
        raise CorruptCheckpointError(mismatch)
    else:
      logging.info(
        "checkpoint %s/%d has no fingerprints; restored unverified", self.directory, step
      )
    return restored["state"], data["states"][jax.process_index()]

  def restore_newest(self, abstract_state: Any) -> Restored | None:
    """The newest step that restores and verifies; None when there is no checkpoint.

    Newer steps that fail are moved aside to <step>.corrupt-<time> with one warning
    each. Raises NoRestorableCheckpointError (moving nothing) when every step fails,
    and CheckpointMismatchError at once when an intact checkpoint does not fit the run.
    """
    failures: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
        reason = None
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except (any unreadable checkpoint)
        reason = short_reason(e)
      if not _on_every_process(reason is None):
        failures.append((step, reason or "it did not restore on another process"))
        continue
      for bad_step, bad_reason in failures:
        self._move_aside(bad_step, bad_reason, resuming_from=step)
      if failures:
        self.manager.reload()
      return Restored(step, state, data_state)
    if failures:
      raise NoRestorableCheckpointError(self.directory, failures)
    return None

  def _move_aside(self, step: int, reason: str, *, resuming_from: int) -> None:
    """Renames a failed step to <step>.corrupt-<time> (a name orbax does not list)."""
    if jax.process_index() == 0:
      source = self.directory / str(step)
      target = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
      suffix = 1
      while target.exists():
        target = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{suffix}"
        suffix += 1
      source.rename(target)
      logging.warning(
        "checkpoint step %d does not restore: %s. Moved it to %s (nothing deleted); "
        "resuming from step %d.",
        step,
        reason,
        target,
        resuming_from,
      )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _state_item_dir(path: epath.Path) -> epath.Path:
  """The `state` item of a checkpoint: `path` may be a run's checkpoint dir or a step dir."""
  if (path / "state").is_dir():
    return path / "state"
  # Committed steps, named as orbax names them (an unfinished save has a suffix); listed
  # directly, since a read-only CheckpointManager logs three warnings about itself.
  steps = [
    int(child.name)
    for child in (path.iterdir() if path.is_dir() else ())
    if child.name.isdigit() and (child / COMMIT_MARKER).exists() and (child / "state").is_dir()
  ]
  step = max(steps, default=None)
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
    try:
      with _echoes_quieted_if_it_fails():
        restored = checkpointer.restore(
          item,
          args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
          ),
        )
    except Exception as e:  # pylint: disable=broad-except (orbax raises bare Exception too)
      raise ValueError(f"init_from={path!r}: {item} does not restore: {short_reason(e)}") from e
  return restored["params"]


def is_hf_directory(path: str) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, "config.json"))
