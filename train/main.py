"""Command line entry point and training loop.

    python -m train.main --config=configs/lm_dense.py --workdir=DIR [--config.FIELD=VALUE ...]

`config.objective` chooses the run: "lm" (pretraining; the default when the config has no
such field), "sft" (the same loop with losses.sft(): loss on the response tokens the data
section marks) or "grpo" (the RL loop of train/rl.py: rollouts in an environment, rewards,
several optimizer steps per RL step through the same sharded update).

Multi-process (one process per host): `jax.distributed.initialize()` runs when
--coordinator_address/--num_processes/--process_id are given, when
JAX_COORDINATOR_ADDRESS is set, or on a multi-host TPU slice (TPU_WORKER_HOSTNAMES
lists more than one host); otherwise (one host, Colab, tests) it is skipped.
Only process 0 writes metrics and prints progress; every process takes part in
checkpoints. Restore order: DIR's newest checkpoint that restores and verifies
(newer ones that do not are moved aside with one warning each; see
train/checkpoint.py), else config.init_from, else a fresh sharded init. SIGTERM
saves a checkpoint and exits 0.

Every expected failure (a bad config or override, unusable checkpoints, a
missing or corrupt file, a non-finite run) ends with one `error: ...` line on
stderr and a non-zero exit code (2, or 1 for non-finite training, 130 on
Ctrl-C), after the checkpoint manager has finished or abandoned its saves.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from train import checkpoint as checkpoint_lib
from train import config_lib, losses, sharding, trainer
from train import metrics as metrics_lib


class NonFiniteError(RuntimeError):
  """Too many consecutive NaN/Inf steps."""


# ----------------------------------------------------------------------------- distributed


def wants_distributed(
  coordinator_address: str | None, num_processes: int | None, environ=os.environ
) -> bool:
  """Whether this run is multi-process (decided from flags and the environment)."""
  if coordinator_address or (num_processes is not None and num_processes > 1):
    return True
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1


def maybe_initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Calls jax.distributed.initialize() for multi-process runs; returns whether it did."""
  if not wants_distributed(coordinator_address, num_processes):
    return False
  # CPU backends need an explicit cross-process collectives implementation.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {
    k: v
    for k, v in (
      ("coordinator_address", coordinator_address),
      ("num_processes", num_processes),
      ("process_id", process_id),
    )
    if v is not None
  }
  jax.distributed.initialize(**kwargs)
  return True


# ----------------------------------------------------------------------------- data


class _Rows:
  """Replicated loading: every process reads the global batch and keeps its own rows."""

  def __init__(self, iterator, process_index: int, process_count: int):
    self.iterator, self.index, self.count = iterator, process_index, process_count

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.iterator)
    rows = next(iter(batch.values())).shape[0] // self.count
    return {k: v[self.index * rows : (self.index + 1) * rows] for k, v in batch.items()}

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)

  def close(self):
    getattr(self.iterator, "close", lambda: None)()


def make_data_iterator(config, split: str):
  from train import data as data_lib

  pi, pc = jax.process_index(), jax.process_count()
  replicated = config.get("data_loading", "sharded") == "replicated"
  iterator = data_lib.make_iterator(
    config.data,
    seq_len=config.seq_len,
    global_batch_size=config.batch_size,
    seed=config.seed,
    split=split,
    process_index=0 if replicated else pi,
    process_count=1 if replicated else pc,
  )
  return _Rows(iterator, pi, pc) if replicated else iterator


# ----------------------------------------------------------------------------- loop


class _Saver:
  """Saves {state, iterator} at most once per step, and never a non-finite state."""

  def __init__(self, ckpt, setup_: trainer.Setup, iterator, start_step: int):
    self._ckpt, self._setup, self._iterator = ckpt, setup_, iterator
    self._last = start_step if ckpt.latest_step() == start_step else None

  def save(self, step: int, state) -> None:
    if self._last == step:
      return
    if not trainer.state_is_finite(self._setup, state):
      logging.error("step %d: state is not finite; not checkpointing it", step)
      return
    self._ckpt.save(step, state, self._iterator.get_state())
    self._last = step


class _Preemption:
  """SIGTERM -> save and stop. Multi-process runs agree on the step through JAX."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread
        pass

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except Exception:  # pylint: disable=broad-except
        return False
    return self.requested

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _mean(values):
  values = [v for v in values if np.isfinite(v)]
  return float(np.mean(values)) if values else float("nan")


def evaluate(setup, state, eval_iterator, start_state, steps: int) -> float:
  """Mean next-token cross entropy (nats) over `steps` held-out batches."""
  eval_iterator.set_state(start_state)
  sums = [
    setup.eval_step(state, trainer.device_batch(next(eval_iterator), setup)) for _ in range(steps)
  ]
  sums = jax.device_get(sums)
  return float(sum(s["ce_sum"] for s in sums) / max(sum(s["count"] for s in sums), 1.0))


def _initial_state(config, setup, run, mesh, ckpt, train_iter, writer):
  """Restores from the workdir, else init_from, else a fresh sharded init."""
  restored = ckpt.restore_newest(setup.abstract_state)
  if restored is not None:
    train_iter.set_state(restored.data_state)
    # Records past the restored step (also those of a step moved aside) are redone.
    writer.truncate_after(restored.step)
    logging.info("resumed from %s/%d", ckpt.directory, restored.step)
    return restored.state, f"resumed from step {restored.step}"
  # A run killed before its first checkpoint committed left records of steps it will redo.
  writer.truncate_after(0)
  state = setup.init()
  if not config.init_from:
    return state, "fresh init"
  abstract_params = setup.abstract_state["params"]
  if checkpoint_lib.is_hf_directory(config.init_from):
    from flax import nnx

    from models import hf

    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    model, _ = hf.load(config.init_from, dtype=run.model_config.dtype, mesh=mesh, rules=rules)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    shapes = jax.tree.map(lambda a: a.shape, abstract_params)
    got = jax.tree.map(lambda a: a.shape, params)
    if shapes != got:
      raise ValueError(
        f"init_from={config.init_from!r}: the Hugging Face model's parameter "
        f"shapes do not match config.model ({got} vs {shapes})"
      )
    params = jax.tree.map(
      lambda a, s: jax.device_put(a.astype(s.dtype), s.sharding), params, abstract_params
    )
  else:
    params = checkpoint_lib.load_params(config.init_from, abstract_params)
  state["params"] = params
  return state, f"initialised from {config.init_from}"


def train_and_evaluate(config, workdir: str, *, devices: Sequence[Any] | None = None) -> dict:
  """Runs (or resumes) training; returns a summary dict (final step, losses, status)."""
  devices = list(jax.devices() if devices is None else devices)
  run = config_lib.validate(config, num_devices=len(devices), process_count=jax.process_count())
  if run.objective == "grpo":
    from train import rl

    return rl.train_and_evaluate(config, workdir, run=run, devices=devices)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  objective = losses.sft() if run.objective == "sft" else losses.lm()
  setup = trainer.setup(run, config, mesh, objective=objective)
  with _ClosingAll() as closing:
    writer = closing.add(metrics_lib.MetricsWriter(workdir, enabled=is_main))
    ckpt = closing.add(
      checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
      )
    )
    train_iter = closing.add(make_data_iterator(config, "train"))
    eval_iter = closing.add(make_data_iterator(config, "eval")) if config.eval_every else None
    state, how = _initial_state(config, setup, run, mesh, ckpt, train_iter, writer)
    return _train_loop(
      config,
      workdir,
      devices=devices,
      run=run,
      mesh=mesh,
      setup=setup,
      writer=writer,
      ckpt=ckpt,
      train_iter=train_iter,
      eval_iter=eval_iter,
      state=state,
      how=how,
    )


class _ClosingAll:
  """Closes what was added to it, last added first, when the block ends, however it ends.

  After an error the closers' own errors are logged, not raised, so the first error is the
  one reported (a failed restore is not buried under a save that cannot finish); after a
  normal end the first of them is raised: a checkpoint that failed to save must not pass
  silently.
  """

  def __init__(self):
    self.closers = []

  def add(self, resource):
    """`resource`, whose close() (if it has one) will be called."""
    close = getattr(resource, "close", None)
    if close is not None:
      self.closers.append(close)
    return resource

  def __enter__(self):
    return self

  def __exit__(self, error_type, error, traceback) -> bool:
    first = None
    for close in reversed(self.closers):
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        if error is not None:
          logging.error("while stopping after an error: %s", checkpoint_lib.short_reason(e))
        elif first is None:
          first = e
    if first is not None:
      raise first
    return False


def _train_loop(
  config, workdir, *, devices, run, mesh, setup, writer, ckpt, train_iter, eval_iter, state, how
) -> dict:
  """Trains from `state` (restored or fresh) to config.total_steps; returns the summary."""
  is_main = jax.process_index() == 0
  eval_start = eval_iter.get_state() if eval_iter is not None else None
  step = int(jax.device_get(state["step"]))
  total = int(config.total_steps)
  peak = metrics_lib.peak_flops_per_device(devices[0])
  peak_total = peak * len(devices) if peak else None
  n_params = trainer.num_params(setup.abstract_state)
  if is_main:
    print(
      f"{how}: {n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, "
      f"{jax.process_count()} process(es), step {step}/{total}",
      flush=True,
    )

  preemption = _Preemption()
  profile = tuple(config.profile_steps)
  profiling = False
  interval: list[dict] = []
  last_metrics = None
  summary = {"status": "completed", "losses": {}}
  timer = metrics_lib.StepTimer(step)
  first_step, first_step_seconds = True, 0.0
  saver = _Saver(ckpt, setup, train_iter, step)

  try:
    while step < total:
      if preemption.reached(step):
        saver.save(step, state)
        summary["status"] = "preempted"
        if is_main:
          print(f"SIGTERM: saved checkpoint at step {step}; exiting", flush=True)
        break
      if profile and step == profile[0]:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        profiling = True
      batch = trainer.device_batch(next(train_iter), setup)
      state, step_metrics = setup.train_step(state, batch)
      step += 1
      if profiling and step >= profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        profiling = False
      # Read the previous step's counters while this one runs (keeps one step queued).
      if last_metrics is not None:
        _check_streak(last_metrics, config.max_nonfinite_steps, step - 1)
      last_metrics = step_metrics
      interval.append(step_metrics)
      if first_step:  # compile time, kept out of the rates
        first_step = False
        jax.block_until_ready(step_metrics)
        first_step_seconds, _ = timer.interval(step)
        if is_main:
          print(f"step {step}: compiled and ran in {first_step_seconds:.1f} s", flush=True)
      do_eval = eval_iter is not None and (step % config.eval_every == 0 or step == total)
      if step % config.log_every == 0 or step == total or do_eval:
        host = jax.device_get(interval)
        _check_streak(host[-1], config.max_nonfinite_steps, step)
        seconds, steps = timer.interval(step)
        if steps == 0:  # only the first (compiling) step in this interval
          seconds, steps = first_step_seconds, 1
        record = _record(host, run, config, seconds / steps, peak_total)
        if do_eval:
          started = time.perf_counter()
          record["eval_loss"] = evaluate(setup, state, eval_iter, eval_start, config.eval_steps)
          timer.exclude(time.perf_counter() - started)
        writer.write(step, record)
        summary["losses"][step] = record["loss"]
        if is_main:
          eta = (total - step) * record["seconds_per_step"]
          print(metrics_lib.progress_line(step, total, record, eta), flush=True)
        interval = []
      if config.checkpoint_every and step % config.checkpoint_every == 0 or step == total:
        started = time.perf_counter()
        saver.save(step, state)
        timer.exclude(time.perf_counter() - started)
  finally:
    if profiling:
      jax.profiler.stop_trace()
    preemption.restore()
  summary["step"] = step
  return summary


def _check_streak(step_metrics, limit: int, step: int) -> None:
  streak = int(jax.device_get(step_metrics["nonfinite_streak"]))
  if streak >= limit:
    raise NonFiniteError(
      f"step {step}: {streak} consecutive steps had a non-finite loss or gradient "
      f"(max_nonfinite_steps={limit}); stopping. Their updates were skipped and no "
      f"non-finite state was checkpointed; lower optimizer.learning_rate or check the data."
    )


def _record(host: list[dict], run, config, seconds_per_step: float, peak_total) -> dict:
  """The logged figures of one interval from its per-step host metrics."""
  last = host[-1]
  finite = [h for h in host if h["finite"] > 0]
  record = {
    "loss": _mean([float(h["loss"]) for h in finite]) if finite else float("nan"),
    "lm_loss": _mean([float(h["lm_loss"]) for h in finite]) if finite else float("nan"),
    "learning_rate": float(last["learning_rate"]),
    "grad_norm": _mean([float(h["grad_norm"]) for h in finite]) if finite else float("nan"),
    "nonfinite_steps": int(last["nonfinite_total"]),
  }
  aux = {}
  for key in last:
    if key.startswith(("aux/", "aux_loss/")):
      record[key] = _mean([float(h[key]) for h in host])
      if key.startswith("aux/"):
        aux[key[4:]] = record[key]
  record.update(
    metrics_lib.throughput(
      run.model_config,
      batch=config.batch_size,
      seq_len=config.seq_len,
      seconds_per_step=seconds_per_step,
      aux_metrics=aux,
      peak_flops=peak_total,
    )
  )
  return record


# ----------------------------------------------------------------------------- CLI


def main(argv):
  from absl import flags

  del argv
  FLAGS = flags.FLAGS
  maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from absl import logging as absl_logging

  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    absl_logging.set_verbosity(absl_logging.WARNING)
  config = FLAGS.config
  try:
    summary = train_and_evaluate(config, FLAGS.workdir)
  except NonFiniteError as e:
    _exit_with_error(e, 1)
  except (ValueError, OSError, checkpoint_lib.NoRestorableCheckpointError) as e:
    _exit_with_error(e, 2)
  except KeyboardInterrupt:
    _exit_with_error("interrupted (saves already started were finished first)", 130)
  if jax.process_index() == 0:
    print(
      f"done: {summary['status']} at step {summary['step']}; workdir {FLAGS.workdir}", flush=True
    )


def _exit_with_error(error, code: int):
  """One `error:` line on stderr and exit `code` (the run's resources are already closed)."""
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.exit(code)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config", None, "Training config file (get_config()).", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and events.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app

  _define_flags()
  config_spec = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), None)
  if config_spec is None and "--config" in sys.argv[:-1]:
    config_spec = sys.argv[sys.argv.index("--config") + 1]
  if config_spec is not None:
    try:  # an unknown override gets its full dotted path before absl reports a bare key
      config_lib.check_override_paths(config_lib.load_config_file(config_spec), sys.argv[1:])
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)
  app.run(main)
