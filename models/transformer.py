"""Dense decoder-only transformer in the Llama / Qwen2 / Qwen3 family (Flax NNX).

    model = Transformer(Config(...), rngs=nnx.Rngs(0))
    logits_BSV, aux = model(tokens_BS)                         # training / scoring
    logits_BSV, cache = model.forward_cached(tokens_BS, positions_BS, cache)  # decoding

Layers are stored stacked (every parameter of the blocks has a leading `layers`
axis), so they can run either as an unrolled Python loop or, with
`Config.scan_layers`, as one `lax.scan` whose compile time does not grow with
depth. `aux` is a dict adaptive variants fill with routing statistics and
auxiliary losses; the dense model returns it empty.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import xla_few_queries
from kernels.attention import IMPLS as ATTENTION_IMPLS
from kernels.attention import attention
from models import kv_cache as kv_cache_lib
from models.layers import (
  MLP,
  DenseGeneral,
  RMSNorm,
  apply_rope,
  param,
  prefix_logical_axes,
  rope_inverse_frequencies,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Architecture and numerics of a decoder transformer.

  Attributes:
    vocab_size: number of token ids.
    dim: model width (residual stream size).
    num_layers: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads; num_heads must be a multiple (GQA; 1 = MQA).
    head_dim: size of each head.
    mlp_dim: hidden size of the SwiGLU MLP.
    rope_theta: RoPE base.
    rope_scaling: None or a Hugging Face style dict ({"rope_type": "linear" |
      "llama3", "factor": ..., ...}).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: LM head shares the embedding matrix.
    qkv_bias: biases on the q/k/v projections (Qwen2).
    qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
    sliding_window: if set, every layer attends to at most this many tokens back.
    dtype: compute dtype name ("float32", "bfloat16", "float16").
    param_dtype: parameter storage dtype name.
    remat: activation checkpointing per block: one of REMAT_POLICIES.
    scan_layers: run the blocks as one lax.scan (flat compile time in depth).
    attention_impl: passed to kernels.attention ("auto", "xla", "pallas", "cudnn").
    attention_interpret: run the Pallas kernels in interpret mode (CPU testing).
  """

  vocab_size: int = 256
  dim: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 64
  mlp_dim: int = 768
  rope_theta: float = 10_000.0
  rope_scaling: dict[str, Any] | None = None
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  attention_impl: str = "auto"
  attention_interpret: bool = False

  def __post_init__(self):
    self.validate()

  def __hash__(self):
    # The generated hash fails on the rope_scaling dict, and a graphdef (which
    # holds the config) must be hashable to be a static jit argument.
    fields = dataclasses.astuple(self)
    return hash(tuple(tuple(sorted(f.items())) if isinstance(f, dict) else f for f in fields))

  def validate(self) -> None:
    """Raises ValueError naming the first bad field and what is allowed."""
    for name in (
      "vocab_size",
      "dim",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "mlp_dim",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{name}={value!r}: must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"model.num_heads={self.num_heads} must be a multiple of "
        f"model.num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim}: must be even for RoPE")
    if not self.rope_theta > 0:
      raise ValueError(f"model.rope_theta={self.rope_theta!r}: must be > 0")
    if not 0 < self.norm_eps < 1:
      raise ValueError(f"model.norm_eps={self.norm_eps!r}: must be in (0, 1)")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"model.{name}={getattr(self, name)!r}; allowed: {sorted(DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r}; allowed: {sorted(REMAT_POLICIES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl={self.attention_impl!r}; allowed: {ATTENTION_IMPLS}")
    if self.sliding_window is not None and (
      not isinstance(self.sliding_window, int) or self.sliding_window < 1
    ):
      raise ValueError(
        f"model.sliding_window={self.sliding_window!r}: must be None or a positive integer"
      )
    if self.rope_scaling is not None:
      # Evaluating the frequencies checks the type and required keys.
      try:
        rope_inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"model.rope_scaling={self.rope_scaling!r}: {e}") from None

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes) -> Config:
    return dataclasses.replace(self, **changes)


def attend(config: Config, q_BSHD, k_BTKD, v_BTKD, **mask) -> jax.Array:
  """Causal `kernels.attention` with the config's implementation and window.

  `mask` holds the positions / segment ids keywords of `kernels.attention`.
  """
  return attention(
    q_BSHD,
    k_BTKD,
    v_BTKD,
    causal=True,
    sliding_window=config.sliding_window,
    impl=config.attention_impl,
    interpret=config.attention_interpret,
    **mask,
  )


# Cache elements per row and layer (T·K·D) from which a decode step attends before writing. The
# copies that saves grow with the cache; the few extra small ops it adds do not. Measured on the
# 2-core CPU, batch 1, both ways in one process (median of 3): a 4-layer D=512 model (K·D = 128)
# takes 2.88 vs 3.67 / 3.58 vs 5.51 / 3.76 vs 6.20 ms per token generating 256 / 1024 / 2048
# tokens; the 4-layer early-exit models (T = 112, K·D = 64) ran their self-speculative drafts
# up to 20 % slower reading first.
MIN_CACHE_ELEMENTS_TO_READ_FIRST = 2**15


def reads_cache_before_write(config: Config, q_BSHD, k_BTKD) -> bool:
  """Whether a cached step attends before writing (`xla_few_queries.attention_before_cache_write`):
  XLA attention on CPU for one query per row (a decode step) over a cache of at least
  `MIN_CACHE_ELEMENTS_TO_READ_FIRST` elements per row and layer, where writing first costs a
  cache copy per step. Self-speculative verify passes (k + 1 queries) measured slower this way,
  so they write first."""
  t, kv_heads, head_dim = k_BTKD.shape[1:]
  return (
    config.attention_impl in ("auto", "xla")
    and not config.attention_interpret
    and q_BSHD.shape[1] == 1
    and t * kv_heads * head_dim >= MIN_CACHE_ELEMENTS_TO_READ_FIRST
    and xla_few_queries.use_few_query_path(q_BSHD, k_BTKD)
  )


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE, optional QKV bias and q/k norm."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    c = config
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs)
    self.q_proj = DenseGeneral(
      (c.dim,),
      (c.num_heads, c.head_dim),
      in_axes=("embed",),
      out_axes=("q_heads", "head_dim"),
      use_bias=c.qkv_bias,
      **kw,
    )
    self.k_proj = DenseGeneral(
      (c.dim,),
      (c.num_kv_heads, c.head_dim),
      in_axes=("embed",),
      out_axes=("kv_heads", "head_dim"),
      use_bias=c.qkv_bias,
      **kw,
    )
    self.v_proj = DenseGeneral(
      (c.dim,),
      (c.num_kv_heads, c.head_dim),
      in_axes=("embed",),
      out_axes=("kv_heads", "head_dim"),
      use_bias=c.qkv_bias,
      **kw,
    )
    self.o_proj = DenseGeneral(
      (c.num_heads, c.head_dim),
      (c.dim,),
      in_axes=("q_heads", "head_dim"),
      out_axes=("embed",),
      use_bias=False,
      **kw,
    )
    if c.qk_norm:
      norm_kw = dict(
        eps=c.norm_eps,
        dtype=c.compute_dtype,
        param_dtype=c.weight_dtype,
        logical_axis="head_dim",
        rngs=rngs,
      )
      self.q_norm = RMSNorm(c.head_dim, **norm_kw)
      self.k_norm = RMSNorm(c.head_dim, **norm_kw)
    else:
      self.q_norm = self.k_norm = None
    self.config = config

  def project_qkv(self, x_BSD: jax.Array, positions_BS: jax.Array):
    """Queries [B,S,H,D] and keys/values [B,S,K,D] with RoPE applied at `positions_BS`."""
    c = self.config
    q_BSHD, k_BSKD, v_BSKD = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
    if self.q_norm is not None:
      q_BSHD, k_BSKD = self.q_norm(q_BSHD), self.k_norm(k_BSKD)
    inv_freq = rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    return (
      apply_rope(q_BSHD, positions_BS, inv_freq),
      apply_rope(k_BSKD, positions_BS, inv_freq),
      v_BSKD,
    )

  def __call__(self, x_BSD, positions_BS, segment_ids_BS, cache_kv=None):
    """Self-attention; with `cache_kv=(k_BTKD, v_BTKD)` attends over the cache.

    The new keys/values are first written into the cache at their positions, so
    the returned cache holds them too. Returns (out_BSD, new cache_kv or None).
    """
    c = self.config
    q_BSHD, k_BSKD, v_BSKD = self.project_qkv(x_BSD, positions_BS)
    if cache_kv is None:
      out_BSHD = attend(
        c, q_BSHD, k_BSKD, v_BSKD, segment_ids=segment_ids_BS, positions=positions_BS
      )
    elif reads_cache_before_write(c, q_BSHD, cache_kv[0]):
      out_BSHD = xla_few_queries.attention_before_cache_write(
        q_BSHD,
        cache_kv[0].astype(q_BSHD.dtype),
        cache_kv[1].astype(q_BSHD.dtype),
        k_BSKD,
        v_BSKD,
        positions_BS,
        sliding_window=c.sliding_window,
        scale=c.head_dim**-0.5,
      )
      k_BSKD, v_BSKD = kv_cache_lib.after(out_BSHD, k_BSKD, v_BSKD)
      cache_kv = tuple(
        kv_cache_lib.write(a, new, positions_BS)
        for a, new in zip(cache_kv, (k_BSKD, v_BSKD), strict=True)
      )
    else:
      k_BTKD = kv_cache_lib.write(cache_kv[0], k_BSKD, positions_BS)
      v_BTKD = kv_cache_lib.write(cache_kv[1], v_BSKD, positions_BS)
      b, t = k_BTKD.shape[:2]
      kv_positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      out_BSHD = attend(
        c,
        q_BSHD,
        k_BTKD.astype(q_BSHD.dtype),
        v_BTKD.astype(q_BSHD.dtype),
        positions=positions_BS,
        kv_positions=kv_positions_BT,
      )
      cache_kv = (k_BTKD, v_BTKD)
    return self.o_proj(out_BSHD), cache_kv


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)); x + mlp(norm(x))."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    c = config
    norm_kw = dict(
      eps=c.norm_eps,
      dtype=c.compute_dtype,
      param_dtype=c.weight_dtype,
      logical_axis="embed",
      rngs=rngs,
    )
    self.attn_norm = RMSNorm(c.dim, **norm_kw)
    self.attn = Attention(c, rngs=rngs)
    self.mlp_norm = RMSNorm(c.dim, **norm_kw)
    self.mlp = MLP(c.dim, c.mlp_dim, dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs)

  def __call__(self, x_BSD, positions_BS, segment_ids_BS, cache_kv=None):
    attn_out, cache_kv = self.attn(self.attn_norm(x_BSD), positions_BS, segment_ids_BS, cache_kv)
    x_BSD = x_BSD + attn_out
    x_BSD = x_BSD + self.mlp(self.mlp_norm(x_BSD))
    return x_BSD, cache_kv


def positions_from_segments(segment_ids_BS: jax.Array) -> jax.Array:
  """Positions that restart at 0 at the start of every segment, [B, S] int32."""
  s = segment_ids_BS.shape[1]
  index_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids_BS.shape)
  is_start_BS = jnp.concatenate(
    [jnp.ones_like(segment_ids_BS[:, :1], bool), segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]],
    axis=1,
  )
  start_BS = jax.lax.cummax(jnp.where(is_start_BS, index_BS, 0), axis=1)
  return index_BS - start_BS


def default_positions(tokens_BS: jax.Array, segment_ids_BS: jax.Array | None) -> jax.Array:
  """0..S-1 per row, or restarting at every segment when segment ids are given."""
  if segment_ids_BS is not None:
    return positions_from_segments(segment_ids_BS)
  b, s = tokens_BS.shape
  return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


def stacked_blocks(config: Config, num: int, rngs: nnx.Rngs, block_cls=Block) -> nnx.Module:
  """`num` blocks whose parameters are stacked along a leading `layers` axis."""

  @nnx.split_rngs(splits=num)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return block_cls(config, rngs=rngs)

  blocks = create(rngs)
  prefix_logical_axes(blocks, "layers")
  return blocks


def run_stacked(config: Config, body, x_BSD, cache, xs, *, layers_per_step: int | None = None):
  """Runs `body` once per layer, as a `lax.scan` or an unrolled loop (`config.scan_layers`).

  `body((x_BSD, layer_kv), xs_l) -> ((x_BSD, layer_kv), ys_l)`: `xs_l` is
  step l's slice of `xs` (a pytree of arrays with a leading steps axis, e.g.
  the stacked block state), `layer_kv` the step's slice of the cache or None.
  The cache is None or a pytree dataclass of arrays with a leading layers axis
  (`KVCache`, or a variant's own, e.g. with a validity array); `layer_kv` is
  the tuple of its leaves' slices, e.g. (k_BTKD, v_BTKD) for a KVCache.

  A step is one layer by default. With `layers_per_step` = G it is a group of
  G consecutive layers (a repeating pattern, e.g. a dense and a routed block)
  and the cache slices keep that axis: leaves [G, ...].

  The body runs under jax.checkpoint with the config's remat policy. Returns
  (x_BSD, updated cache or None, ys stacked along a leading steps axis).
  Shared by the dense model and the adaptive variants, so that all of them
  scan, remat and update the cache the same way.
  """
  c = config
  num_steps = jax.tree.leaves(xs)[0].shape[0]
  g = layers_per_step
  to_steps = lambda a: a if g is None else a.reshape((num_steps, g) + a.shape[1:])  # noqa
  to_layers = lambda a: a if g is None else a.reshape((num_steps * g,) + a.shape[2:])  # noqa

  def indexed_body(carry, step):
    x, leaves = carry
    xs_l, index = step
    layer_kv = None if leaves is None else tuple(a[index] for a in leaves)
    (x, layer_kv), ys_l = body((x, layer_kv), xs_l)
    if layer_kv is not None:
      leaves = tuple(
        jax.lax.dynamic_update_index_in_dim(a, u, index, 0)
        for a, u in zip(leaves, layer_kv, strict=True)
      )
    return (x, leaves), ys_l

  if c.remat != "none":
    indexed_body = jax.checkpoint(
      indexed_body, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers
    )
  leaves, treedef = (None, None) if cache is None else jax.tree.flatten(cache)
  if leaves is not None:
    leaves = tuple(to_steps(a) for a in leaves)
  if c.scan_layers:
    (x_BSD, leaves), ys = jax.lax.scan(indexed_body, (x_BSD, leaves), (xs, jnp.arange(num_steps)))
  else:
    # Each step gets its own one-step slice of the cache, and the updated
    # slices are concatenated once at the end, instead of updating the whole
    # stacked cache after every step. Same values; but a caller that holds
    # the layers' caches as separate arrays (models.decoding's loop) and
    # stacks them for this call gets no copy at all: XLA folds slice-of-
    # concatenate, so each layer reads and writes its own buffer in place.
    new_leaves, ys_list = [], []
    for i in range(num_steps):
      one_step = None if leaves is None else tuple(a[i : i + 1] for a in leaves)
      (x_BSD, one_step), ys_l = indexed_body(
        (x_BSD, one_step), (jax.tree.map(lambda a, i=i: a[i], xs), 0)
      )
      new_leaves.append(one_step)
      ys_list.append(ys_l)
    ys = jax.tree.map(lambda *a: jnp.stack(a), *ys_list)
    if leaves is not None:
      leaves = tuple(jnp.concatenate(parts) for parts in zip(*new_leaves, strict=True))
  if leaves is None:
    return x_BSD, None, ys
  return x_BSD, jax.tree.unflatten(treedef, [to_layers(a) for a in leaves]), ys


class Transformer(nnx.Module):
  """Decoder-only language model. See the module docstring for the calls."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    c = config
    self.config = config
    embed_std = c.dim**-0.5 if c.tie_embeddings else 1.0
    self.embed = param(
      rngs,
      nnx.initializers.normal(embed_std),
      (c.vocab_size, c.dim),
      c.weight_dtype,
      ("vocab", "embed"),
    )
    self.layers = stacked_blocks(c, c.num_layers, rngs)
    self.final_norm = RMSNorm(
      c.dim,
      eps=c.norm_eps,
      dtype=c.compute_dtype,
      param_dtype=c.weight_dtype,
      logical_axis="embed",
      rngs=rngs,
    )
    self.lm_head = (
      None
      if c.tie_embeddings
      else DenseGeneral(
        (c.dim,),
        (c.vocab_size,),
        in_axes=("embed",),
        out_axes=("vocab",),
        use_bias=False,
        dtype=c.compute_dtype,
        param_dtype=c.weight_dtype,
        rngs=rngs,
      )
    )

  # -- pieces, public so adaptive variants and early-exit heads can reuse them --

  def embed_tokens(self, tokens_BS: jax.Array) -> jax.Array:
    return jnp.take(self.embed[...], tokens_BS, axis=0).astype(self.config.compute_dtype)

  def logits_from_hidden(self, x_BSD: jax.Array) -> jax.Array:
    """Final norm + LM head; float32 logits [B, S, V]."""
    h_BSD = self.final_norm(x_BSD)
    if self.lm_head is None:
      w_VD = self.embed[...].astype(self.config.compute_dtype)
      return jnp.einsum("bsd,vd->bsv", h_BSD, w_VD, preferred_element_type=jnp.float32)
    w_DV = self.lm_head.kernel[...].astype(self.config.compute_dtype)
    return jnp.einsum("bsd,dv->bsv", h_BSD, w_DV, preferred_element_type=jnp.float32)

  def run_layers(
    self,
    x_BSD,
    positions_BS,
    segment_ids_BS,
    cache: kv_cache_lib.KVCache | None,
    layers: tuple[int, int] | None = None,
  ):
    """Runs every block, or blocks [start, stop) of `layers`; returns (x_BSD, cache or None).

    With a range only those layers' cache slices are read and written; the
    others pass through unchanged (a caller holding the layers' caches as
    separate arrays, as models.decoding does, gets no copy of them).
    """
    graphdef, state = nnx.split(self.layers)
    full = cache
    if layers is not None:
      start, stop = layers
      state = jax.tree.map(lambda a: a[start:stop], state)
      if cache is not None:
        cache = jax.tree.map(lambda a: a[start:stop], cache)

    def body(carry, layer):
      x, kv = carry
      block = nnx.merge(graphdef, layer)
      x, kv = block(x, positions_BS, segment_ids_BS, kv)
      return (x, kv), None

    x_BSD, cache, _ = run_stacked(self.config, body, x_BSD, cache, state)
    if layers is not None and cache is not None:
      cache = jax.tree.map(lambda a, new: jnp.concatenate([a[:start], new, a[stop:]]), full, cache)
    return x_BSD, cache

  # -- entry points --

  def __call__(
    self,
    tokens_BS: jax.Array,
    positions_BS: jax.Array | None = None,
    segment_ids_BS: jax.Array | None = None,
  ):
    """Teacher-forced forward pass.

    Args:
      tokens_BS: int token ids [B, S].
      positions_BS: int positions [B, S]; default 0..S-1, restarting at every
        segment when `segment_ids_BS` is given.
      segment_ids_BS: int [B, S]; tokens attend only within their segment
        (packed sequences).

    Returns:
      (logits_BSV float32, aux dict) — aux is empty for the dense model.
    """
    tokens_BS = jnp.asarray(tokens_BS)
    if positions_BS is None:
      positions_BS = default_positions(tokens_BS, segment_ids_BS)
    x_BSD, _ = self.run_layers(self.embed_tokens(tokens_BS), positions_BS, segment_ids_BS, None)
    return self.logits_from_hidden(x_BSD), {}

  def init_cache(self, batch: int, capacity: int, dtype=None) -> kv_cache_lib.KVCache:
    """An empty cache for `batch` rows of up to `capacity` positions."""
    c = self.config
    return kv_cache_lib.KVCache.zeros(
      num_layers=c.num_layers,
      batch=batch,
      capacity=capacity,
      num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      dtype=dtype or c.compute_dtype,
    )

  def forward_cached(
    self, tokens_BS: jax.Array, positions_BS: jax.Array, cache: kv_cache_lib.KVCache
  ):
    """Forward pass that reads and extends a KV cache (prefill or decode step).

    Token s of row b is written at cache slot positions_BS[b, s] and attends to
    every slot at or before its position. Returns (logits_BSV, new cache).
    """
    x_BSD, cache = self.run_layers(self.embed_tokens(tokens_BS), positions_BS, None, cache)
    return self.logits_from_hidden(x_BSD), cache

  # -- self-speculative decoding (models.speculative) --

  def draft_step(self, tokens_BT, positions_BT, cache, draft_layers: int):
    """Draft pass: blocks [0, E) over the cache, then the shared final norm + LM head.

    Writes the K/V of those E layers at `positions_BT`. Returns (logits_BTV
    float32, exit_state, cache); exit_state is what `verify_step` resumes from,
    here the hidden state after block E, [B, T, D]. Variants with another
    drafter (e.g. an accelerated residual stream) override this pair.
    """
    x_BTD = self.embed_tokens(tokens_BT)
    x_BTD, cache = self.run_layers(x_BTD, positions_BT, None, cache, (0, draft_layers))
    return self.logits_from_hidden(x_BTD), x_BTD, cache

  def verify_step(self, exit_state, positions_BT, cache, draft_layers: int):
    """Verify pass: blocks [E, L) from `draft_step`'s exit_state, then the final norm + head.

    Writes the K/V of those layers at `positions_BT`; the first E layers' K/V
    are the draft's. Returns (logits_BTV float32, cache): the full model's
    logits at those positions.
    """
    layers = (draft_layers, self.config.num_layers)
    x_BTD, cache = self.run_layers(exit_state, positions_BT, None, cache, layers)
    return self.logits_from_hidden(x_BTD), cache
