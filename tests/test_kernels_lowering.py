"""The TPU kernels lower for `tpu` (Mosaic) and the GPU kernels for `cuda` (Triton)
at production shapes on this CPU-only install: seq 8192, head dim 128, bf16,
default block sizes, forward and forward+backward, plus decode attention.

Lowering runs the Pallas->Mosaic/Triton MLIR conversion (block-shape rules,
unsupported ops, dtype/shape errors); compiling the MLIR to device code needs
the hardware and is left to the benchmark.
"""

import jax
import jax.numpy as jnp
import pytest

from kernels.attention import decode_attention, pallas_attention

PLATFORMS = [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")]
B, S, H, K, D = 1, 8192, 8, 2, 128


def _lower(fn, *args, target):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(target,)).as_text()


@pytest.mark.parametrize("platform,target,marker", PLATFORMS)
@pytest.mark.parametrize("grad", [False, True])
def test_flash_lowers_at_production_shapes(platform, target, marker, grad):
  q = jax.ShapeDtypeStruct((B, S, H, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, S, K, D), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  seg = jnp.zeros((B, S), jnp.int32)

  def fwd(q, k, v):
    return pallas_attention(
      q,
      k,
      v,
      pos,
      pos,
      seg,
      seg,
      causal=True,
      sliding_window=None,
      scale=D**-0.5,
      platform=platform,
    )[0]

  fn = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), (0, 1, 2)) if grad else fwd
  text = _lower(fn, q, kv, kv, target=target)
  assert text.count(marker) >= (3 if grad else 1)  # fwd, dq, dk/dv kernels


@pytest.mark.parametrize("platform,target,marker", PLATFORMS)
def test_decode_lowers_at_production_shapes(platform, target, marker):
  q = jax.ShapeDtypeStruct((8, 1, 32, D), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((8, 16384, 8, D), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
  fn = lambda q, k, v, n: decode_attention(q, k, v, n, impl="pallas", pallas_platform=platform)
  assert marker in _lower(fn, q, cache, cache, lengths, target=target)


def test_sliding_window_and_gqa_lower_for_tpu():
  q = jax.ShapeDtypeStruct((2, 4096, 16, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 4096, 1, 64), jnp.bfloat16)
  pos = jnp.zeros((2, 4096), jnp.int32)
  fn = jax.grad(
    lambda q, k, v: (
      pallas_attention(
        q, k, v, pos, pos, pos, pos, causal=True, sliding_window=1024, scale=0.125, platform="tpu"
      )[0]
      .astype(jnp.float32)
      .sum()
    ),
    (0, 1, 2),
  )
  assert "tpu_custom_call" in _lower(fn, q, kv, kv, target="tpu")
