"""Duo-LLM style FFN routing: each layer's FFN is skip / small MLP / big MLP per token (Flax NNX).

    model = DuoTransformer(Config(small_mlp_dim=64, ...), rngs=nnx.Rngs(0))
    logits_BSV, aux = model(tokens_BS)                        # learned routers
    logits_BSV, aux = model(tokens_BS, routing_LBS=choices)   # oracle / fixed routing
    choices_LBS = greedy_oracle_routing(model, tokens_BS, budget=0.5)

Every layer keeps its attention. Its FFN input n = mlp_norm(x + a) goes to a
bias-free linear router D -> 3 whose argmax picks option 0 = SKIP, 1 = SMALL
(a SwiGLU MLP of width `small_mlp_dim`), 2 = BIG (the dense model's MLP):

    x_out = x + a + Σ_o w_o · ffn_o(n),   ffn_SKIP = 0

Training the router (documented choice): straight-through top-1. The forward
weights are the one-hot choice w = onehot(argmax) exactly (so the output is
exactly the chosen option's, and "all BIG" is exactly the dense block); the
backward uses w = onehot + p − stop_gradient(p) with p = softmax(logits), so
the LM loss reaches the router through p. A compute penalty
`compute_penalty · mean_tokens,layers Σ_o p_o · cost_o` (cost SKIP 0, SMALL
small_mlp_dim/mlp_dim, BIG 1) pushes towards cheap options.

Static shapes: both MLPs are evaluated for every token and masked (this file is
the modelling/oracle study; the executed compute a token dispatcher would spend
is accounted by `adaptive.flops.duo_forward_flops` from the realised fractions
in aux["metrics"]: "duo/frac_skip", "duo/frac_small", "duo/frac_big").

Oracle mode: `routing_LBS` (int [L, B, S], values 0/1/2) replaces the routers'
choices; `greedy_oracle_routing` searches such a routing for a batch under a
compute budget, the upper bound trained routers are compared against.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import transformer
from models.layers import MLP, param

SKIP, SMALL, BIG = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Config(transformer.Config):
  """transformer.Config plus per-token skip/small/big FFN routing.

  Attributes:
    small_mlp_dim: hidden width of the small MLP (< mlp_dim).
    compute_penalty: weight of the expected FFN cost loss ("duo/compute").
  """

  small_mlp_dim: int = 192
  compute_penalty: float = 0.0

  def validate(self) -> None:
    super().validate()
    if (not isinstance(self.small_mlp_dim, int) or isinstance(self.small_mlp_dim, bool)
        or not 1 <= self.small_mlp_dim < self.mlp_dim):
      raise ValueError(f"model.small_mlp_dim={self.small_mlp_dim!r}: must be an integer in "
                       f"[1, model.mlp_dim={self.mlp_dim})")
    if self.scan_layers:
      raise ValueError("model.scan_layers=True is not supported by the 'duo' model yet; "
                       "allowed: False")
    if (isinstance(self.compute_penalty, bool)
        or not isinstance(self.compute_penalty, (int, float)) or self.compute_penalty < 0):
      raise ValueError(f"model.compute_penalty={self.compute_penalty!r}: must be a number >= 0")

  @property
  def option_costs(self) -> tuple[float, float, float]:
    """FFN cost of SKIP, SMALL, BIG relative to the big MLP."""
    return (0.0, self.small_mlp_dim / self.mlp_dim, 1.0)


class SmallMLP(nnx.Module):
  """The small option of one layer (built stacked with transformer.stacked_blocks)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    c = config
    self.mlp = MLP(c.dim, c.small_mlp_dim, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                   rngs=rngs)

  def __call__(self, x_BSD):
    return self.mlp(x_BSD)


def _remat_layer(model, layer_fn):
  """`x -> layer_fn(model, x)`, under jax.checkpoint with the config's remat policy.

  With remat "none" the call is direct. Otherwise the model's state goes in as
  an explicit argument (split outside, merged inside the checkpoint), so the
  backward pass recomputes the layer from its input and the saved residuals
  the policy (`transformer.REMAT_POLICIES`) allows.
  """
  c = model.config
  if c.remat == "none":
    return lambda x: layer_fn(model, x)
  graphdef, state = nnx.split(model)
  checkpointed = jax.checkpoint(lambda st, x: layer_fn(nnx.merge(graphdef, st), x),
                                policy=transformer.REMAT_POLICIES[c.remat], prevent_cse=True)
  return lambda x: checkpointed(state, x)


class DuoTransformer(transformer.Transformer):
  """Dense transformer whose FFNs are routed per token to skip / small / big."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    c = config
    self.small_mlps = transformer.stacked_blocks(c, c.num_layers, rngs, SmallMLP)
    self.ffn_router = param(rngs, nnx.initializers.normal(c.dim ** -0.5),
                            (c.num_layers, c.dim, 3), jnp.float32, ("layers", "embed", None))

  def _layer(self, module, i):
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

  def __call__(self, tokens_BS, positions_BS=None, segment_ids_BS=None, *, routing_LBS=None):
    """Forward; `routing_LBS` (int [L, B, S] in {0, 1, 2}) fixes every choice (oracle).

    Returns (logits_BSV float32, aux).
    """
    c = self.config
    tokens_BS = jnp.asarray(tokens_BS)
    b, s = tokens_BS.shape
    if positions_BS is None:
      positions_BS = (jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
                      if segment_ids_BS is None
                      else transformer.positions_from_segments(segment_ids_BS))
    costs_O = jnp.asarray(c.option_costs, jnp.float32)
    x_BSD = self.embed_tokens(tokens_BS)
    counts, expected_cost = [], []
    for i in range(c.num_layers):

      def layer(model, x_BSD, i=i):
        block, small = model._layer(model.layers, i), model._layer(model.small_mlps, i)
        a_BSD, _ = block.attn(block.attn_norm(x_BSD), positions_BS, segment_ids_BS)
        h_BSD = x_BSD + a_BSD
        n_BSD = block.mlp_norm(h_BSD)
        logits_BSO = jnp.einsum("bsd,do->bso", n_BSD.astype(jnp.float32),
                                model.ffn_router[...][i])
        p_BSO = jax.nn.softmax(logits_BSO, axis=-1)
        if routing_LBS is None:
          onehot_BSO = jax.nn.one_hot(jnp.argmax(logits_BSO, -1), 3, dtype=jnp.float32)
          w_BSO = onehot_BSO + p_BSO - jax.lax.stop_gradient(p_BSO)  # Straight-through.
        else:
          onehot_BSO = jax.nn.one_hot(routing_LBS[i], 3, dtype=jnp.float32)
          w_BSO = onehot_BSO
        ffn_BSD = (w_BSO[..., SMALL:SMALL + 1] * small(n_BSD).astype(jnp.float32)
                   + w_BSO[..., BIG:BIG + 1] * block.mlp(n_BSD).astype(jnp.float32))
        return (h_BSD + ffn_BSD.astype(h_BSD.dtype), jnp.mean(onehot_BSO, axis=(0, 1)),
                jnp.mean(p_BSO @ costs_O))

      x_BSD, count_O, cost = _remat_layer(self, layer)(x_BSD)
      counts.append(count_O)
      expected_cost.append(cost)
    frac_O = jnp.mean(jnp.stack(counts), axis=0)
    metrics = {"duo/frac_skip": frac_O[SKIP], "duo/frac_small": frac_O[SMALL],
               "duo/frac_big": frac_O[BIG], "duo/realised_cost": frac_O @ costs_O,
               "duo/expected_cost": jnp.mean(jnp.stack(expected_cost))}
    losses = {}
    if c.compute_penalty and routing_LBS is None:
      losses["duo/compute"] = c.compute_penalty * metrics["duo/expected_cost"]
    return self.logits_from_hidden(x_BSD), {"losses": losses, "metrics": metrics}


def per_token_loss(model: DuoTransformer, tokens_BS, routing_LBS) -> jax.Array:
  """Next-token cross-entropy at each position [B, S] (0 at the last position)."""
  logits_BSV, _ = model(tokens_BS, routing_LBS=routing_LBS)
  logp_BSV = jax.nn.log_softmax(logits_BSV[:, :-1], axis=-1)
  nll_BS = -jnp.take_along_axis(logp_BSV, tokens_BS[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(nll_BS, ((0, 0), (0, 1)))


def greedy_oracle_routing(model: DuoTransformer, tokens_BS, budget: float) -> np.ndarray:
  """Greedy per-layer search of a routing [L, B, S] with mean FFN cost <= budget per layer.

  Start from all BIG. For each layer in order, evaluate (one forward each) the
  per-token loss with that layer's tokens all SKIP and all SMALL, the other
  layers at the routing found so far; a token's loss change for an option is
  read at its own position (interactions through attention are ignored: this
  is a greedy search, an approximation of the oracle). Each token first takes
  the cheapest option that does not raise its loss; while the layer's mean
  cost exceeds `budget`, the downgrade with the smallest loss increase per
  unit of cost saved is applied. `budget` is relative to all BIG (1.0).
  """
  c = model.config
  graphdef, state = nnx.split(model)
  loss_fn = jax.jit(lambda st, r: per_token_loss(nnx.merge(graphdef, st), tokens_BS, r))
  b, s = tokens_BS.shape
  costs = np.asarray(c.option_costs)
  routing = np.full((c.num_layers, b, s), BIG, np.int32)
  for layer in range(c.num_layers):
    losses = []
    for option in (SKIP, SMALL, BIG):
      trial = routing.copy()
      trial[layer] = option
      losses.append(np.asarray(loss_fn(state, jnp.asarray(trial))).reshape(-1))
    loss_TO = np.stack(losses, -1)  # [B·S, 3]
    # Cheapest option no worse than BIG, per token.
    choice = np.full(b * s, BIG)
    for option in (SMALL, SKIP):
      choice = np.where(loss_TO[:, option] <= loss_TO[:, BIG], option, choice)
    n = b * s
    while costs[choice].mean() > budget + 1e-9:
      best, best_ratio = None, np.inf
      for option in (SMALL, SKIP):
        saved = costs[choice] - costs[option]
        extra = loss_TO[np.arange(n), option] - loss_TO[np.arange(n), choice]
        ratio = np.where(saved > 0, extra / np.maximum(saved, 1e-12), np.inf)
        t = int(np.argmin(ratio))
        if ratio[t] < best_ratio:
          best, best_ratio = (t, option), ratio[t]
      if best is None:
        break
      choice[best[0]] = best[1]
    routing[layer] = choice.reshape(b, s)
  return routing
