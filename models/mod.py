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
    if isinstance(self.capacity, bool) or not isinstance(self.capacity, (int, float)) or not (
        0 < self.capacity <= 1):
      raise ValueError(f"model.capacity={self.capacity!r}: must be in (0, 1]")
    for name in ("routed_every", "predictor_hidden"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{name}={value!r}: must be a positive integer")
    if (not isinstance(self.routed_offset, int) or isinstance(self.routed_offset, bool)
        or not 0 <= self.routed_offset < self.routed_every):
      raise ValueError(f"model.routed_offset={self.routed_offset!r}: must be an integer in "
                       f"[0, model.routed_every={self.routed_every})")
    if not self.routed_layers:
      raise ValueError(f"model.routed_offset={self.routed_offset!r}: no routed block among "
                       f"model.num_layers={self.num_layers}")
    if self.scan_layers:
      raise ValueError("model.scan_layers=True is not supported by the 'mod' model yet; "
                       "allowed: False")
    if self.router_activation not in ROUTER_ACTIVATIONS:
      raise ValueError(f"model.router_activation={self.router_activation!r}; "
                       f"allowed: {ROUTER_ACTIVATIONS}")
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
  out_BSHD = transformer.attend(c, q_BSHD, k_BSKD, v_BSKD, segment_ids=segment_ids_BS,
                                positions=positions_BS, kv_segment_ids=kv_segment_ids_BS)
  a_BSD = block.attn.o_proj(out_BSHD)
  return a_BSD + block.mlp(block.mlp_norm(x_BSD + a_BSD))


class MoDTransformer(transformer.Transformer):
  """Decoder LM whose routed blocks process only the top-k tokens of each row."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    c = config
    r, d, h = len(c.routed_layers), c.dim, c.predictor_hidden
    normal = nnx.initializers.normal
    self.router = param(rngs, normal(d ** -0.5), (r, d), c.weight_dtype, ("layers", "embed"))
    self.predictor_w1 = param(rngs, normal(d ** -0.5), (r, d, h), jnp.float32,
                              ("layers", "embed", None))
    self.predictor_b1 = param(rngs, nnx.initializers.zeros, (r, h), jnp.float32,
                              ("layers", None))
    self.predictor_w2 = param(rngs, normal(h ** -0.5), (r, h), jnp.float32, ("layers", None))
    self.predictor_b2 = param(rngs, nnx.initializers.zeros, (r,), jnp.float32, ("layers",))

  # -- routing pieces --

  def router_logits(self, j: int, x_BSD: jax.Array) -> jax.Array:
    """r = wᵀx of routed block j (j-th routed block), float32 [B, S]."""
    return jnp.einsum("bsd,d->bs", x_BSD.astype(jnp.float32),
                      self.router[...][j].astype(jnp.float32))

  def router_weight(self, r_BS: jax.Array) -> jax.Array:
    kind = self.config.router_activation
    if kind == "identity":
      return r_BS
    if kind == "sigmoid":
      return jax.nn.sigmoid(r_BS)
    return jnp.ones_like(r_BS)

  def predictor_params(self, j: int) -> dict:
    return {"w1_DH": self.predictor_w1[...][j], "b1_H": self.predictor_b1[...][j],
            "w2_H": self.predictor_w2[...][j], "b2": self.predictor_b2[...][j]}

  def decide(self, j: int, x_BSD: jax.Array) -> jax.Array:
    """Per-token decode-time decision of routed block j, bool [B, S]."""
    if self.config.decode_router == "predictor":
      logits_BS = routing.predictor_logits(self.predictor_params(j), x_BSD)
    else:
      logits_BS = self.router_logits(j, x_BSD)
    return routing.threshold_route(logits_BS)

  # -- layers --

  def _block(self, i: int):
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

  def _routed_topk(self, block, j, x_BSD, positions_BS, segment_ids_BS, stats):
    s = x_BSD.shape[1]
    k = routing.capacity_k(self.config.capacity, s)
    r_BS = self.router_logits(j, x_BSD)
    sel = routing.expert_choice(r_BS, k, positions_BS, segment_ids_BS)
    x_BKD = routing.gather_tokens(x_BSD, sel.indices_BK)
    g_BK = self.router_weight(routing.gather_tokens(r_BS, sel.indices_BK))
    f_BKD = _residual_f(block, x_BKD, sel.positions_BK, sel.segment_ids_BK)
    new_BKD = x_BKD + (g_BK[..., None] * f_BKD.astype(jnp.float32)).astype(x_BSD.dtype)
    pred_logits_BS = routing.predictor_logits(self.predictor_params(j), x_BSD)
    stats["router_bce"].append(routing.router_bce_loss(r_BS, sel.mask_BS))
    stats["predictor_bce"].append(routing.bce_with_logits(pred_logits_BS, sel.mask_BS))
    stats["routed_fraction"].append(jnp.float32(k / s))
    stats["router_weight_selected"].append(jnp.mean(g_BK))
    stats["router_accuracy"].append(routing.routing_accuracy(r_BS, sel.mask_BS))
    stats["predictor_accuracy"].append(routing.routing_accuracy(pred_logits_BS, sel.mask_BS))
    return routing.scatter_tokens(x_BSD, new_BKD, sel.indices_BK)

  def _routed_threshold(self, block, j, x_BSD, positions_BS, segment_ids_BS, stats):
    """Masked-dense: each token routed by the decode rule; unrouted keys hidden."""
    route_BS = self.decide(j, x_BSD)
    seg_BS = (jnp.zeros(x_BSD.shape[:2], jnp.int32) if segment_ids_BS is None
              else segment_ids_BS.astype(jnp.int32))
    kv_seg_BS = jnp.where(route_BS, seg_BS, -1)
    f_BSD = _residual_f(block, x_BSD, positions_BS, seg_BS, kv_seg_BS)
    g_BS = self.router_weight(self.router_logits(j, x_BSD))
    update_BSD = jnp.where(route_BS[..., None], g_BS[..., None] * f_BSD.astype(jnp.float32), 0)
    stats["routed_fraction"].append(jnp.mean(route_BS.astype(jnp.float32)))
    return x_BSD + update_BSD.astype(x_BSD.dtype)

  def _run(self, x_BSD, positions_BS, segment_ids_BS, mode):
    c = self.config
    routed = {l: j for j, l in enumerate(c.routed_layers)}
    stats = {name: [] for name in ("router_bce", "predictor_bce", "routed_fraction",
                                   "router_weight_selected", "router_accuracy",
                                   "predictor_accuracy")}
    for i in range(c.num_layers):

      def layer(model, x_BSD, i=i):
        block, local = model._block(i), {name: [] for name in stats}
        if i not in routed:
          x_BSD, _ = block(x_BSD, positions_BS, segment_ids_BS)
        elif mode == "topk":
          x_BSD = model._routed_topk(block, routed[i], x_BSD, positions_BS, segment_ids_BS,
                                     local)
        else:
          x_BSD = model._routed_threshold(block, routed[i], x_BSD, positions_BS,
                                          segment_ids_BS, local)
        return x_BSD, local

      x_BSD, local = transformer.remat_layer(self, layer)(x_BSD)
      for name, values in local.items():
        stats[name].extend(values)
    mean = lambda v: jnp.mean(jnp.stack(v))  # noqa: E731
    metrics = {f"mod/{k}": mean(v) for k, v in stats.items()
               if v and k not in ("router_bce", "predictor_bce")}
    losses = {}
    if stats["router_bce"]:
      metrics["mod/router_bce"] = mean(stats["router_bce"])
      metrics["mod/predictor_bce"] = mean(stats["predictor_bce"])
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
    kv = kv_cache_lib.KVCache.zeros(num_layers=c.num_layers, batch=batch, capacity=capacity,
                                    num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                    dtype=dtype or c.compute_dtype)
    return MoDCache(kv.k_LBTKD, kv.v_LBTKD, jnp.zeros((c.num_layers, batch, capacity), bool))

  def run_layers(self, x_BSD, positions_BS, segment_ids_BS, cache: MoDCache | None):
    """Runs every block over a cache (decode rule in routed blocks); (x_BSD, cache).

    Without a cache this is the training forward and the aux dict is dropped.
    """
    if cache is None:
      x_BSD, _ = self._run(x_BSD, positions_BS, segment_ids_BS, "topk")
      return x_BSD, None
    c = self.config
    routed = {l: j for j, l in enumerate(c.routed_layers)}
    b, t = x_BSD.shape[0], cache.capacity
    rows_BS = jnp.broadcast_to(jnp.arange(b)[:, None], positions_BS.shape)
    kv_positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ones_BS = jnp.ones(positions_BS.shape, jnp.int32)
    k_all, v_all, valid_all = cache.k_LBTKD, cache.v_LBTKD, cache.valid_LBT
    for i in range(c.num_layers):
      block = self._block(i)
      if i in routed:
        j = routed[i]
        route_BS = self.decide(j, x_BSD)
        g_BS = self.router_weight(self.router_logits(j, x_BSD))
      else:
        route_BS = jnp.ones(positions_BS.shape, bool)
      # Unrouted tokens write nothing: their slot index is pushed out of range (dropped).
      write_pos_BS = jnp.where(route_BS, positions_BS, t)
      valid_BT = valid_all[i].at[rows_BS, write_pos_BS].set(True, mode="drop")
      q_BSHD, k_BSKD, v_BSKD = block.attn.project_qkv(block.attn_norm(x_BSD), positions_BS)
      k_BTKD = kv_cache_lib.write(k_all[i], k_BSKD, write_pos_BS)
      v_BTKD = kv_cache_lib.write(v_all[i], v_BSKD, write_pos_BS)
      out_BSHD = transformer.attend(
          c, q_BSHD, k_BTKD.astype(q_BSHD.dtype), v_BTKD.astype(q_BSHD.dtype),
          positions=positions_BS, kv_positions=kv_positions_BT, segment_ids=ones_BS,
          kv_segment_ids=valid_BT.astype(jnp.int32))
      a_BSD = block.attn.o_proj(out_BSHD)
      if i in routed:
        f_BSD = a_BSD + block.mlp(block.mlp_norm(x_BSD + a_BSD))
        update = jnp.where(route_BS[..., None], g_BS[..., None] * f_BSD.astype(jnp.float32), 0)
        x_BSD = x_BSD + update.astype(x_BSD.dtype)
      else:  # Same arithmetic as transformer.Block.
        x_BSD = x_BSD + a_BSD
        x_BSD = x_BSD + block.mlp(block.mlp_norm(x_BSD))
      k_all = k_all.at[i].set(k_BTKD)
      v_all = v_all.at[i].set(v_BTKD)
      valid_all = valid_all.at[i].set(valid_BT)
    return x_BSD, MoDCache(k_all, v_all, valid_all)

  def forward_cached(self, tokens_BS, positions_BS, cache: MoDCache):
    """Prefill or decode step over a MoDCache; returns (logits_BSV, new cache)."""
    x_BSD, cache = self.run_layers(self.embed_tokens(tokens_BS), positions_BS, None, cache)
    return self.logits_from_hidden(x_BSD), cache
