"""Train-step time of Duo (skip / small / big FFN) dispatch against dense and masked Duo.

    python -m benchmarks.duo_step [--seq=512 --batch=4 --steps=3 --rounds=3]
    # accelerator, e.g.: --dim=1024 --layers=12 --heads=16 --head_dim=64 --mlp_dim=4096
    #                    --small_mlp_dim=1024 --batch=8 --seq=2048 --dtype=bfloat16

Three models of the same shape, stepped by the trainer's own jitted step on the
same random batches (`benchmarks.step_compare`):

  dense:     the dense model.
  duo_full:  Duo with capacity 1 for both options: both MLPs run on every token
             (what masking every option costs).
  duo:       Duo with `--small_capacity` / `--big_capacity` slots per row: each
             MLP gathers only its slotted tokens (`adaptive.routing` dispatch).

    time_ratio = t_duo / t_dense,  flop_ratio = executed_train_flops(duo) / dense
    overhead   = time_ratio / flop_ratio    (the cost of routing, gather and scatter)

Duo saves FFN work only; attention is unchanged, so wherever attention runs
slower than its counted FLOPs (on CPU XLA computes the whole masked S×S score
matrix, twice the causal count) the step-level overhead overstates dispatch
cost. So the file also gives the ratio of XLA's own cost analysis of the two
compiled steps (`xla_flop_ratio`, masked work included) and, in
`ffn_breakdown_fwd_bwd`, times one layer's FFN alone:
dense MLP vs routed FFN (router, slots, gather, both MLPs, scatter), against
the FFN FLOP ratio.

Writes benchmarks/results/duo_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
from flax import nnx

from adaptive import flops as flops_lib
from benchmarks import isoflop, step_compare
from models import duo as duo_lib

TARGET_OVERHEAD = 1.15


def ffn_breakdown(config, batch: int, seq: int) -> dict:
  """Seconds (median, fwd+bwd, jitted) of one layer's FFN: dense MLP vs Duo's routed FFN.

  Isolates what dispatch costs (router, slots and their spare-slot probes,
  gather, two MLPs on their slots, scatter) from attention, which Duo leaves
  as it is.
  """
  model = duo_lib.DuoTransformer(config, rngs=nnx.Rngs(0))
  n_BSD = jax.random.normal(jax.random.key(1), (batch, seq, config.dim), config.compute_dtype)
  graphdef, state = nnx.split(model)
  slots_O = duo_lib.option_slots(config, seq)

  def layer0(module):
    graph, st = nnx.split(module)
    return nnx.merge(graph, jax.tree.map(lambda a: a[0], st))

  def dense_ffn(m, n):
    return layer0(m.layers).mlp(n)

  def routed(m, n):
    return duo_lib.routed_ffn(
      n,
      m.ffn_router[...][0],
      layer0(m.small_mlps),
      layer0(m.layers).mlp,
      slots_O,
      probe_spare_slots=config.probe_spare_slots,
    )[0]

  dense_s, routed_s = (
    step_compare.median_seconds(step_compare.jitted_fwd_bwd(graphdef, f), state, n_BSD)
    for f in (dense_ffn, routed)
  )
  small, big = slots_O[duo_lib.SMALL] / seq, slots_O[duo_lib.BIG] / seq
  ffn_flop_ratio = (small * config.small_mlp_dim + big * config.mlp_dim) / config.mlp_dim
  return {
    "dense_ffn_s": dense_s,
    "routed_ffn_s": routed_s,
    "ffn_time_ratio": routed_s / dense_s,
    "ffn_flop_ratio": ffn_flop_ratio,
    "ffn_overhead": routed_s / dense_s / ffn_flop_ratio,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  step_compare.add_shape_flags(p, seq=512, batch=4)
  p.add_argument("--small_mlp_dim", type=int, default=96)
  p.add_argument("--small_capacity", type=float, default=0.25)
  p.add_argument("--big_capacity", type=float, default=0.25)
  p.add_argument("--out", default=os.path.join(isoflop.RESULTS, "duo_step.json"))
  args = p.parse_args()

  duo = dict(small_mlp_dim=args.small_mlp_dim, compute_penalty=0.01)
  configs = {
    "dense": step_compare.make_config(args, "dense"),
    "duo_full": step_compare.make_config(args, "duo", **duo),
    "duo": step_compare.make_config(
      args, "duo", small_capacity=args.small_capacity, big_capacity=args.big_capacity, **duo
    ),
  }
  batches = step_compare.host_batches(args.steps, args.batch, args.seq, args.vocab)
  runners, compile_s, times = step_compare.time_models(configs, batches, args.rounds)
  last_metrics = {
    name: {k: float(v) for k, v in r.steps(batches[:1]).items() if k.startswith("aux/duo/")}
    for name, r in runners.items()
  }
  flop = {
    name: flops_lib.executed_train_flops(r.run.model_config, args.batch, args.seq)
    for name, r in runners.items()
  }
  xla_flop = {name: r.xla_flops(batches[0]) for name, r in runners.items()}
  sec = {k: statistics.median(v) for k, v in times.items()}
  time_ratio = {k: sec[k] / sec["dense"] for k in sec}
  flop_ratio = {k: flop[k] / flop["dense"] for k in flop}
  overhead = time_ratio["duo"] / flop_ratio["duo"]
  result = {
    "benchmark": "duo_step",
    "step": "train.trainer.setup(...).train_step (LM + aux losses, clip + AdamW, non-finite "
    "skip, donated state)",
    **isoflop.environment(),
    "config": {k: v for k, v in vars(args).items() if k != "out"},
    "seconds_per_step_median": sec,
    "seconds_per_step_all": times,
    "compile_and_first_step_seconds": compile_s,
    "train_flops_per_step": flop,
    "time_ratio_vs_dense": time_ratio,
    "flop_ratio_vs_dense": flop_ratio,
    "time_ratio": time_ratio["duo"],
    "flop_ratio": flop_ratio["duo"],
    "overhead": overhead,
    "dispatch_speedup_over_full": sec["duo_full"] / sec["duo"],
    "xla_train_flops_per_step": xla_flop,
    "xla_flop_ratio": xla_flop["duo"] / xla_flop["dense"],
    "overhead_vs_xla_flops": time_ratio["duo"] / (xla_flop["duo"] / xla_flop["dense"]),
    "routing_metrics_last_step": last_metrics,
    "target": f"time_ratio <= {TARGET_OVERHEAD} * flop_ratio",
    "target_met": bool(overhead <= TARGET_OVERHEAD),
  }
  result["ffn_breakdown_fwd_bwd"] = ffn_breakdown(
    runners["duo"].run.model_config, args.batch, args.seq
  )
  isoflop.write_result(args.out, result)
  print(
    json.dumps(
      {
        k: result[k]
        for k in (
          "seconds_per_step_median",
          "time_ratio_vs_dense",
          "flop_ratio_vs_dense",
          "overhead",
          "dispatch_speedup_over_full",
          "xla_flop_ratio",
          "overhead_vs_xla_flops",
          "target_met",
          "ffn_breakdown_fwd_bwd",
        )
      },
      indent=2,
    )
  )


if __name__ == "__main__":
  main()
