"""Mixture-of-Depths transformer (Raposo et al. 2024), Flax NNX.

    model = MoDTransformer(Config(capacity=0.125, ...), rngs=nnx.Rngs(0))
    logits_BSV, aux = model(tokens_BS)                        # training: expert-choice top-k
    logits_BSV, aux = model(tokens_BS, routing="threshold")   # teacher-forced decode rule
    logits_BSV, cache = model.forward_cached(tokens_BS, positions_BS, cache)

Blocks `routed_offset, routed_offset + routed_every, ...` are routed, the others
dense. A routed block l has a bias-free linear router r = wᵀx (x the block's
input). In training it takes the k = round(capacity·S) tokens of each row with
the largest r (`adaptive.routing.expert_choice`), gathers them, and runs the
block on those k tokens only, at their original positions (RoPE) with their
segment ids, causal by original position; so skipped tokens are invisible as
keys in that block. With the pre-norm block's residual function

    f(x̃) = a + mlp(norm(x̃ + a)),   a = attn(norm(x̃))      (= block(x̃) − x̃)

a selected token becomes x̃ + g(r)·f(x̃) and a skipped one stays x̃, where
g = `router_activation`: "identity" (the paper: g(r) = r, the router's only
gradient path), "sigmoid" (g = σ(r)) or "ones" (g ≡ 1; with capacity 1 the
model is exactly the dense transformer). The routed block's linear layers run
on k tokens instead of S and its attention on k² pairs instead of S²: the
compute saving is real, not masked.

Decoding cannot use top-k (it looks at future tokens). A routed block decides
per token with `decode_router`: "predictor" (a small MLP on stop_gradient(x),
trained by BCE to top-k membership) or "router" (σ(r) > 0.5, the router trained
with the auxiliary BCE loss). Its KV cache holds only tokens that went through
it: an unrouted token writes nothing, and a per-layer, per-slot validity array
(`MoDCache.valid_LBT`) hides slots no routed token wrote. `routing="threshold"`
runs the same per-token decisions teacher-forced (masked-dense), which decoding
reproduces exactly.

Layers run in groups of `routed_every` consecutive blocks (the repeating
dense/routed pattern) through `transformer.run_stacked`, so `scan_layers=True`
scans over the groups and remat checkpoints a group at a time; the
num_layers % routed_every last blocks, if any, run after them as one group.

aux["losses"]: "mod/router_bce", "mod/predictor_bce" (already weighted).
aux["metrics"]: "mod/routed_fraction" (realised fraction of tokens through the
routed blocks), "mod/router_weight_selected" (mean g(r) of routed tokens),
"mod/router_accuracy", "mod/predictor_accuracy" (threshold decision vs top-k).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from adaptive import routing
from models import kv_cache as kv_cache_lib
from models import transformer
from models.layers import param

ROUTER_ACTIVATIONS = ("identity", "sigmoid", "ones")
DECODE_ROUTERS = ("predictor", "router")
ROUTING_MODES = ("topk", "threshold")


@dataclasses.dataclass(frozen=True)
class Config(transformer.Config):
  """transformer.Config plus Mixture-of-Depths routing.

  Attributes:
    capacity: fraction of each row's tokens a routed block processes (k =
      round(capacity·S), at least 1). Paper default 12.5%.
    routed_every: period of routed blocks (2 = every other block).
    routed_offset: index of the first routed block (0 <= offset < routed_every).
    router_activation: g in x + g(r)·f(x): "identity" (paper), "sigmoid", "ones".
    decode_router: per-token decision when decoding / routing="threshold":
      "predictor" (MLP on stop_gradient(x)) or "router" (σ(r) > 0.5).
    router_loss_weight: weight of the BCE loss of r against top-k membership.
    predictor_loss_weight: weight of the predictor's BCE loss.
    predictor_hidden: hidden width of the predictor MLP.
  """

  capacity: float = 0.125
  routed_every: int = 2
  routed_offset: int = 1
  router_activation: str = "identity"
  decode_router: str = "predictor"
  router_loss_weight: float = 0.01
  predictor_loss_weight: float = 0.01
  predictor_hidden: int = 64

  def validate(self) -> None:
    super().validate()
    if (
      isinstance(self.capacity, bool)
      or not isinstance(self.capacity, (int, float))
      or not (0 < self.capacity <= 1)
    ):
      raise ValueError(f"model.capacity={self.capacity!r}: must be in (0, 1]")
    for name in ("routed_every", "predictor_hidden"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{name}={value!r}: must be a positive integer")
    if (
      not isinstance(self.routed_offset, int)
      or isinstance(self.routed_offset, bool)
      or not 0 <= self.routed_offset < self.routed_every
    ):
      raise ValueError(
        f"model.routed_offset={self.routed_offset!r}: must be an integer in "
        f"[0, model.routed_every={self.routed_every})"
      )
    if not self.routed_layers:
      raise ValueError(
        f"model.routed_offset={self.routed_offset!r}: no routed block among "
        f"model.num_layers={self.num_layers}"
      )
    if self.router_activation not in ROUTER_ACTIVATIONS:
      raise ValueError(
        f"model.router_activation={self.router_activation!r}; allowed: {ROUTER_ACTIVATIONS}"
      )
    if self.decode_router not in DECODE_ROUTERS:
      raise ValueError(f"model.decode_router={self.decode_router!r}; allowed: {DECODE_ROUTERS}")
    for name in ("router_loss_weight", "predictor_loss_weight"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"model.{name}={value!r}: must be a number >= 0")

  @property
  def routed_layers(self) -> tuple[int, ...]:
    return tuple(range(self.routed_offset, self.num_layers, self.routed_every))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoDCache:
  """KV cache of a MoD model.

  Attributes:
    k_LBTKD, v_LBTKD: keys/values of every layer; slot t = position t.
    valid_LBT: bool, slot t of layer l holds a key some token wrote (always
      True once written in dense layers; only routed tokens in routed ones).
  """

  k_LBTKD: jax.Array
  v_LBTKD: jax.Array
  valid_LBT: jax.Array

  @property
  def capacity(self) -> int:
    return self.k_LBTKD.shape[2]


def _residual_f(block, x_BSD, positions_BS, segment_ids_BS, kv_segment_ids_BS=None):
  """f(x) = block(x) − x of a pre-norm block, computed without the subtraction.

  With `kv_segment_ids_BS`, keys whose kv segment differs from the query's are
  hidden (used for the masked-dense threshold mode).
  """
  c = block.attn.config
  q_BSHD, k_BSKD, v_BSKD = block.attn.project_qkv(block.attn_norm(x_BSD), positions_BS)
  out_BSHD = transformer.attend(
    c,
    q_BSHD,
    k_BSKD,
    v_BSKD,
    segment_ids=segment_ids_BS,
    positions=positions_BS,
    kv_segment_ids=kv_segment_ids_BS,
  )
  a_BSD = block.attn.o_proj(out_BSHD)
  return a_BSD + block.mlp(block.mlp_norm(x_BSD + a_BSD))


class MoDTransformer(transformer.Transformer):
  """Decoder LM whose routed blocks process only the top-k tokens of each row."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    c = config
    r, d, h = len(c.routed_layers), c.dim, c.predictor_hidden
    normal = nnx.initializers.normal
    self.router = param(rngs, normal(d**-0.5), (r, d), c.weight_dtype, ("layers", "embed"))
    self.predictor_w1 = param(
      rngs, normal(d**-0.5), (r, d, h), jnp.float32, ("layers", "embed", None)
    )
    self.predictor_b1 = param(rngs, nnx.initializers.zeros, (r, h), jnp.float32, ("layers", None))
    self.predictor_w2 = param(rngs, normal(h**-0.5), (r, h), jnp.float32, ("layers", None))
    self.predictor_b2 = param(rngs, nnx.initializers.zeros, (r,), jnp.float32, ("layers",))

  # -- routing pieces (rp: one routed block's parameters, from `routed_params`) --

  def routed_params(self, j: int | None = None) -> dict:
    """Router and predictor parameters of routed block j, or all of them stacked [R, ...]."""
    rp = {
      "router_D": self.router[...],
      "predictor": {
        "w1_DH": self.predictor_w1[...],
        "b1_H": self.predictor_b1[...],
        "w2_H": self.predictor_w2[...],
        "b2": self.predictor_b2[...],
      },
    }
    return rp if j is None else jax.tree.map(lambda a: a[j], rp)

  @staticmethod
  def router_logits(rp: dict, x_BSD: jax.Array) -> jax.Array:
    """r = wᵀx of a routed block, float32 [B, S]."""
    return jnp.einsum("bsd,d->bs", x_BSD.astype(jnp.float32), rp["router_D"].astype(jnp.float32))

  def router_weight(self, r_BS: jax.Array) -> jax.Array:
    kind = self.config.router_activation
    if kind == "identity":
      return r_BS
    if kind == "sigmoid":
      return jax.nn.sigmoid(r_BS)
    return jnp.ones_like(r_BS)

  def decide(self, rp: dict, x_BSD: jax.Array) -> jax.Array:
    """Per-token decode-time decision of a routed block, bool [B, S]."""
    if self.config.decode_router == "predictor":
      logits_BS = routing.predictor_logits(rp["predictor"], x_BSD)
    else:
      logits_BS = self.router_logits(rp, x_BSD)
    return routing.threshold_route(logits_BS)

  # -- layers --

  def _block(self, i: int):
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

  def _routed_topk(self, block, rp, x_BSD, positions_BS, segment_ids_BS):
    """Training: the block on the top-k tokens only; returns (x_BSD, stats of scalars)."""
    s = x_BSD.shape[1]
    k = routing.capacity_k(self.config.capacity, s)
    r_BS = self.router_logits(rp, x_BSD)
    sel = routing.expert_choice(r_BS, k, positions_BS, segment_ids_BS)
    x_BKD = routing.gather_tokens(x_BSD, sel.indices_BK)
    g_BK = self.router_weight(routing.gather_tokens(r_BS, sel.indices_BK))
    f_BKD = _residual_f(block, x_BKD, sel.positions_BK, sel.segment_ids_BK)
    new_BKD = x_BKD + (g_BK[..., None] * f_BKD.astype(jnp.float32)).astype(x_BSD.dtype)
    pred_logits_BS = routing.predictor_logits(rp["predictor"], x_BSD)
    stats = {
      "router_bce": routing.router_bce_loss(r_BS, sel.mask_BS),
      "predictor_bce": routing.bce_with_logits(pred_logits_BS, sel.mask_BS),
      "routed_fraction": jnp.float32(k / s),
      "router_weight_selected": jnp.mean(g_BK),
      "router_accuracy": routing.routing_accuracy(r_BS, sel.mask_BS),
      "predictor_accuracy": routing.routing_accuracy(pred_logits_BS, sel.mask_BS),
    }
    return routing.scatter_tokens(x_BSD, new_BKD, sel.indices_BK), stats

  def _routed_threshold(self, block, rp, x_BSD, positions_BS, segment_ids_BS):
    """Masked-dense: each token routed by the decode rule; unrouted keys hidden."""
    route_BS = self.decide(rp, x_BSD)
    seg_BS = (
      jnp.zeros(x_BSD.shape[:2], jnp.int32)
      if segment_ids_BS is None
      else segment_ids_BS.astype(jnp.int32)
    )
    kv_seg_BS = jnp.where(route_BS, seg_BS, -1)
    f_BSD = _residual_f(block, x_BSD, positions_BS, seg_BS, kv_seg_BS)
    g_BS = self.router_weight(self.router_logits(rp, x_BSD))
    update_BSD = jnp.where(route_BS[..., None], g_BS[..., None] * f_BSD.astype(jnp.float32), 0)
    stats = {"routed_fraction": jnp.mean(route_BS.astype(jnp.float32))}
    return x_BSD + update_BSD.astype(x_BSD.dtype), stats

  def _cached_layer(self, block, rp, x_BSD, positions_BS, layer_cache):
    """One block over its cache slice (k_BTKD, v_BTKD, valid_BT); routed iff rp is given."""
    k_BTKD, v_BTKD, valid_BT = layer_cache
    b, t = valid_BT.shape
    if rp is not None:
      route_BS = self.decide(rp, x_BSD)
      g_BS = self.router_weight(self.router_logits(rp, x_BSD))
    else:
      route_BS = jnp.ones(positions_BS.shape, bool)
    # Unrouted tokens write nothing: their slot index is pushed out of range (dropped).
    write_pos_BS = jnp.where(route_BS, positions_BS, t)
    rows_BS = jnp.broadcast_to(jnp.arange(b)[:, None], positions_BS.shape)
    valid_BT = valid_BT.at[rows_BS, write_pos_BS].set(True, mode="drop")
    q_BSHD, k_BSKD, v_BSKD = block.attn.project_qkv(block.attn_norm(x_BSD), positions_BS)
    k_BTKD = kv_cache_lib.write(k_BTKD, k_BSKD, write_pos_BS)
    v_BTKD = kv_cache_lib.write(v_BTKD, v_BSKD, write_pos_BS)
    out_BSHD = transformer.attend(
      self.config,
      q_BSHD,
      k_BTKD.astype(q_BSHD.dtype),
      v_BTKD.astype(q_BSHD.dtype),
      positions=positions_BS,
      kv_positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
      segment_ids=jnp.ones(positions_BS.shape, jnp.int32),
      kv_segment_ids=valid_BT.astype(jnp.int32),
    )
    a_BSD = block.attn.o_proj(out_BSHD)
    if rp is not None:
      f_BSD = a_BSD + block.mlp(block.mlp_norm(x_BSD + a_BSD))
      update = jnp.where(route_BS[..., None], g_BS[..., None] * f_BSD.astype(jnp.float32), 0)
      x_BSD = x_BSD + update.astype(x_BSD.dtype)
    else:  # Same arithmetic as transformer.Block.
      x_BSD = x_BSD + a_BSD
      x_BSD = x_BSD + block.mlp(block.mlp_norm(x_BSD))
    return x_BSD, (k_BTKD, v_BTKD, valid_BT)

  def _run_layers(self, layer_fn, x_BSD, cache):
    """Every block, in groups of `routed_every` (the repeating dense/routed pattern).

    `layer_fn(block, rp or None, x_BSD, layer_cache or None) -> (x_BSD,
    layer_cache, stats)`, rp given at routed blocks. The full groups run
    through `transformer.run_stacked` (so `scan_layers` scans over them), then
    the num_layers % routed_every last blocks, if any. Returns (x_BSD, cache,
    stats of the routed blocks stacked [R]).
    """
    c = self.config
    per = c.routed_every
    full, tail = divmod(c.num_layers, per)
    block_def, block_state = nnx.split(self.layers)
    rps = self.routed_params()

    def group(size):
      def body(carry, xs_g):
        x_BSD, group_cache = carry
        states, rp = xs_g
        stats = {}
        for q in range(size):
          block = nnx.merge(block_def, jax.tree.map(lambda a, q=q: a[q], states))
          layer_cache = None if group_cache is None else tuple(a[q] for a in group_cache)
          x_BSD, layer_cache, layer_stats = layer_fn(
            block, rp if q == c.routed_offset else None, x_BSD, layer_cache
          )
          stats.update(layer_stats)
          if group_cache is not None:
            group_cache = tuple(
              a.at[q].set(u) for a, u in zip(group_cache, layer_cache, strict=True)
            )
        return (x_BSD, group_cache), stats

      return body

    def part(lo, hi):  # Layers [lo, hi) of a pytree with a leading layers axis.
      return None if cache is None else jax.tree.map(lambda a: a[lo:hi], cache)

    stats, caches = [], []
    if full:
      states = jax.tree.map(
        lambda a: a[: full * per].reshape((full, per) + a.shape[1:]), block_state
      )
      x_BSD, group_cache, ys = transformer.run_stacked(
        c,
        group(per),
        x_BSD,
        cache if not tail else part(0, full * per),
        (states, jax.tree.map(lambda a: a[:full], rps)),
        layers_per_step=per,
      )
      stats.append(ys)
      caches.append(group_cache)
    if tail:
      has_routed = c.routed_offset < tail
      states = jax.tree.map(lambda a: a[full * per :][None], block_state)
      rp = jax.tree.map(lambda a: a[full : full + 1], rps) if has_routed else None
      x_BSD, tail_cache, ys = transformer.run_stacked(
        c, group(tail), x_BSD, part(full * per, c.num_layers), (states, rp), layers_per_step=tail
      )
      if has_routed:
        stats.append(ys)
      caches.append(tail_cache)
    if cache is not None and len(caches) > 1:
      cache = jax.tree.map(lambda *parts: jnp.concatenate(parts), *caches)
    elif cache is not None:
      cache = caches[0]
    return x_BSD, cache, jax.tree.map(lambda *a: jnp.concatenate(a), *stats)

  def _run(self, x_BSD, positions_BS, segment_ids_BS, mode):
    c = self.config
    routed_fn = self._routed_topk if mode == "topk" else self._routed_threshold

    def layer_fn(block, rp, x_BSD, _):
      if rp is None:
        return block(x_BSD, positions_BS, segment_ids_BS)[0], None, {}
      x_BSD, stats = routed_fn(block, rp, x_BSD, positions_BS, segment_ids_BS)
      return x_BSD, None, stats

    x_BSD, _, stats = self._run_layers(layer_fn, x_BSD, None)
    metrics = {f"mod/{k}": jnp.mean(v) for k, v in stats.items()}
    losses = {}
    if "mod/router_bce" in metrics:
      if c.router_loss_weight:
        losses["mod/router_bce"] = c.router_loss_weight * metrics["mod/router_bce"]
      if c.predictor_loss_weight:
        losses["mod/predictor_bce"] = c.predictor_loss_weight * metrics["mod/predictor_bce"]
    return x_BSD, {"losses": losses, "metrics": metrics}

  # -- entry points --

  def __call__(self, tokens_BS, positions_BS=None, segment_ids_BS=None, *, routing="topk"):
    """Teacher-forced forward. routing: "topk" (training) or "threshold" (decode rule).

    Returns (logits_BSV float32, aux) with aux = {"losses": ..., "metrics": ...}.
    """
    if routing not in ROUTING_MODES:
      raise ValueError(f"routing={routing!r}; allowed: {ROUTING_MODES}")
    tokens_BS = jnp.asarray(tokens_BS)
    if positions_BS is None:
      positions_BS = transformer.default_positions(tokens_BS, segment_ids_BS)
    x_BSD, aux = self._run(self.embed_tokens(tokens_BS), positions_BS, segment_ids_BS, routing)
    return self.logits_from_hidden(x_BSD), aux

  def init_cache(self, batch: int, capacity: int, dtype=None) -> MoDCache:
    c = self.config
    kv = kv_cache_lib.KVCache.zeros(
      num_layers=c.num_layers,
      batch=batch,
      capacity=capacity,
      num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      dtype=dtype or c.compute_dtype,
    )
    return MoDCache(kv.k_LBTKD, kv.v_LBTKD, jnp.zeros((c.num_layers, batch, capacity), bool))

  def run_layers(self, x_BSD, positions_BS, segment_ids_BS, cache: MoDCache | None):
    """Runs every block over a cache (decode rule in routed blocks); (x_BSD, cache).

    Without a cache this is the training forward and the aux dict is dropped.
    """
    if cache is None:
      x_BSD, _ = self._run(x_BSD, positions_BS, segment_ids_BS, "topk")
      return x_BSD, None

    def layer_fn(block, rp, x_BSD, layer_cache):
      x_BSD, layer_cache = self._cached_layer(block, rp, x_BSD, positions_BS, layer_cache)
      return x_BSD, layer_cache, {}

    x_BSD, cache, _ = self._run_layers(layer_fn, x_BSD, cache)
    return x_BSD, cache

  def forward_cached(self, tokens_BS, positions_BS, cache: MoDCache):
    """Prefill or decode step over a MoDCache; returns (logits_BSV, new cache)."""
    x_BSD, cache = self.run_layers(self.embed_tokens(tokens_BS), positions_BS, None, cache)
    return self.logits_from_hidden(x_BSD), cache
