"""Train-step time of Mixture-of-Depths against the dense model of the same shape.

    python -m benchmarks.mod_step [--seq=1024 --batch=2 --steps=3 --rounds=3]
    # accelerator, e.g.: --dim=1024 --layers=12 --heads=16 --head_dim=64 --mlp_dim=4096
    #                    --batch=8 --seq=2048 --dtype=bfloat16 --steps=10 --rounds=5

Both models are stepped by the trainer's own jitted step on the same random
[B, S] batches (`benchmarks.step_compare`). MoD: capacity 12.5%,
every other block routed (offset 1), paper router (x + r·f(x)), predictor and
router BCE losses on. Rounds of `--steps` steps alternate dense/MoD (order
flipped every round) so machine load hits both alike; the median per-step time
of the rounds is reported.

    time_ratio = t_MoD / t_dense
    flop_ratio = executed_train_flops(MoD) / dense_train_flops   (adaptive/flops.py)
    overhead   = time_ratio / flop_ratio          target: <= 1.15

A per-piece breakdown (`--breakdown`, on by default) times, jitted, fwd+bwd of
one routed block's pieces at the benchmark shape: the dense block on S tokens,
the block on the k routed tokens, router + top-k + gather/scatter alone, and the
predictor MLP + BCE; this is where MoD's overhead beyond its FLOPs comes from.
Writes benchmarks/results/mod_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaptive import flops as flops_lib
from adaptive import routing
from benchmarks import isoflop, step_compare
from models import mod

TARGET_OVERHEAD = 1.15


def make_config(args, kind: str):
  if kind != "mod":
    return step_compare.make_config(args, kind)
  return step_compare.make_config(
    args,
    kind,
    capacity=args.capacity,
    routed_every=2,
    routed_offset=1,
    router_activation="identity",
    decode_router="predictor",
    router_loss_weight=0.01,
    predictor_loss_weight=0.01,
    predictor_hidden=args.predictor_hidden,
  )


def breakdown(mod_config, batch: int, seq: int) -> dict:
  """Seconds (median, fwd+bwd, jitted) of one routed block's pieces at [batch, seq]."""
  model = mod.MoDTransformer(mod_config, rngs=nnx.Rngs(0))
  k = routing.capacity_k(mod_config.capacity, seq)
  x_BSD = jax.random.normal(
    jax.random.key(1), (batch, seq, mod_config.dim), mod_config.compute_dtype
  )
  pos_BS = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  graphdef, state = nnx.split(model)

  def dense_block(m, x):
    return m._block(1)(x, pos_BS, None)[0]

  def routed_block(m, x):
    return m._routed_topk(m._block(1), m.routed_params(0), x, pos_BS, None)[0]

  def block_on_k(m, x):
    return mod._residual_f(m._block(1), x[:, :k], pos_BS[:, :k], None)

  def route_only(m, x):  # router + top-k + gather + scatter with f = identity
    r_BS = m.router_logits(m.routed_params(0), x)
    sel = routing.expert_choice(r_BS, k, pos_BS)
    x_BKD = routing.gather_tokens(x, sel.indices_BK)
    g_BK = routing.gather_tokens(r_BS, sel.indices_BK)
    return routing.scatter_tokens(x, x_BKD * (1 + g_BK[..., None]).astype(x.dtype), sel.indices_BK)

  def predictor(m, x):
    sel = jnp.zeros(x.shape[:2], bool).at[:, :k].set(True)
    rp = m.routed_params(0)
    logits = routing.predictor_logits(rp["predictor"], x)
    return routing.bce_with_logits(logits, sel) + routing.router_bce_loss(
      m.router_logits(rp, x), sel
    )

  out = {
    name: step_compare.median_seconds(step_compare.jitted_fwd_bwd(graphdef, f), state, x_BSD)
    for name, f in (
      ("dense_block_S", dense_block),
      ("mod_routed_block", routed_block),
      ("block_on_k_tokens", block_on_k),
      ("router_topk_gather_scatter", route_only),
      ("predictor_and_bces", predictor),
    )
  }
  top_k = jax.jit(lambda r: routing.top_k_indices(r, k))
  scores_BS = jnp.asarray(np.random.default_rng(0).normal(size=(batch, seq)), jnp.float32)
  out["top_k_only_fwd"] = step_compare.median_seconds(top_k, scores_BS)
  out["k"] = k
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  step_compare.add_shape_flags(p)
  p.add_argument("--predictor_hidden", type=int, default=64)
  p.add_argument("--capacity", type=float, default=0.125)
  p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument(
    "--out", default=os.path.join(os.path.dirname(__file__), "results", "mod_step.json")
  )
  args = p.parse_args()

  configs = {kind: make_config(args, kind) for kind in ("dense", "mod")}
  batches = step_compare.host_batches(args.steps, args.batch, args.seq, args.vocab)
  runners, compile_s, times = step_compare.time_models(configs, batches, args.rounds)

  mod_cfg = runners["mod"].run.model_config
  dense_cfg = runners["dense"].run.model_config
  flop = {
    "dense": flops_lib.dense_train_flops(dense_cfg, args.batch, args.seq),
    "mod": flops_lib.executed_train_flops(mod_cfg, args.batch, args.seq),
  }
  sec = {k: statistics.median(v) for k, v in times.items()}
  time_ratio = sec["mod"] / sec["dense"]
  flop_ratio = flop["mod"] / flop["dense"]
  overhead = time_ratio / flop_ratio
  result = {
    "benchmark": "mod_step",
    "step": "train.trainer.setup(...).train_step (the trainer's jitted step: LM + aux losses, "
    "clip + AdamW, non-finite skip, donated state)",
    **isoflop.environment(),
    "config": {k: v for k, v in vars(args).items() if k != "out"},
    "routed_layers": list(mod_cfg.routed_layers),
    "k_per_row": flops_lib.mod_routed_tokens(mod_cfg, args.seq),
    "seconds_per_step_median": sec,
    "seconds_per_step_all": times,
    "compile_and_first_step_seconds": compile_s,
    "train_flops_per_step": flop,
    "time_ratio": time_ratio,
    "flop_ratio": flop_ratio,
    "overhead": overhead,
    "target": f"time_ratio <= {TARGET_OVERHEAD} * flop_ratio",
    "target_met": bool(overhead <= TARGET_OVERHEAD),
  }
  if args.breakdown:
    result["breakdown_seconds_fwd_bwd"] = breakdown(mod_cfg, args.batch, args.seq)
    print("breakdown:", json.dumps(result["breakdown_seconds_fwd_bwd"], indent=1), flush=True)
  isoflop.write_result(args.out, result)
  print(
    json.dumps(
      {
        k: result[k]
        for k in ("seconds_per_step_median", "time_ratio", "flop_ratio", "overhead", "target_met")
      },
      indent=2,
    )
  )


if __name__ == "__main__":
  main()
