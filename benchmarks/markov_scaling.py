"""Markovian thinking at scale: rollout time, FLOPs and peak KV cache, LongCoT vs Delethink.

    python -m benchmarks.markov_scaling [--quick] [--repeats 7] [--chunk 128 --carryover 64]

One model (random weights: only cost is measured) runs rollouts whose thinking length goes from
1× to 16× the chunk size C, in two environments: `LongCoTEnv` (one chunk, the context grows with
the thinking) and `DelethinkEnv` (chunks of at most C tokens; later chunks see the query ⊕ an
m-token carry and write C − m). Generation is forced to the full length: no EOS ids, greedy, so
every chunk uses its whole budget and both environments generate exactly the same number of
tokens per row. A rollout is what an RL step or an evaluation runs: `env.reset`, then per chunk
one batched `models.decoding.generate` call over the padded prompts and `env.step`, until done;
its wall time includes the host work between chunks.

Measured per (environment, thinking length):
  * wall time of the whole rollout. Compilation is excluded: each point's first rollout is a
    warm-up (it compiles every program the rollout needs and records the cache); the time is
    the best of `--repeats` later rollouts, the environments and lengths interleaved so machine
    load hits all of them alike (the machine is shared: see the load average in the JSON);
  * peak KV-cache bytes: the nbytes of the cache arrays that `generate`'s jitted programs
    return, read from the real buffers during the warm-up rollout (the largest over all its
    chunks and growth phases);
  * FLOPs from the analytic model of `adaptive.markov_cost` (causal attention over the filled
    cache), and "executed" FLOPs, the same model with each decode step attending over the whole
    cache buffer of its growth phase (what `generate` computes; the buffer sizes are the ones
    recorded).

Sizes (defaults): C = 128, m = C/2, a 16-token query, 4 rows, and a 2-layer float32 model of
width 64 (SwiGLU 128, vocab 256) with 4 query heads of 32 sharing one KV head. GQA as in the
paper's R1-Distill-Qwen-1.5B (12 query heads share 2 KV heads); one KV head also because on CPU
the decode attention path contracts all KV heads at once against a block-diagonal query and so
executes kv_heads times the attention FLOPs the model counts. Attention overtakes the layers'
matmuls at a context of about 1.4 C here (about 1.9 C for that model at C = 8192) and is over 80%
of LongCoT's FLOPs at 16× C, so its quadratic term shows. `--quick`: tiny sizes, 1× and 2× C, a smoke test.

Results: log-log slopes of time against thinking length (`delethink_exponent`, target
<= 1.15; `longcot_exponent`), Delethink's peak KV bytes at 16× C over 2× C
(`delethink_kv_growth`, target <= 1.05), and `flop_model_error` = |(measured LongCoT/Delethink
time ratio at 16× C) / (the FLOP model's ratio) − 1| (target <= 0.25). Targets are reported as
measured, never tuned for.

Writes benchmarks/results/markov_scaling.json and markov_scaling.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time

import flax
import jax
import numpy as np
from flax import nnx

from adaptive import markov_cost
from adaptive.envs import DelethinkEnv, LongCoTEnv
from benchmarks.isoflop import write_result
from models import decoding, transformer

RESULTS = os.path.join(os.path.dirname(__file__), "results")
KINDS = ("longcot", "delethink")
SERIES = (
  "time_s",
  "time_s_median",
  "time_s_repeats",
  "cpu_s",
  "warmup_s",
  "flops_model",
  "flops_executed",
  "attention_flop_fraction",
  "model_gflops_per_cpu_s",
  "peak_kv_bytes",
  "peak_kv_bytes_model",
  "generate_calls",
  "chunk_shapes",
)
TARGETS = {
  "delethink_exponent": 1.15,
  "delethink_kv_growth": 1.05,
  "flop_model_error": 0.25,
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--chunk", type=int, default=128, help="C, Delethink's chunk size (tokens)")
  p.add_argument("--carryover", type=int, default=64, help="m, the carry (tokens)")
  p.add_argument("--keep_head", type=int, default=8, help="h, chunk 1's head kept in the carry")
  p.add_argument("--multiples", default="1,2,4,8,16", help="thinking lengths, in units of C")
  p.add_argument("--query", type=int, default=16, help="query tokens per row")
  p.add_argument("--batch", type=int, default=4, help="rows per rollout")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=1)
  p.add_argument("--head_dim", type=int, default=32)
  p.add_argument("--mlp_dim", type=int, default=128)
  p.add_argument("--vocab", type=int, default=256)
  p.add_argument("--repeats", type=int, default=7, help="timed rollouts per point (best kept)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
  p.add_argument("--out", default=os.path.join(RESULTS, "markov_scaling.json"))
  p.add_argument("--png", default=os.path.join(RESULTS, "markov_scaling.png"))
  args = p.parse_args(argv)
  if args.quick:
    args.chunk, args.carryover, args.keep_head, args.multiples = 16, 8, 2, "1,2"
    args.query, args.batch, args.layers, args.dim = 4, 2, 1, 16
    args.heads, args.kv_heads, args.head_dim, args.mlp_dim = 2, 1, 8, 32
    args.vocab, args.repeats = 32, 1
  args.multiples = [int(x) for x in str(args.multiples).split(",")]
  if 2 not in args.multiples or min(args.multiples) < 1 or args.multiples != sorted(args.multiples):
    raise ValueError(f"--multiples={args.multiples}: increasing, >= 1, and including 2 (KV growth)")
  return args


# -- measuring the real cache buffers -------------------------------------------------------


@contextlib.contextmanager
def recording_caches(cache_type):
  """Records (capacity, nbytes) of every cache that `models.decoding`'s jitted programs return.

  `generate` allocates its KV cache inside jitted programs (the prefill and each growth phase)
  and hands it from one to the next; wrapping those module-level programs for the duration reads
  the real device buffers as they come back, in order. Yields the list the records go into.
  """
  records: list[tuple[int, int]] = []
  originals = {
    name: fn
    for name, fn in vars(decoding).items()
    if callable(fn) and hasattr(fn, "lower") and hasattr(fn, "trace")  # a jax.jit function
  }

  def wrap(fn):
    def wrapped(*args, **kwargs):
      out = fn(*args, **kwargs)
      for node in jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, cache_type)):
        if isinstance(node, cache_type):
          leaves = jax.tree.leaves(node)
          records.append((decoding.cache_capacity(node), sum(int(x.nbytes) for x in leaves)))
      return out

    return wrapped

  try:
    for name, fn in originals.items():
      setattr(decoding, name, wrap(fn))
    yield records
  finally:
    for name, fn in originals.items():
      setattr(decoding, name, fn)


# -- the rollout ----------------------------------------------------------------------------


@dataclasses.dataclass
class ChunkCall:
  """One batched generate call of a rollout (every row runs the same chunk shape here)."""

  prompt: int  # padded prompt length S
  new_tokens: int  # N
  capacities: list[int]  # cache buffer sizes of its growth phases, as recorded
  peak_cache_bytes: int  # the largest cache buffer it held (all rows)


def rollout(model, env, queries, records=None) -> list[ChunkCall]:
  """Runs `env` to the end with `decoding.generate`, one batched call per chunk.

  Returns what each call ran; with `records` (from `recording_caches`), also its cache buffers.
  """
  obs = env.reset(queries)
  batch = len(queries)
  calls = []
  while not obs.done.all():
    active = ~obs.done
    budgets = obs.max_new_tokens[active]
    n = int(budgets.max())
    if not (budgets == n).all():  # no EOS: rows stay in lockstep
      raise AssertionError(f"rows with different budgets {budgets}")
    lengths = np.array([max(len(p), 1) for p in obs.prompts], np.int32)
    tokens = np.zeros((batch, int(lengths.max())), np.int32)
    for i, prompt in enumerate(obs.prompts):
      tokens[i, : len(prompt)] = prompt
    start = len(records) if records is not None else 0
    out = decoding.generate(model, tokens, lengths, max_new_tokens=n, eos_ids=())
    tokens_BN, lengths_B = np.asarray(out.tokens_BN), np.asarray(out.lengths_B)
    obs = env.step([tokens_BN[i, : lengths_B[i]] for i in range(batch)])
    seen = records[start:] if records is not None else []
    calls.append(
      ChunkCall(
        prompt=tokens.shape[1],
        new_tokens=n,
        capacities=sorted({c for c, _ in seen}),
        peak_cache_bytes=max((b for _, b in seen), default=0),
      )
    )
  return calls


def random_model(config: transformer.Config, seed: int) -> transformer.Transformer:
  """A Transformer with random weights made on the host: normal(0, 0.02) matrices, unit norm
  scales. (Its own initialisers run eagerly and compile one small program per parameter, which
  costs more than this benchmark's rollouts at --quick sizes.)"""
  abstract = nnx.eval_shape(lambda: transformer.Transformer(config, rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.RandomState(seed)

  def fill(path, x):
    if "scale" in jax.tree_util.keystr(path):
      return jax.device_put(np.ones(x.shape, x.dtype))
    return jax.device_put((0.02 * rng.standard_normal(x.shape)).astype(x.dtype))

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def make_env(kind: str, thinking: int, args):
  if kind == "longcot":
    return LongCoTEnv(budget=thinking, eos_ids=())
  c, m = args.chunk, args.carryover
  if (thinking - c) % (c - m):
    raise ValueError(f"thinking={thinking}: must be C + k(C − m) for C={c}, m={m}")
  max_chunks = 1 + (thinking - c) // (c - m)
  return DelethinkEnv(c, m, max_chunks, eos_ids=(), keep_head=args.keep_head, mode="train")


def model_chunks(kind: str, thinking: int, args) -> list[markov_cost.Chunk]:
  if kind == "longcot":
    return markov_cost.longcot_chunks(args.query, thinking)
  return markov_cost.delethink_chunks(args.query, thinking, args.chunk, args.carryover)


def fit_exponent(xs, ys) -> float:
  """Slope of log y against log x (least squares)."""
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def l2_cache() -> str:
  """The L2 cache size the OS reports for CPU 0 (e.g. "2048K"), or "unknown"."""
  try:
    with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
      return f.read().strip()
  except OSError:
    return "unknown"


def notes(result: dict, kinds: dict, lengths: list[int], args) -> list[str]:
  """What the numbers say, written from the numbers (no claim here is fixed in advance)."""
  long, dele = kinds["longcot"], kinds["delethink"]
  d = result["diagnostics"]
  top = args.multiples[-1]
  chunks = model_chunks("delethink", lengths[-1], args)
  prefill = sum(c.prompt for c in chunks) / sum(c.context for c in chunks)
  return [
    f"Delethink's FLOP model alone fits a log-log exponent of {d['delethink_flop_model_exponent']}"
    f" over {args.multiples[0]}x..{top}x C (measured wall time {result['delethink_exponent']},"
    f" CPU time {d['delethink_cpu_exponent']}): chunk 1 writes C tokens, every later chunk"
    f" re-reads the query and an m = {args.carryover}-token carry and writes C - m ="
    f" {args.chunk - args.carryover}, so the cost grows with the chunk count (1 + (n - 1)C/(C - m)"
    " at n x C), linear only past the first chunks. Local exponents per doubling, FLOP model"
    f" {dele['local_exponents']['flops_model']}, wall time {dele['local_exponents']['time_s']}.",
    f"Time per FLOP is not constant (model GFLOP per CPU-second: LongCoT {long['model_gflops_per_cpu_s']},"
    f" Delethink {dele['model_gflops_per_cpu_s']}), so the measured LongCoT/Delethink time ratio at"
    f" {top}x C, {d['measured_time_ratio']} (CPU time {d['cpu_time_ratio']}), differs from the FLOP"
    f" model's {d['flop_model_ratio']}. LongCoT is all decode steps, one token per row each, whose"
    f" attention reads a KV cache of up to {long['peak_kv_bytes'][-1]} bytes; Delethink feeds"
    f" {prefill:.0%} of its tokens as prompts (each chunk re-prefills its carry in one batched"
    f" matmul) over a cache of at most {dele['peak_kv_bytes'][-1]} bytes. generate's decode steps"
    " also attend over the whole buffer of their cache-growth phase: counting that, the FLOP ratio"
    f" is {d['executed_flop_ratio']} (error {d['executed_flop_model_error']}).",
    "LongCoT's FLOP rate against the size of its KV cache (L2 cache per core:"
    f" {result['environment']['l2_cache_per_core']}), (model GFLOP per CPU-second, peak KV"
    f" bytes): {list(zip(long['model_gflops_per_cpu_s'], long['peak_kv_bytes'], strict=True))}.",
    f"Load: average {result['environment']['load_average_start']} at the start and"
    f" {result['environment']['load_average_end']} at the end on {os.cpu_count()} cores. Other"
    " processes shift wall times: Delethink's exponent from the best repeats is"
    f" {result['delethink_exponent']}, from the medians {d['delethink_exponent_median_time']},"
    f" from CPU time {d['delethink_cpu_exponent']} (LongCoT {result['longcot_exponent']},"
    f" {d['longcot_exponent_median_time']}, {d['longcot_cpu_exponent']}); differences of this"
    " size are noise.",
    f"Peak KV bytes are the nbytes of the cache buffers generate returned; equal to the model's"
    f" (context = prompt + new - 1 tokens) at every point: {d['peak_kv_bytes_measured_equal_model']}.",
  ]


# -- the plot -------------------------------------------------------------------------------


def plot(result: dict, path: str) -> bool:
  try:
    import matplotlib
  except ImportError:
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  xs = result["thinking_multiples"]
  panels = [
    ("time_s", "rollout wall time (s)", "time_s"),
    ("flops_model", "FLOPs (analytic model)", "flops_executed"),
    ("peak_kv_bytes", "peak KV-cache bytes (measured)", "peak_kv_bytes_model"),
  ]
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
  for ax, (key, label, extra) in zip(axes, panels, strict=True):
    for kind, color in zip(KINDS, ("tab:red", "tab:blue"), strict=True):
      series = result[kind]
      ax.plot(xs, series[key], marker="o", color=color, label=kind)
      if extra != key:
        style = "executed (whole buffers)" if extra == "flops_executed" else "model"
        ax.plot(
          xs, series[extra], ls="--", marker="x", color=color, alpha=0.6, label=f"{kind} {style}"
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_yscale("log")
    ax.set_xlabel(f"thinking length (× C = {result['settings']['chunk_size']} tokens)")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_title(
    f"time exponent: LongCoT {result['longcot_exponent']:.2f}, "
    f"Delethink {result['delethink_exponent']:.2f}",
    fontsize=9,
  )
  axes[1].set_title(
    f"LongCoT/Delethink at {result['diagnostics']['ratios_at_thinking_multiple']}×C: time "
    f"{result['diagnostics']['measured_time_ratio']:.2f}, FLOP model {result['diagnostics']['flop_model_ratio']:.2f}",
    fontsize=9,
  )
  axes[2].set_title(
    f"Delethink KV growth {xs[-1]}×C / 2×C = {result['delethink_kv_growth']:.3f}", fontsize=9
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


# -- main -----------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  load_start = os.getloadavg()
  config = transformer.Config(
    vocab_size=args.vocab,
    dim=args.dim,
    num_layers=args.layers,
    num_heads=args.heads,
    num_kv_heads=args.kv_heads,
    head_dim=args.head_dim,
    mlp_dim=args.mlp_dim,
    dtype="float32",
    param_dtype="float32",
  )
  model = random_model(config, args.seed)
  cache_type = type(jax.eval_shape(lambda: model.init_cache(1, 1)))
  shape = markov_cost.Shape.from_config(config, cache_bytes=4)
  rng = np.random.RandomState(args.seed)
  queries = [rng.randint(0, args.vocab, args.query).astype(np.int32) for _ in range(args.batch)]
  lengths = [k * args.chunk for k in args.multiples]
  points = [(kind, t) for t in lengths for kind in KINDS]

  # Warm-up: compiles every program and records the real cache buffers.
  compiles_before = getattr(decoding, "compile_counts", dict)()
  warm_s, calls = {}, {}
  for kind, thinking in points:
    env = make_env(kind, thinking, args)
    start = time.perf_counter()
    with recording_caches(cache_type) as records:
      calls[kind, thinking] = rollout(model, env, queries, records)
    warm_s[kind, thinking] = time.perf_counter() - start
    generated = env.trace_lengths
    if not (generated == thinking).all() or env.ended_on_eos.any():
      raise AssertionError(f"{kind} at {thinking}: generated {generated}, not forced to full")
    if not all(call.peak_cache_bytes for call in calls[kind, thinking]):
      raise RuntimeError("no cache buffer recorded: models.decoding's jitted programs changed?")
  compiles_after = getattr(decoding, "compile_counts", dict)()

  times = {point: [] for point in points}
  cpu_times = {point: [] for point in points}
  for _ in range(args.repeats):
    for point in points:
      env = make_env(*point, args)
      start, cpu_start = time.perf_counter(), time.process_time()
      rollout(model, env, queries)
      times[point].append(time.perf_counter() - start)
      cpu_times[point].append(time.process_time() - cpu_start)

  result_kinds = {}
  for kind in KINDS:
    series = {k: [] for k in SERIES}
    for thinking in lengths:
      point = (kind, thinking)
      chunks = model_chunks(kind, thinking, args)
      run = calls[point]
      if [(c.prompt, c.new_tokens) for c in run] != [(c.prompt, c.new_tokens) for c in chunks]:
        raise AssertionError(f"{point}: the rollout ran {run}, the model has {chunks}")
      caps = {(c.prompt, c.new_tokens): c.capacities for c in run}

      def buffer_keys(chunk, p, caps=caps):
        return next(c for c in caps[chunk.prompt, chunk.new_tokens] if p < c)

      parts = markov_cost.rollout_flop_parts(shape, chunks, args.batch)
      flops = sum(parts.values())
      executed = markov_cost.rollout_flops(shape, chunks, args.batch, keys_attended=buffer_keys)
      series["time_s"].append(round(min(times[point]), 4))
      series["time_s_median"].append(round(float(np.median(times[point])), 4))
      series["time_s_repeats"].append([round(t, 4) for t in times[point]])
      series["cpu_s"].append(round(min(cpu_times[point]), 4))
      series["warmup_s"].append(round(warm_s[point], 3))
      series["flops_model"].append(flops)
      series["flops_executed"].append(executed)
      series["attention_flop_fraction"].append(round(parts["attention"] / flops, 4))
      series["model_gflops_per_cpu_s"].append(round(flops / 1e9 / min(cpu_times[point]), 3))
      series["peak_kv_bytes"].append(max(c.peak_cache_bytes for c in run))
      series["peak_kv_bytes_model"].append(
        markov_cost.rollout_peak_kv_bytes(shape, chunks, args.batch)
      )
      series["generate_calls"].append(len(run))
      shapes = sorted({(c.prompt, c.new_tokens, tuple(c.capacities)) for c in run})
      series["chunk_shapes"].append(
        [{"prompt": s, "new_tokens": n, "cache_capacities": list(caps)} for s, n, caps in shapes]
      )
    series["time_per_token_us"] = [
      round(1e6 * t / (thinking * args.batch), 2)
      for t, thinking in zip(series["time_s"], lengths, strict=True)
    ]
    series["local_exponents"] = {
      what: [
        round(float(np.log(b / a) / np.log(y / x)), 3)
        for x, y, a, b in zip(lengths, lengths[1:], series[what], series[what][1:], strict=False)
      ]
      for what in ("time_s", "cpu_s", "flops_model")
    }
    result_kinds[kind] = series

  long, dele = result_kinds["longcot"], result_kinds["delethink"]
  top, i2 = len(lengths) - 1, args.multiples.index(2)  # top: the longest (16× C by default)
  measured_ratio = long["time_s"][top] / dele["time_s"][top]
  model_ratio = long["flops_model"][top] / dele["flops_model"][top]
  executed_ratio = long["flops_executed"][top] / dele["flops_executed"][top]
  result = {
    "benchmark": "rollout wall time, FLOPs and peak KV cache vs thinking length, "
    "LongCoT vs Delethink (same model, one run)",
    "command": " ".join(
      ["python -m benchmarks.markov_scaling", *(sys.argv[1:] if argv is None else argv)]
    ),
    "delethink_exponent": round(fit_exponent(lengths, dele["time_s"]), 4),
    "longcot_exponent": round(fit_exponent(lengths, long["time_s"]), 4),
    "delethink_kv_growth": round(dele["peak_kv_bytes"][top] / dele["peak_kv_bytes"][i2], 4),
    "flop_model_error": round(abs(measured_ratio / model_ratio - 1), 4),
  }
  result["targets"] = {
    name: {"value": result[name], "target": f"<= {bound}", "met": bool(result[name] <= bound)}
    for name, bound in TARGETS.items()
  }
  result["diagnostics"] = {
    "ratios_at_thinking_multiple": args.multiples[top],
    "measured_time_ratio": round(measured_ratio, 4),
    "flop_model_ratio": round(model_ratio, 4),
    "executed_flop_ratio": round(executed_ratio, 4),
    "executed_flop_model_error": round(abs(measured_ratio / executed_ratio - 1), 4),
    "cpu_time_ratio": round(long["cpu_s"][top] / dele["cpu_s"][top], 4),
    "cpu_flop_model_error": round(
      abs(long["cpu_s"][top] / dele["cpu_s"][top] / model_ratio - 1), 4
    ),
    "delethink_exponent_median_time": round(fit_exponent(lengths, dele["time_s_median"]), 4),
    "longcot_exponent_median_time": round(fit_exponent(lengths, long["time_s_median"]), 4),
    "delethink_cpu_exponent": round(fit_exponent(lengths, dele["cpu_s"]), 4),
    "longcot_cpu_exponent": round(fit_exponent(lengths, long["cpu_s"]), 4),
    "delethink_flop_model_exponent": round(fit_exponent(lengths, dele["flops_model"]), 4),
    "longcot_flop_model_exponent": round(fit_exponent(lengths, long["flops_model"]), 4),
    "longcot_kv_growth": round(long["peak_kv_bytes"][top] / long["peak_kv_bytes"][i2], 4),
    "peak_kv_bytes_measured_equal_model": all(
      r["peak_kv_bytes"] == r["peak_kv_bytes_model"] for r in result_kinds.values()
    ),
  }
  result["thinking_multiples"] = args.multiples
  result["thinking_tokens"] = lengths
  result.update(result_kinds)
  result["settings"] = {
    "chunk_size": args.chunk,
    "carryover": args.carryover,
    "keep_head": args.keep_head,
    "delethink_mode": "train",
    "query_tokens": args.query,
    "batch": args.batch,
    "model": {
      k: getattr(config, k)
      for k in (
        "vocab_size",
        "dim",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "mlp_dim",
        "dtype",
      )
    }
    | {"weights": f"random normal(0, 0.02), seed {args.seed}"},
    "sampling": "greedy",
    "eos_ids": "none (every chunk generates its whole budget)",
    "cache_growth": "generate's default",
    "repeats": args.repeats,
    "quick": args.quick,
  }
  result["timing"] = (
    "wall time of a whole rollout (env.reset .. done: every batched generate call, host "
    "padding and env.step); compile time excluded: each point's first rollout is a warm-up "
    f"(see warmup_s); time_s is the best of {args.repeats} later rollouts (time_s_median the "
    "median), points interleaved; cpu_s is this process's CPU time (all threads) of the best "
    "repeat, less sensitive to other processes on a shared machine"
  )
  result["compiled_programs"] = {
    k: compiles_after[k] - compiles_before.get(k, 0) for k in compiles_after
  } or "decoding.compile_counts unavailable"
  result["environment"] = {
    "jax": jax.__version__,
    "flax": flax.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
    "device": str(jax.devices()[0]),
    "device_kind": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "load_average_start": [round(x, 2) for x in load_start],
    "load_average_end": [round(x, 2) for x in os.getloadavg()],
    "l2_cache_per_core": l2_cache(),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
  result["notes"] = notes(result, result_kinds, lengths, args)
  result["png"] = os.path.basename(args.png) if plot(result, args.png) else None
  write_result(args.out, result)
  summary = {k: result[k] for k in result if not isinstance(result[k], dict | list)}
  print(json.dumps(summary | {k: result[k] for k in ("targets", "diagnostics")}, indent=2))
  return result


if __name__ == "__main__":
  main()
