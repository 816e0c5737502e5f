"""The Pallas attention kernels compiled for a real GPU, against XLA and cuDNN: a quick check.

    OUT=/tmp python -m benchmarks.pallas_gpu_check     # writes $OUT/pallas_gpu.json

Not interpret mode: on a GPU backend impl="pallas" compiles the Triton kernels. Per case:
the largest absolute difference from impl="xla" (forward output; dq, dk, dv of a random
cotangent), and milliseconds per call (mean of 20 after one warm-up; jit, block_until_ready)
of forward and forward+backward for "pallas", "cudnn" (jax.nn.dot_product_attention, bf16
only) and "xla"; for decode_attention, "pallas" vs "xla" with per-row lengths spread evenly
over [Q, T], and `*_GBps_full_cache` = bytes of the WHOLE K and V caches / time (the rows
read on average (Q + T) / 2T of them, so the bandwidth actually used is about half).
A case that fails records its error and the rest still run. It needs no training and takes
about 40 s on an H200, most of it compiling. benchmarks/attention.py is the full sweep.
Results: benchmarks/results/pallas_gpu_check_h200.json (JAX 0.11.2, 2026-11-29).
"""

import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention import attention, decode_attention

out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "cases": []}


def bench(f, *a, n=20):
  jax.block_until_ready(f(*a))
  t = time.perf_counter()
  for _ in range(n):
    r = f(*a)
  jax.block_until_ready(r)
  return (time.perf_counter() - t) / n


def case(name, fn):
  t0 = time.perf_counter()
  try:
    rec = fn()
  except Exception as e:
    rec = {"error": f"{type(e).__name__}: {str(e)[:1500]}", "trace": traceback.format_exc()[-2500:]}
  rec = {"name": name, "wall_s": round(time.perf_counter() - t0, 1), **rec}
  out["cases"].append(rec)
  print(json.dumps({k: v for k, v in rec.items() if k != "trace"}), flush=True)


def flash(B, S, H, K, D, dtype):
  def run():
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, S, H, D), dtype)
    k = jax.random.normal(ks[1], (B, S, K, D), dtype)
    v = jax.random.normal(ks[2], (B, S, K, D), dtype)
    g = jax.random.normal(ks[3], (B, S, H, D), dtype)
    res = {}
    fwd = {
      i: jax.jit(lambda q, k, v, i=i: attention(q, k, v, causal=True, impl=i))
      for i in ("pallas", "xla", "cudnn")
    }
    grad = {
      i: jax.jit(
        lambda q, k, v, g, i=i: jax.vjp(lambda *x: attention(*x, causal=True, impl=i), q, k, v)[1](
          g
        )
      )
      for i in ("pallas", "xla", "cudnn")
    }
    ref = np.asarray(fwd["xla"](q, k, v), np.float32)
    gref = [np.asarray(x, np.float32) for x in grad["xla"](q, k, v, g)]
    for i in ("pallas", "cudnn"):
      try:
        o = np.asarray(fwd[i](q, k, v), np.float32)
        gs = [np.asarray(x, np.float32) for x in grad[i](q, k, v, g)]
        res[i] = {
          "fwd_max_err": float(np.abs(o - ref).max()),
          "grad_max_err": [float(np.abs(a - b).max()) for a, b in zip(gs, gref, strict=True)],
          "fwd_ms": round(1e3 * bench(fwd[i], q, k, v), 3),
          "fwd_bwd_ms": round(1e3 * bench(grad[i], q, k, v, g), 3),
        }
      except Exception as e:
        res[i] = {"error": f"{type(e).__name__}: {str(e)[:1200]}"}
    res["xla"] = {
      "fwd_ms": round(1e3 * bench(fwd["xla"], q, k, v), 3),
      "fwd_bwd_ms": round(1e3 * bench(grad["xla"], q, k, v, g), 3),
    }
    return res

  return run


def decode(B, T, H, K, D, Q, dtype):
  def run():
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, Q, H, D), dtype)
    kc = jax.random.normal(ks[1], (B, T, K, D), dtype)
    vc = jax.random.normal(ks[2], (B, T, K, D), dtype)
    lengths = jnp.array(np.linspace(Q, T, B).astype(np.int32))
    f = {
      i: jax.jit(lambda q, k, v, l, i=i: decode_attention(q, k, v, l, impl=i))
      for i in ("pallas", "xla")
    }
    ref = np.asarray(f["xla"](q, kc, vc, lengths), np.float32)
    o = np.asarray(f["pallas"](q, kc, vc, lengths), np.float32)
    tp, tx = bench(f["pallas"], q, kc, vc, lengths), bench(f["xla"], q, kc, vc, lengths)
    cache_bytes = 2 * B * T * K * D * jnp.dtype(dtype).itemsize
    return {
      "max_err": float(np.abs(o - ref).max()),
      "pallas_ms": round(1e3 * tp, 4),
      "xla_ms": round(1e3 * tx, 4),
      "pallas_GBps_full_cache": round(cache_bytes / tp / 1e9, 1),
      "xla_GBps_full_cache": round(cache_bytes / tx / 1e9, 1),
    }

  return run


def main():
  case("flash f32 B2 S256 H4 K2 D64", flash(2, 256, 4, 2, 64, jnp.float32))
  case("flash bf16 B4 S2048 H8 K8 D128", flash(4, 2048, 8, 8, 128, jnp.bfloat16))
  case("flash bf16 B2 S8192 H16 K16 D64", flash(2, 8192, 16, 16, 64, jnp.bfloat16))
  case("decode f32 B4 T512 H4 K2 D64 Q1", decode(4, 512, 4, 2, 64, 1, jnp.float32))
  case("decode bf16 B8 T16384 H32 K8 D128 Q1", decode(8, 16384, 32, 8, 128, 1, jnp.bfloat16))
  case("decode bf16 B8 T4096 H32 K8 D128 Q5", decode(8, 4096, 32, 8, 128, 5, jnp.bfloat16))
  with open(os.path.join(os.environ.get("OUT", "/tmp"), "pallas_gpu.json"), "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
