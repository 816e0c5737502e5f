"""Throughput of the framework's full train step against a minimal plain-jax.jit step.

    python -m benchmarks.train_step [--steps=3 --rounds=3]

Both steps train the same model (6 layers, width 512, 8 heads of 64, SwiGLU 1536,
vocab 256) on [8, 256] float32 batches with the same optimizer (global-norm
clipping + AdamW). The framework step is what train/main.py runs: logical-axis
shardings, donated state, non-finite skip, aux losses/metrics, host-to-device
batch assembly and the lagged metric reads of the loop. The minimal step is a
plain `jax.jit` of value_and_grad + optax written out below. Rounds alternate
between the two so machine load affects both alike; the median step time of each
is reported. Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from adaptive import flops as flops_lib
from benchmarks import step_compare
from configs import lm_dense
from models import registry
from train import config_lib, sharding, trainer

MODEL = dict(
  kind="dense",
  vocab_size=256,
  dim=512,
  num_layers=6,
  num_heads=8,
  num_kv_heads=8,
  head_dim=64,
  mlp_dim=1536,
  dtype="float32",
  param_dtype="float32",
)
BATCH, SEQ = 8, 256


def make_config():
  c = lm_dense.get_config()
  c.batch_size, c.seq_len, c.total_steps = BATCH, SEQ, 1000
  c.mesh.data = -1
  c.model.update(MODEL)
  c.optimizer.warmup_steps = 10
  return c


def host_batches(n: int, seed: int = 0):
  return step_compare.host_batches(n, BATCH, SEQ, MODEL["vocab_size"], seed)


class Framework:
  """The train/ step as the training loop drives it."""

  def __init__(self, config):
    kind, fields = config_lib.model_fields(config)
    run = config_lib.Run(
      mesh_shape=sharding.resolve_mesh_shape(dict(config.mesh), jax.device_count()),
      model_kind=kind,
      model_config=registry.make_config(kind, fields),
      micro_batch_size=BATCH,
    )
    mesh = sharding.make_mesh(dict(config.mesh))
    self.setup = trainer.setup(run, config, mesh)
    self.state = self.setup.init()
    self.last = None

  def step(self, batch):
    self.state, metrics = self.setup.train_step(self.state, trainer.device_batch(batch, self.setup))
    if self.last is not None:  # the loop's lagged non-finite check
      int(self.last["nonfinite_streak"])
    self.last = metrics
    return metrics

  def finish(self, metrics_list):
    jax.device_get(metrics_list)  # what a log line reads


class Minimal:
  """A plain jax.jit step of the same model and optimizer, nothing else."""

  def __init__(self, config):
    kind, fields = config_lib.model_fields(config)
    model = registry.build(kind, registry.make_config(kind, fields), rngs=nnx.Rngs(0))
    self.graphdef, params = nnx.split(model, nnx.Param)
    self.params = params.to_pure_dict()
    opt = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
      0.0, opt.learning_rate, opt.warmup_steps, config.total_steps
    )
    self.tx = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm),
      optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay),
    )
    self.opt_state = self.tx.init(self.params)
    graphdef, tx = self.graphdef, self.tx

    def loss_fn(params, batch):
      logits, _ = nnx.merge(graphdef, params)(
        batch["tokens"], batch["positions"], batch["segment_ids"]
      )
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
      return jnp.sum(ce * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self._step = jax.jit(step, donate_argnums=(0, 1))

  def step(self, batch):
    self.params, self.opt_state, loss = self._step(
      self.params, self.opt_state, jax.device_put(batch)
    )
    return loss

  def finish(self, losses):
    jax.device_get(losses)


def timed_round(runner, batches) -> float:
  """Seconds per step over `batches` (dispatch through the final result)."""
  start = time.perf_counter()
  outs = [runner.step(b) for b in batches]
  runner.finish(outs)
  return (time.perf_counter() - start) / len(batches)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
    "--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json")
  )
  args = parser.parse_args()
  config = make_config()
  batches = host_batches(args.steps)
  runners, compile_s, times = {}, {}, {"framework": [], "minimal": []}
  for name, cls in (("framework", Framework), ("minimal", Minimal)):
    start = time.perf_counter()
    runner = cls(config)
    runner.finish([runner.step(batches[0])])  # compile + first step
    compile_s[name] = time.perf_counter() - start
    runners[name] = runner
  for r in range(args.rounds):
    order = ("framework", "minimal") if r % 2 == 0 else ("minimal", "framework")
    for name in order:
      times[name].append(timed_round(runners[name], batches))
      print(f"round {r} {name}: {times[name][-1]:.3f} s/step", flush=True)

  model_config = registry.make_config("dense", {k: v for k, v in MODEL.items() if k != "kind"})
  step_flops = flops_lib.dense_train_flops(model_config, BATCH, SEQ)
  result = {
    "model": MODEL,
    "batch": BATCH,
    "seq_len": SEQ,
    "optimizer": "clip+adamw",
    "devices": [str(d) for d in jax.devices()],
    "device_kind": jax.devices()[0].device_kind,
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "steps_per_round": args.steps,
    "rounds": args.rounds,
    "train_flops_per_step": step_flops,
  }
  for name in ("framework", "minimal"):
    sec = statistics.median(times[name])
    result[name] = {
      "seconds_per_step_median": sec,
      "seconds_per_step_all": times[name],
      "tokens_per_second": BATCH * SEQ / sec,
      "flops_per_second": step_flops / sec,
      "compile_and_first_step_seconds": compile_s[name],
    }
  result["framework_efficiency"] = (
    result["framework"]["tokens_per_second"] / result["minimal"]["tokens_per_second"]
  )
  result["target_efficiency"] = 0.9
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(
    json.dumps({k: result[k] for k in ("framework", "minimal", "framework_efficiency")}, indent=2)
  )


if __name__ == "__main__":
  main()
