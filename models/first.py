"""FiRST: prompt-decided layer skipping for the whole decode (Flax NNX).

    model = FiRSTTransformer(Config(...), rngs=nnx.Rngs(0))
    load_dense(model, nnx.state(pretrained_dense))          # routers stay as initialised
    logits_BSV, aux = model(tokens_BS)                       # training: relaxed gates
    logits_BSV, aux = model(tokens_BS, gates="hard")         # inference decisions
    logits_BSV, cache = model.prefill(prompt_BS, lengths_B, model.init_cache(B, T))
    logits_BSV, cache = model.forward_cached(tokens_BS, positions_BS, cache)

Layer l has a router p_l = σ((w_lᵀ·mean(x_l) + b_l) / gate_temperature) read
from the layer's input x_l averaged over the prompt's tokens. Training (on top
of a pretrained dense model; only the routers need to train:
`ROUTER_PARAMS` is an nnx filter for them) uses the relaxed gate

    x_{l+1} = x_l + p_l · (block_l(x_l) − x_l)

with loss = LM loss + `skip_penalty` · mean_l p_l ("first/compute" in
aux["losses"]). At inference the gate is hard: layer l is skipped for the
sequence iff p_l < 0.5 (x_{l+1} = x_l). The decision is made once, at prefill,
per sequence (pooled over its real prompt tokens: positions < its length), and
kept for the whole decode: a skipped layer never writes its KV cache and is
never read, so the cache stays consistent. In training the "prompt" of each
segment is its first `prompt_length` tokens (0 = the whole segment); packed
rows get one decision per segment.

Compute: the relaxed gates execute every layer (aux metric
"first/skip_fraction" = 0); hard gates report the skipped fraction of
(sequence, layer) pairs. In decoding a layer is not computed at all when every
row of the batch skips it (`lax.cond`); rows that skip it in a mixed batch are
masked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models import kv_cache as kv_cache_lib
from models import transformer
from models.layers import param

GATES = ("relaxed", "hard")


@dataclasses.dataclass(frozen=True)
class Config(transformer.Config):
  """transformer.Config plus FiRST layer routers.

  Attributes:
    skip_penalty: weight of the mean executed-layer probability in the loss.
    router_init_bias: initial router bias (σ(3) ≈ 0.95: start close to dense).
    gate_temperature: divides the router logit.
    prompt_length: training: tokens at the start of each segment pooled as its
      prompt (0 = the whole segment).
  """

  skip_penalty: float = 0.01
  router_init_bias: float = 3.0
  gate_temperature: float = 1.0
  prompt_length: int = 0

  def validate(self) -> None:
    super().validate()
    for name in ("skip_penalty", "router_init_bias", "gate_temperature"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"model.{name}={value!r}: must be a number")
    if self.skip_penalty < 0:
      raise ValueError(f"model.skip_penalty={self.skip_penalty!r}: must be >= 0")
    if not self.gate_temperature > 0:
      raise ValueError(f"model.gate_temperature={self.gate_temperature!r}: must be > 0")
    if (
      not isinstance(self.prompt_length, int)
      or isinstance(self.prompt_length, bool)
      or self.prompt_length < 0
    ):
      raise ValueError(f"model.prompt_length={self.prompt_length!r}: must be an integer >= 0")


def ROUTER_PARAMS(path, value) -> bool:  # noqa: N802 (an nnx filter, used like a constant)
  """nnx filter selecting the FiRST routers (train these; freeze the rest)."""
  return isinstance(value, nnx.Param) and path[0] in ("skip_router_w", "skip_router_b")


def load_dense(model: FiRSTTransformer, dense_state: nnx.State) -> None:
  """Copies a pretrained dense transformer's parameters into `model` (routers untouched)."""
  nnx.update(model, dense_state)


def gate_probability(
  config: Config, w_D: jax.Array, bias: jax.Array, pooled_ND: jax.Array
) -> jax.Array:
  """σ((wᵀ·pooled + b) / gate_temperature): one layer's execute-probability, [..., D] -> [...]."""
  logit = pooled_ND.astype(jnp.float32) @ w_D + bias
  return jax.nn.sigmoid(logit / config.gate_temperature)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FiRSTCache:
  """KV cache plus each row's layer decisions.

  Attributes:
    k_LBTKD, v_LBTKD: keys/values (slot t = position t); skipped layers of a
      row are never written.
    execute_BL: bool, the prompt-decided layers each row runs.
  """

  k_LBTKD: jax.Array
  v_LBTKD: jax.Array
  execute_BL: jax.Array

  @property
  def capacity(self) -> int:
    return self.k_LBTKD.shape[2]


class FiRSTTransformer(transformer.Transformer):
  """Dense transformer with per-sequence, prompt-decided layer skipping."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    c = config
    self.skip_router_w = param(
      rngs, nnx.initializers.zeros, (c.num_layers, c.dim), jnp.float32, ("layers", "embed")
    )
    self.skip_router_b = nnx.Param(
      jnp.full((c.num_layers,), c.router_init_bias, jnp.float32), logical_axes=("layers",)
    )

  def gate_prob(self, i: int, pooled_ND: jax.Array) -> jax.Array:
    """Execute-probability of layer i from pooled prompt states [N, D] -> [N]."""
    return gate_probability(
      self.config, self.skip_router_w[...][i], self.skip_router_b[...][i], pooled_ND
    )

  def _router_and_blocks(self):
    """(block graphdef, xs for run_stacked: (block state, router w [L, D], router b [L]))."""
    graphdef, state = nnx.split(self.layers)
    return graphdef, (state, self.skip_router_w[...], self.skip_router_b[...])

  # -- training / teacher-forced --

  def __call__(self, tokens_BS, positions_BS=None, segment_ids_BS=None, *, gates="relaxed"):
    """Teacher-forced forward with relaxed (training) or hard (inference) gates."""
    if gates not in GATES:
      raise ValueError(f"gates={gates!r}; allowed: {GATES}")
    c = self.config
    tokens_BS = jnp.asarray(tokens_BS)
    b, s = tokens_BS.shape
    if positions_BS is None:
      positions_BS = transformer.default_positions(tokens_BS, segment_ids_BS)
    seg_BS = jnp.zeros((b, s), jnp.int32) if segment_ids_BS is None else segment_ids_BS
    is_prompt_BS = (
      jnp.ones((b, s), bool) if c.prompt_length == 0 else positions_BS < c.prompt_length
    )
    # pool_BSS[b, s, t]: token t is in token s's segment and is a prompt token.
    pool_BSS = (seg_BS[:, :, None] == seg_BS[:, None, :]) & is_prompt_BS[:, None, :]
    pool_BSS = pool_BSS.astype(jnp.float32)
    pool_BSS = pool_BSS / jnp.maximum(pool_BSS.sum(-1, keepdims=True), 1.0)
    graphdef, xs = self._router_and_blocks()

    def body(carry, xs_l):
      x_BSD, _ = carry
      block_st, w_D, bias = xs_l
      pooled_BSD = jnp.einsum("bst,btd->bsd", pool_BSS, x_BSD.astype(jnp.float32))
      p_BS = gate_probability(c, w_D, bias, pooled_BSD)
      y_BSD, _ = nnx.merge(graphdef, block_st)(x_BSD, positions_BS, segment_ids_BS)
      if gates == "relaxed":
        update = p_BS[..., None] * (y_BSD - x_BSD).astype(jnp.float32)
        x_BSD = x_BSD + update.astype(x_BSD.dtype)
        skipped = jnp.float32(0.0)
      else:
        execute_BS = p_BS >= 0.5
        x_BSD = jnp.where(execute_BS[..., None], y_BSD, x_BSD)
        skipped = 1.0 - jnp.mean(execute_BS.astype(jnp.float32))
      return (x_BSD, None), (skipped, jnp.mean(p_BS))

    x_BSD, _, (skipped, probs) = transformer.run_stacked(
      c, body, self.embed_tokens(tokens_BS), None, xs
    )
    executed_prob = jnp.mean(probs)
    metrics = {"first/executed_prob": executed_prob, "first/skip_fraction": jnp.mean(skipped)}
    losses = {"first/compute": c.skip_penalty * executed_prob} if c.skip_penalty else {}
    return self.logits_from_hidden(x_BSD), {"losses": losses, "metrics": metrics}

  # -- decoding --

  def init_cache(self, batch: int, capacity: int, dtype=None) -> FiRSTCache:
    c = self.config
    kv = kv_cache_lib.KVCache.zeros(
      num_layers=c.num_layers,
      batch=batch,
      capacity=capacity,
      num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      dtype=dtype or c.compute_dtype,
    )
    return FiRSTCache(kv.k_LBTKD, kv.v_LBTKD, jnp.ones((batch, c.num_layers), bool))

  def _cached_layers(self, x_BSD, positions_BS, cache: FiRSTCache, prompt_lengths_B=None):
    """Runs the layers over the cache; with `prompt_lengths_B`, decides them first (prefill)."""
    c = self.config
    b = positions_BS.shape[0]
    t = cache.capacity
    kv_positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    deciding = prompt_lengths_B is not None
    if deciding:
      real_BS = positions_BS < prompt_lengths_B[:, None]
      weights_BS = real_BS / jnp.maximum(real_BS.sum(-1, keepdims=True), 1)
    graphdef, xs = self._router_and_blocks()

    def body(carry, xs_l):
      x_BSD, layer_kv = carry
      block_st, w_D, bias, execute_B = xs_l
      block = nnx.merge(graphdef, block_st)
      if deciding:
        pooled_BD = jnp.einsum("bs,bsd->bd", weights_BS, x_BSD.astype(jnp.float32))
        execute_B = gate_probability(c, w_D, bias, pooled_BD) >= 0.5

      def run(args):
        x, k_BTKD, v_BTKD = args
        q_BSHD, k_BSKD, v_BSKD = block.attn.project_qkv(block.attn_norm(x), positions_BS)
        # Rows that skip this layer write nothing: their slots go out of range (dropped).
        write_BS = jnp.where(execute_B[:, None], positions_BS, t)
        k_BTKD = kv_cache_lib.write(k_BTKD, k_BSKD, write_BS)
        v_BTKD = kv_cache_lib.write(v_BTKD, v_BSKD, write_BS)
        out_BSHD = transformer.attend(
          c,
          q_BSHD,
          k_BTKD.astype(q_BSHD.dtype),
          v_BTKD.astype(q_BSHD.dtype),
          positions=positions_BS,
          kv_positions=kv_positions_BT,
        )
        y = x + block.attn.o_proj(out_BSHD)
        y = y + block.mlp(block.mlp_norm(y))
        return jnp.where(execute_B[:, None, None], y, x), k_BTKD, v_BTKD

      # No row runs this layer: skip its compute altogether.
      x_BSD, k_BTKD, v_BTKD = jax.lax.cond(
        jnp.any(execute_B), run, lambda args: args, (x_BSD, *layer_kv)
      )
      return (x_BSD, (k_BTKD, v_BTKD)), execute_B

    execute_LB = None if deciding else cache.execute_BL.T
    kv = kv_cache_lib.KVCache(cache.k_LBTKD, cache.v_LBTKD)
    x_BSD, kv, execute_LB = transformer.run_stacked(c, body, x_BSD, kv, (*xs, execute_LB))
    return x_BSD, FiRSTCache(kv.k_LBTKD, kv.v_LBTKD, execute_LB.T)

  def prefill(self, tokens_BS, prompt_lengths_B, cache: FiRSTCache):
    """Prompt forward (right-padded, from position 0) that decides each row's layers.

    Returns (logits_BSV, cache with execute_BL set).
    """
    b, s = tokens_BS.shape
    positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x_BSD, cache = self._cached_layers(
      self.embed_tokens(tokens_BS), positions_BS, cache, jnp.asarray(prompt_lengths_B)
    )
    return self.logits_from_hidden(x_BSD), cache

  def forward_cached(self, tokens_BS, positions_BS, cache: FiRSTCache):
    """Decode step (or continued prefill) with the layer decisions stored in the cache."""
    x_BSD, cache = self._cached_layers(self.embed_tokens(tokens_BS), positions_BS, cache)
    return self.logits_from_hidden(x_BSD), cache
