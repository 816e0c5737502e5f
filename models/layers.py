"""Building blocks of the decoder: linear, RMSNorm, rotary embedding, SwiGLU MLP.

Every parameter is an `nnx.Param` with a `logical_axes` metadata tuple, one name
per dimension; `train/sharding.py` maps these names to mesh axes with the
config's rules. Names used here:

  vocab, embed (model width), q_heads, kv_heads, head_dim, mlp, layers.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Shape = tuple[int, ...]
LogicalAxes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init, shape: Shape, dtype, logical_axes: LogicalAxes) -> nnx.Param:
  """A parameter with logical axis names attached as metadata."""
  if len(shape) != len(logical_axes):
    raise ValueError(f"param shape {shape} vs logical axes {logical_axes}")
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=logical_axes)


def prefix_logical_axes(module: nnx.Module, name: str) -> None:
  """Prepends an axis name to every parameter of a module built under nnx.vmap."""
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Variable) and "logical_axes" in node.get_metadata():
      node.set_metadata(logical_axes=(name,) + tuple(node.get_metadata()["logical_axes"]))


class DenseGeneral(nnx.Module):
  """y = x · W (+ b), contracting the last `len(in_shape)` dims of x.

  W has shape in_shape + out_shape; the logical axes name both parts.
  """

  def __init__(
    self,
    in_shape: Shape,
    out_shape: Shape,
    *,
    in_axes: LogicalAxes,
    out_axes: LogicalAxes,
    use_bias: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    fan_in = math.prod(in_shape)
    init = nnx.initializers.normal(stddev=fan_in**-0.5)
    self.in_ndim = len(in_shape)
    self.kernel = param(rngs, init, in_shape + out_shape, param_dtype, in_axes + out_axes)
    self.bias = (
      param(rngs, nnx.initializers.zeros, out_shape, param_dtype, out_axes) if use_bias else None
    )
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    n = self.in_ndim
    y = jax.lax.dot_general(
      x.astype(self.dtype), kernel, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """x / rms(x) · scale over the last axis, computed in float32."""

  def __init__(
    self, dim: int, *, eps: float, dtype, param_dtype, logical_axis: str, rngs: nnx.Rngs
  ):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, (logical_axis,))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_inverse_frequencies(
  head_dim: int, theta: float, scaling: dict[str, Any] | None
) -> jax.Array:
  """Inverse frequencies [head_dim // 2] of rotary embedding, with optional scaling.

  `scaling` follows Hugging Face's `rope_scaling`: {"rope_type": "linear",
  "factor": f} divides every frequency by f; {"rope_type": "llama3", "factor",
  "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
  rescales low frequencies smoothly as in Llama 3.1.
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta**exponents)
  if not scaling:
    return inv_freq
  kind = scaling.get("rope_type", scaling.get("type"))
  factor = float(scaling["factor"])
  if kind == "linear":
    return inv_freq / factor
  if kind == "llama3":
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= original / low) & (wavelen >= original / high)
    return jnp.where(is_medium, smoothed, scaled)
  raise ValueError(f"rope_scaling rope_type={kind!r}; allowed: None, 'linear', 'llama3'")


def apply_rope(x_BSHD: jax.Array, positions_BS: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in the rotate-half layout used by Llama/Qwen checkpoints."""
  angles_BSF = positions_BS[..., None].astype(jnp.float32) * inv_freq
  cos_BS1F = jnp.cos(angles_BSF)[:, :, None, :]
  sin_BS1F = jnp.sin(angles_BSF)[:, :, None, :]
  x = x_BSHD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BS1F - x2 * sin_BS1F, x2 * cos_BS1F + x1 * sin_BS1F], -1)
  return rotated.astype(x_BSHD.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = DenseGeneral((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",), **kw)
    self.up = DenseGeneral((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",), **kw)
    self.down = DenseGeneral((hidden,), (dim,), in_axes=("mlp",), out_axes=("embed",), **kw)

  def __call__(self, x_BSD: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x_BSD)) * self.up(x_BSD))
