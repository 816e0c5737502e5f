"""Attention throughput: our Pallas kernels versus jax.nn.dot_product_attention.

    python -m benchmarks.attention [--seqs 1024,2048,...] [--head-dims 64,128] [--repeats 5]

Causal bfloat16 self-attention at H*D = 1024 (16 heads of 64 or 8 of 128) and
B*S = 16384 tokens; for each (seq, head dim) and implementation it records
forward and forward+backward TFLOP/s. FLOPs are the causal useful work:
forward 2 matmuls x 2*B*H*S*S*D / 2, backward 2.5x the forward. Compared:
  pallas  `kernels.attention(impl="pallas")` (flash_tpu on TPU, flash_gpu on GPU)
  xla     `jax.nn.dot_product_attention(implementation="xla")`
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")` (NVIDIA only)
Decode attention: one new token per row, B=8, 32 query heads over 8 kv heads of
128, against a cache of T tokens; reports the K/V bytes read per second (GB/s)
for the split-K kernel and the XLA decode.

Timing: jit, one warm-up call (compile time reported separately), then the
median wall time of `--repeats` calls with block_until_ready.

On CPU there is no accelerator: the kernels run in Pallas interpret mode
(the GPU kernels), on tiny shapes so the script ends in well under two minutes;
the JSON says so (`"interpreted": true`) and its numbers are not performance.
Writes benchmarks/results/attention_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp

from kernels.attention import attention, decode_attention, is_nvidia_gpu

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def _time(fn, *args, repeats):
  """(compile+first call seconds, median seconds per call)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def _impls(interpret):
  impls = {
    "pallas": lambda q, k, v: attention(q, k, v, causal=True, impl="pallas", interpret=interpret),
    "xla": lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="xla"
    ),
  }
  if is_nvidia_gpu():
    impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"
    )
  return impls


def bench_flash(seq, head_dim, tokens, repeats, interpret):
  batch, heads = max(1, tokens // seq), 1024 // head_dim
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.bfloat16) for key in keys)
  fwd_flops = 4 * batch * heads * seq * seq * head_dim / 2
  rows = []
  for name, fn in _impls(interpret).items():
    loss = lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum()
    row = dict(impl=name, seq=seq, head_dim=head_dim, batch=batch, heads=heads)
    for mode, f, flops in (
      ("fwd", fn, fwd_flops),
      ("fwd_bwd", jax.grad(loss, (0, 1, 2)), 3.5 * fwd_flops),
    ):
      try:
        compile_s, seconds = _time(jax.jit(f), q, k, v, repeats=repeats)
        row[f"{mode}_tflops"] = flops / seconds / 1e12
        row[f"{mode}_ms"] = seconds * 1e3
        row[f"{mode}_compile_s"] = compile_s
      except Exception as e:  # a failing impl is recorded, the sweep goes on
        row[f"{mode}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(row, flush=True)
    rows.append(row)
  return rows


def bench_decode(kv_len, repeats, interpret, batch=8, heads=32, kv_heads=8, head_dim=128):
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (batch, 1, heads, head_dim), jnp.bfloat16)
  k, v = (
    jax.random.normal(key, (batch, kv_len, kv_heads, head_dim), jnp.bfloat16) for key in keys[1:]
  )
  lengths = jnp.full((batch,), kv_len, jnp.int32)
  kv_bytes = 2 * k.size * k.dtype.itemsize
  rows = []
  for name in ("pallas", "xla"):
    fn = jax.jit(
      lambda q, k, v, n, name=name: decode_attention(
        q, k, v, n, impl=name, interpret=interpret and name == "pallas"
      )
    )
    row = dict(
      impl=name, kv_len=kv_len, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim
    )
    try:
      compile_s, seconds = _time(fn, q, k, v, lengths, repeats=repeats)
      row.update(gbps=kv_bytes / seconds / 1e9, us=seconds * 1e6, compile_s=compile_s)
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(row, flush=True)
    rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seqs", default=None, help="comma-separated sequence lengths")
  parser.add_argument("--head-dims", default="64,128")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  if on_cpu:  # interpret mode: tiny shapes, numbers are not performance
    seqs, tokens, decode_lens, repeats = [128, 256], 256, [512], 1
    head_dims = [64]
  else:
    seqs, tokens, decode_lens, repeats = (
      [1024, 2048, 4096, 8192, 16384],
      16384,
      [1024, 4096, 16384],
      args.repeats,
    )
    head_dims = [int(d) for d in args.head_dims.split(",")]
  if args.seqs:
    seqs = [int(s) for s in args.seqs.split(",")]
  start = time.time()
  flash = [
    row
    for s in seqs
    for d in head_dims
    for row in bench_flash(s, d, tokens, repeats, interpret=on_cpu)
  ]
  decode = [row for t in decode_lens for row in bench_decode(t, repeats, interpret=on_cpu)]
  result = dict(
    device=device.device_kind,
    platform=device.platform,
    jax=jax.__version__,
    interpreted=on_cpu,
    note=(
      "CPU run: Pallas kernels interpreted on tiny shapes (B*S=256, 16 heads of 64);"
      " TFLOP/s and GB/s here measure the interpreter, not the kernels."
      if on_cpu
      else "causal bf16; TFLOP/s counts causal useful FLOPs"
    ),
    flash=flash,
    decode=decode,
    wall_s=time.time() - start,
  )
  os.makedirs(RESULTS_DIR, exist_ok=True)
  slug = re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_")
  path = os.path.join(RESULTS_DIR, f"attention_{slug}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print("wrote", path)


if __name__ == "__main__":
  main()
