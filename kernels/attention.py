"""The one attention entry point of `adaptive`.

Every model calls `attention(...)`; the implementation behind it is chosen by
`impl`. Shapes use these letters:

  B batch, S query length, T key/value length, H query heads,
  K key/value heads (H % K == 0; K == H is multi-head, K == 1 multi-query),
  D head dimension.

Masking is expressed with positions and segment ids rather than a dense mask,
so the same call serves training (packed sequences), prefill and decoding over
a KV cache, and so fused kernels never materialise an [S, T] mask:

  * a query attends to a key only if their segment ids are equal;
  * with `causal=True`, only if key_position <= query_position;
  * with `sliding_window=W`, only if query_position - key_position < W.

A query that can see no key at all returns zeros (and zero gradients).

Implementations (`impl=`): "xla" (plain XLA, any backend), "pallas" (flash
attention kernels: `flash_tpu` on TPU, `flash_gpu` on GPU; with
`interpret=True` they run on CPU, GPU kernels by default or the TPU kernels
with `pallas_platform="tpu"`), "cudnn" (`jax.nn.dot_product_attention` on
NVIDIA GPUs; default positions, no segment ids) and "auto" (XLA on CPU; on
TPU and GPU the Pallas kernels, except that on an NVIDIA GPU attention takes
cuDNN where it applies: `auto_prefers_cudnn`, from measurements on an H200).

Routed attention (mixture-of-depths) is `routed_attention`, i.e. attention
among gathered tokens with `positions=kv_positions=` their original positions:
the kernels mask by arbitrary int positions per token, not by index.

Decoding over a KV cache with per-row lengths is `decode_attention`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from kernels import flash_common, flash_gpu, flash_tpu, xla_few_queries
from kernels.block_sizes import BlockSizes, default_block_sizes, fit
from kernels.decode_attention import pallas_decode_attention, xla_decode_attention

Impl = Literal["auto", "xla", "pallas", "cudnn"]
IMPLS = ("auto", "xla", "pallas", "cudnn")
PALLAS_PLATFORMS = ("tpu", "gpu")


def _default_positions(batch: int, length: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def visibility_mask(
  q_positions_BS: jax.Array,
  kv_positions_BT: jax.Array,
  q_segment_ids_BS: jax.Array | None,
  kv_segment_ids_BT: jax.Array | None,
  *,
  causal: bool,
  sliding_window: int | None,
) -> jax.Array:
  """Boolean [B, S, T]: True where query s may attend to key t."""
  b, s = q_positions_BS.shape
  t = kv_positions_BT.shape[1]
  mask_BST = jnp.ones((b, s, t), dtype=bool)
  if q_segment_ids_BS is not None:
    mask_BST &= q_segment_ids_BS[:, :, None] == kv_segment_ids_BT[:, None, :]
  delta_BST = q_positions_BS[:, :, None] - kv_positions_BT[:, None, :]
  if causal:
    mask_BST &= delta_BST >= 0
  if sliding_window is not None:
    mask_BST &= delta_BST < sliding_window
  return mask_BST


def _xla_attention(q_BSHD, k_BTKD, v_BTKD, mask_BST, scale):
  """Grouped-query attention in plain XLA without repeating K/V in memory."""
  b, s, h, d = q_BSHD.shape
  num_kv_heads = k_BTKD.shape[2]
  group = h // num_kv_heads
  q_BSKGD = q_BSHD.reshape(b, s, num_kv_heads, group, d)
  logits_BKGST = (
    jnp.einsum("bskgd,btkd->bkgst", q_BSKGD, k_BTKD, preferred_element_type=jnp.float32) * scale
  )
  mask_B11ST = mask_BST[:, None, None, :, :]
  # A finite "minus infinity" keeps fully masked rows free of NaNs; those rows
  # are zeroed explicitly below so every implementation agrees on them.
  logits_BKGST = jnp.where(mask_B11ST, logits_BKGST, jnp.finfo(jnp.float32).min)
  probs_BKGST = jax.nn.softmax(logits_BKGST, axis=-1)
  probs_BKGST = jnp.where(mask_B11ST, probs_BKGST, 0.0)
  out_BSKGD = jnp.einsum(
    "bkgst,btkd->bskgd",
    probs_BKGST.astype(v_BTKD.dtype),
    v_BTKD,
    preferred_element_type=jnp.float32,
  )
  return out_BSKGD.reshape(b, s, h, d).astype(q_BSHD.dtype)


def _pallas_platform(pallas_platform: str | None, interpret: bool) -> str:
  if pallas_platform is not None:
    if pallas_platform not in PALLAS_PLATFORMS:
      raise ValueError(
        f"attention pallas_platform={pallas_platform!r}; allowed: {PALLAS_PLATFORMS}"
      )
    return pallas_platform
  backend = jax.default_backend()
  if backend in PALLAS_PLATFORMS:
    return backend
  if interpret:
    return "gpu"  # the GPU kernels interpret much faster on CPU than the TPU ones
  raise ValueError(
    f"attention impl='pallas' needs a TPU or GPU backend (backend is"
    f" {backend!r}); pass interpret=True to run the kernels on CPU"
  )


def _interpret_param(platform: str, interpret: bool):
  if not interpret:
    return False
  if platform == "gpu":
    return True
  from jax.experimental.pallas import tpu as pltpu

  params = getattr(pltpu, "InterpretParams", None) or pltpu.TPUInterpretParams
  return params()


def _resolve_impl(impl: str, interpret: bool, cudnn_applies: bool = False) -> str:
  """The implementation "auto" stands for: cuDNN where `cudnn_applies` (see
  `auto_prefers_cudnn`) unless interpreting, else Pallas on TPU/GPU or when interpreting, else
  XLA."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r}; allowed: {IMPLS}")
  if impl == "auto":
    if cudnn_applies and not interpret:
      return "cudnn"
    return "pallas" if interpret or jax.default_backend() in PALLAS_PLATFORMS else "xla"
  return impl


CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128  # the largest head dim measured (benchmarks/pallas_gpu_check.py)


def auto_prefers_cudnn(*, nvidia_gpu: bool, dtype, head_dim: int, custom_mask: bool) -> bool:
  """Whether impl="auto" runs cuDNN's fused attention instead of the Pallas kernels.

  On an H200 (benchmarks/results/pallas_gpu_check_h200.json) cuDNN was 2.5-2.7x faster than
  our Pallas kernels forward and 2.0-2.7x forward+backward, so "auto" takes it wherever it
  applies: an NVIDIA GPU, bfloat16 or float16 (cuDNN rejects float32), default positions
  without segment ids, head dim <= 128. Elsewhere the Pallas kernels remain the default.
  """
  return (
    nvidia_gpu
    and jnp.dtype(dtype).name in CUDNN_DTYPES
    and head_dim <= CUDNN_MAX_HEAD_DIM
    and not custom_mask
  )


def is_nvidia_gpu() -> bool:
  device = jax.devices()[0]
  return device.platform == "gpu" and "cuda" in device.client.platform_version.lower()


def _cudnn_attention(q_BSHD, k_BTKD, v_BTKD, *, causal, sliding_window, scale, custom_mask):
  if not is_nvidia_gpu():
    raise ValueError(f"attention impl='cudnn' needs an NVIDIA GPU; devices are {jax.devices()}")
  if custom_mask:
    raise ValueError(
      "attention impl='cudnn' supports default positions without segment ids"
      " only; use impl='pallas' or 'xla' for packed or routed attention"
    )
  window = None if sliding_window is None else (sliding_window - 1, 0)
  return jax.nn.dot_product_attention(
    q_BSHD,
    k_BTKD,
    v_BTKD,
    scale=scale,
    is_causal=causal,
    local_window_size=window,
    implementation="cudnn",
  )


def pallas_attention(
  q_BSHD,
  k_BTKD,
  v_BTKD,
  q_pos_BS,
  kv_pos_BT,
  q_seg_BS,
  kv_seg_BT,
  *,
  causal,
  sliding_window,
  scale,
  platform,
  interpret=False,
  block_sizes=None,
):
  """Flash attention kernels; returns (out [B, S, H, D], lse [B, H, S] float32).

  lse is -inf on rows with no visible key. Positions/segments are int [B, S] / [B, T].
  """
  d = q_BSHD.shape[-1]
  blocks = fit(
    block_sizes or default_block_sizes(platform, d), q_BSHD.shape[1], k_BTKD.shape[1], platform
  )
  cfg = flash_common.FlashConfig(
    causal=causal,
    window=sliding_window,
    scale=float(scale),
    blocks=blocks,
    interpret=_interpret_param(platform, interpret),
  )
  module = flash_tpu if platform == "tpu" else flash_gpu
  d_pad = 0 if platform == "tpu" else max(16, 1 << (d - 1).bit_length()) - d
  return flash_common.flash_attention(
    q_BSHD,
    k_BTKD,
    v_BTKD,
    q_pos_BS,
    kv_pos_BT,
    q_seg_BS,
    kv_seg_BT,
    cfg=cfg,
    forward=module.forward,
    backward=module.backward,
    head_dim_pad=d_pad,
  )


def attention(
  q_BSHD: jax.Array,
  k_BTKD: jax.Array,
  v_BTKD: jax.Array,
  *,
  causal: bool,
  segment_ids: jax.Array | None = None,
  positions: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
  sliding_window: int | None = None,
  scale: float | None = None,
  impl: Impl = "auto",
  interpret: bool = False,
  block_sizes: BlockSizes | None = None,
  pallas_platform: Literal["tpu", "gpu"] | None = None,
) -> jax.Array:
  """Scaled dot-product attention with GQA, causality by position and segments.

  Args:
    q_BSHD: queries [B, S, H, D].
    k_BTKD: keys [B, T, K, D]; H must be a multiple of K.
    v_BTKD: values [B, T, K, D].
    causal: mask keys whose position is after the query's position.
    segment_ids: int [B, S] segment of each query (packed sequences). When
      `kv_segment_ids` is None and S == T they are also the keys' segments.
    positions: int [B, S] position of each query; default 0..S-1.
    kv_segment_ids: int [B, T] segment of each key.
    kv_positions: int [B, T] position of each key; default 0..T-1.
    sliding_window: if set, a query sees only keys fewer than this many
      positions behind it.
    scale: logit scale; default 1/sqrt(D).
    impl: "auto" | "xla" | "pallas" | "cudnn" (see the module docstring).
    interpret: run the Pallas kernels in interpret mode (CPU); implies Pallas
      under impl="auto".
    block_sizes: tile sizes for the Pallas kernels; default from
      `kernels.block_sizes.default_block_sizes`.
    pallas_platform: "tpu" | "gpu": which kernels; default the backend's
      (the GPU kernels when interpreting on CPU).

  Returns:
    [B, S, H, D] in the dtype of `q_BSHD`; rows with no visible key are zero.
  """
  custom = any(x is not None for x in (segment_ids, positions, kv_segment_ids, kv_positions))
  cudnn_applies = impl == "auto" and auto_prefers_cudnn(
    nvidia_gpu=jax.default_backend() == "gpu" and is_nvidia_gpu(),
    dtype=q_BSHD.dtype,
    head_dim=q_BSHD.shape[-1],
    custom_mask=custom,
  )
  impl = _resolve_impl(impl, interpret, cudnn_applies)
  b, s, h, d = q_BSHD.shape
  t, num_kv_heads = k_BTKD.shape[1], k_BTKD.shape[2]
  if k_BTKD.shape != v_BTKD.shape or k_BTKD.shape[0] != b or k_BTKD.shape[3] != d:
    raise ValueError(
      f"attention: q {q_BSHD.shape}, k {k_BTKD.shape}, v {v_BTKD.shape} do not"
      " fit [B, S, H, D], [B, T, K, D], [B, T, K, D]"
    )
  if h % num_kv_heads:
    raise ValueError(f"attention: {h} query heads not a multiple of {num_kv_heads} kv heads")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"attention sliding_window={sliding_window}; must be >= 1 or None")
  if (segment_ids is None) != (kv_segment_ids is None) and s != t:
    raise ValueError("attention: give both segment_ids and kv_segment_ids when S != T")
  scale = d**-0.5 if scale is None else scale
  if impl == "cudnn":
    return _cudnn_attention(
      q_BSHD,
      k_BTKD,
      v_BTKD,
      causal=causal,
      scale=scale,
      sliding_window=sliding_window,
      custom_mask=custom,
    )
  if positions is None:
    positions = _default_positions(b, s)
  if kv_positions is None:
    kv_positions = positions if s == t else _default_positions(b, t)
  if segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = segment_ids
  if kv_segment_ids is not None and segment_ids is None:
    segment_ids = kv_segment_ids
  if impl == "pallas":
    if segment_ids is None:
      segment_ids, kv_segment_ids = jnp.zeros((b, s), jnp.int32), jnp.zeros((b, t), jnp.int32)
    out, _ = pallas_attention(
      q_BSHD,
      k_BTKD,
      v_BTKD,
      positions,
      kv_positions,
      segment_ids,
      kv_segment_ids,
      causal=causal,
      sliding_window=sliding_window,
      scale=scale,
      platform=_pallas_platform(pallas_platform, interpret),
      interpret=interpret,
      block_sizes=block_sizes,
    )
    return out
  mask_BST = visibility_mask(
    positions,
    kv_positions,
    segment_ids,
    kv_segment_ids,
    causal=causal,
    sliding_window=sliding_window,
  )
  if xla_few_queries.use_few_query_path(q_BSHD, k_BTKD):
    return xla_few_queries.few_query_attention(q_BSHD, k_BTKD, v_BTKD, mask_BST, scale)
  return _xla_attention(q_BSHD, k_BTKD, v_BTKD, mask_BST, scale)


def routed_attention(
  q_BSHD,
  k_BSKD,
  v_BSKD,
  positions_BS,
  *,
  segment_ids=None,
  causal=True,
  sliding_window=None,
  scale=None,
  **kwargs,
):
  """Attention among gathered (routed) tokens, causal by their original positions.

  Mixture-of-depths gathers the top-k tokens of a block; `positions_BS` are
  their original positions (any ints, need not be sorted or contiguous), so a
  routed block costs O(k^2) instead of O(S^2) and still masks like the dense
  block restricted to the selected tokens. Extra kwargs go to `attention`.
  """
  return attention(
    q_BSHD,
    k_BSKD,
    v_BSKD,
    causal=causal,
    positions=positions_BS,
    kv_positions=positions_BS,
    segment_ids=segment_ids,
    sliding_window=sliding_window,
    scale=scale,
    **kwargs,
  )


def decode_attention(
  q_BQHD,
  k_cache_BTKD,
  v_cache_BTKD,
  lengths_B,
  *,
  q_positions=None,
  causal=True,
  sliding_window=None,
  scale=None,
  impl: Impl = "auto",
  interpret=False,
  block_sizes=None,
  num_splits=None,
  pallas_platform=None,
):
  """Few query tokens per row against a KV cache (split-K on TPU/GPU).

  Args:
    q_BQHD: new queries [B, Q, H, D].
    k_cache_BTKD, v_cache_BTKD: cache [B, T, K, D]; slot t holds position t.
    lengths_B: int [B] valid slots per row (slots >= length are ignored).
    q_positions: int [B, Q]; default the last Q valid slots, lengths - Q + 0..Q-1.
    impl: "auto" | "xla" | "pallas" ("cudnn" is not offered for decoding).
    num_splits: key-axis splits; default per backend.

  Returns:
    [B, Q, H, D] in q's dtype; queries that see no valid key get zeros.
  """
  impl = _resolve_impl(impl, interpret)
  if impl == "cudnn":
    raise ValueError("decode_attention impl='cudnn' is not supported; use 'pallas' or 'xla'")
  nq, d = q_BQHD.shape[1], q_BQHD.shape[3]
  if q_positions is None:
    q_positions = lengths_B[:, None] - nq + jnp.arange(nq)[None, :]
  scale = d**-0.5 if scale is None else scale
  if impl == "xla":
    return xla_decode_attention(
      q_BQHD,
      k_cache_BTKD,
      v_cache_BTKD,
      lengths_B,
      q_positions,
      causal=causal,
      window=sliding_window,
      scale=scale,
    )
  platform = _pallas_platform(pallas_platform, interpret)
  return pallas_decode_attention(
    q_BQHD,
    k_cache_BTKD,
    v_cache_BTKD,
    lengths_B,
    q_positions,
    causal=causal,
    window=sliding_window,
    scale=scale,
    platform=platform,
    num_splits=num_splits,
    block_sizes=block_sizes,
    interpret=_interpret_param(platform, interpret),
  )
