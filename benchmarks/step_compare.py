"""Train-step timing of several model kinds of the same shape, by the trainer's own step.

Shared by `benchmarks.mod_step` and `benchmarks.duo_step`: each model is stepped
by `train.trainer.setup(...).train_step` (value_and_grad of LM loss + aux losses,
global-norm clipping + AdamW, non-finite skip, donated state) on the same random
[B, S] batches. Rounds of `--steps` steps cycle through the models, the order
rotating every round, so machine load hits all alike; `time_models` returns
every round's seconds per step (report the median).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import lm_dense
from train import config_lib, sharding, trainer


def add_shape_flags(p, *, seq: int = 1024, batch: int = 2) -> None:
  """Model shape and timing flags shared by the step benchmarks."""
  p.add_argument("--vocab", type=int, default=320)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--mlp_dim", type=int, default=768)
  p.add_argument("--batch", type=int, default=batch)
  p.add_argument("--seq", type=int, default=seq)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none")
  p.add_argument("--steps", type=int, default=3, help="steps per timed round")
  p.add_argument("--rounds", type=int, default=3)


def make_config(args, kind: str, **model_fields):
  """configs/lm_dense.py at the flags' shape, as model `kind` with extra model fields."""
  c = lm_dense.get_config()
  c.batch_size, c.seq_len, c.total_steps = args.batch, args.seq, 1000
  c.optimizer.warmup_steps = 10
  c.mesh.data = -1
  with c.unlocked():
    c.model.update(
      dict(
        kind=kind,
        vocab_size=args.vocab,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        mlp_dim=args.mlp_dim,
        dtype=args.dtype,
        param_dtype="float32",
        remat=args.remat,
        **model_fields,
      )
    )
  return c


def host_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0):
  """`n` random unpacked batches in the trainer's host format."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
    out.append(
      {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": np.ones((batch, seq), np.float32),
      }
    )
  return out


class Runner:
  """One model stepped by train.trainer's jitted train step."""

  def __init__(self, config):
    self.run = config_lib.validate(config, num_devices=jax.device_count())
    mesh = sharding.make_mesh(dict(config.mesh))
    self.setup = trainer.setup(self.run, config, mesh)
    self.state = self.setup.init()

  def steps(self, batches) -> dict:
    metrics = None
    for b in batches:
      self.state, metrics = self.setup.train_step(self.state, trainer.device_batch(b, self.setup))
    return jax.device_get(metrics)

  def xla_flops(self, host_batch) -> float:
    """FLOPs of one compiled train step by XLA's cost analysis (masked work included)."""
    compiled = self.setup.train_step.lower(
      self.state, trainer.device_batch(host_batch, self.setup)
    ).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def timed_round(runner: Runner, batches) -> float:
  start = time.perf_counter()
  runner.steps(batches)
  return (time.perf_counter() - start) / len(batches)


def median_seconds(fn, *args, reps: int = 5) -> float:
  """Median wall seconds of `fn(*args)` over `reps` calls, after one call that compiles."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jitted_fwd_bwd(graphdef, f):
  """jit(grad) of Σ f(model, x)² w.r.t. (model state, x): times a piece's forward + backward."""

  def loss(state, x):
    return jnp.sum(f(nnx.merge(graphdef, state), x).astype(jnp.float32) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def time_models(configs: dict, batches, rounds: int):
  """(runners, compile + first step seconds, per-round seconds per step), keyed like `configs`."""
  runners, compile_s, times = {}, {}, {name: [] for name in configs}
  for name, config in configs.items():
    start = time.perf_counter()
    runners[name] = Runner(config)
    runners[name].steps(batches[:1])
    compile_s[name] = time.perf_counter() - start
    print(f"{name}: compile + first step {compile_s[name]:.1f} s", flush=True)
  names = list(configs)
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      times[name].append(timed_round(runners[name], batches))
      print(f"round {r} {name}: {times[name][-1]:.3f} s/step", flush=True)
  return runners, compile_s, times
