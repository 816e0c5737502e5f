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

Dispatch (static shapes): each option has a buffer of round(capacity·S) slots
per row (`small_capacity`, `big_capacity`). The tokens that chose it fill the
slots in position order (`adaptive.routing.first_come_slots`, causal); only
the slotted tokens are gathered through its MLP and scattered back, so the
executed FFN compute is capacity_small·small + capacity_big·big per token
(`adaptive.flops.duo_forward_flops`). A token past an option's capacity is
dropped to SKIP ("duo/frac_dropped"). A decode step (S = 1) always has a slot.

Router gradient and capacity: an option at capacity 1 runs on every token
(weight 0 where not chosen), so the straight-through weights carry the
gradient of every option, taken or not, to the router. A dispatched option
(capacity < 1) runs on its slotted tokens only. Learning only from the options
tokens took (as in switch-style MoE) makes SKIP absorbing: a skipped token's
loss no longer depends on its router, so only the compute penalty acts on it
and the routers drift to SKIP. So, with `probe_spare_slots` (default), the
slots an option's choosers leave unused (they are computed anyway) go to the
tokens that did not choose it with the highest router probability for it
(`adaptive.routing.fill_spare_slots`); they join with forward weight 0, so the
forward is unchanged and their gradient goes only through the router's p_o
(∂L/∂p_o = ⟨∂L/∂y, ffn_o(n)⟩, as at capacity 1), at no extra compute.

Decoding: `forward_cached` (and so `models.decoding.generate`) routes every
new token with the routers' own argmax, the same rule as training.

Oracle mode: `routing_LBS` (int [L, B, S], values 0/1/2) replaces the routers'
choices (the capacities still apply); `greedy_oracle_routing` searches such a
routing for a batch under a compute budget, the upper bound trained routers are
compared against.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaptive import routing
from models import transformer
from models.layers import MLP, param

SKIP, SMALL, BIG = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Config(transformer.Config):
  """transformer.Config plus per-token skip/small/big FFN routing.

  Attributes:
    small_mlp_dim: hidden width of the small MLP (< mlp_dim).
    compute_penalty: weight of the expected FFN cost loss ("duo/compute").
    small_capacity: slots of the small MLP per row, as a fraction of the row's
      tokens (round(capacity·S), at least 1); in (0, 1].
    big_capacity: the same for the big MLP.
    probe_spare_slots: with learned routers, a dispatched option's unused slots
      carry other tokens at forward weight 0 so the router gets the gradient
      of options they did not take (see the module docstring).
  """

  small_mlp_dim: int = 192
  compute_penalty: float = 0.0
  small_capacity: float = 1.0
  big_capacity: float = 1.0
  probe_spare_slots: bool = True

  def validate(self) -> None:
    super().validate()
    if (
      not isinstance(self.small_mlp_dim, int)
      or isinstance(self.small_mlp_dim, bool)
      or not 1 <= self.small_mlp_dim < self.mlp_dim
    ):
      raise ValueError(
        f"model.small_mlp_dim={self.small_mlp_dim!r}: must be an integer in "
        f"[1, model.mlp_dim={self.mlp_dim})"
      )
    if (
      isinstance(self.compute_penalty, bool)
      or not isinstance(self.compute_penalty, (int, float))
      or self.compute_penalty < 0
    ):
      raise ValueError(f"model.compute_penalty={self.compute_penalty!r}: must be a number >= 0")
    for name in ("small_capacity", "big_capacity"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"model.{name}={value!r}: must be a number in (0, 1]")
    if not isinstance(self.probe_spare_slots, bool):
      raise ValueError(f"model.probe_spare_slots={self.probe_spare_slots!r}: must be True or False")

  @property
  def option_costs(self) -> tuple[float, float, float]:
    """FFN cost of SKIP, SMALL, BIG relative to the big MLP."""
    return (0.0, self.small_mlp_dim / self.mlp_dim, 1.0)


class SmallMLP(nnx.Module):
  """The small option of one layer (built stacked with transformer.stacked_blocks)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    c = config
    self.mlp = MLP(
      c.dim, c.small_mlp_dim, dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs
    )

  def __call__(self, x_BSD):
    return self.mlp(x_BSD)


def option_slots(config: Config, seq_len: int) -> dict[int, int]:
  """Static slots per row of the SMALL and BIG options for rows of `seq_len` tokens."""
  return {
    SMALL: routing.capacity_k(config.small_capacity, seq_len),
    BIG: routing.capacity_k(config.big_capacity, seq_len),
  }


def routed_ffn(
  n_BSD,
  router_DO,
  small,
  big,
  slots_O: dict[int, int],
  *,
  choice_BS=None,
  weights_BSO=None,
  probe_spare_slots=False,
):
  """One layer's routed FFN on its normed input n [B, S, D].

  The choice is the router's argmax (straight-through weights), or
  `choice_BS` (fixed routing, one-hot weights), or `weights_BSO` (float
  [B, S, 3]: every option runs on every token, no capacity, output Σ_o w_o·ffn_o).
  Otherwise an option with fewer slots than tokens runs only on its
  `slots_O[option]` first-come tokens per row (later ones are dropped to SKIP),
  and an option with a slot for every token (capacity 1) runs on all of them.
  `probe_spare_slots` (router's own choice only) fills an option's unused
  slots with the tokens that did not choose it, highest probability first, at
  forward weight 0 (their straight-through weight).

  Returns (ffn_BSD float32, router probabilities p_BSO, choice_BS, executed_BS).
  """
  s = n_BSD.shape[1]
  p_BSO = jax.nn.softmax(jnp.einsum("bsd,do->bso", n_BSD.astype(jnp.float32), router_DO), axis=-1)
  dense_eval = weights_BSO is not None  # Every option on every token (oracle scores).
  if dense_eval:
    w_BSO = weights_BSO.astype(jnp.float32)
    choice_BS = jnp.argmax(w_BSO, -1).astype(jnp.int32)
  elif choice_BS is not None:
    w_BSO = jax.nn.one_hot(choice_BS, 3, dtype=jnp.float32)
    probe_spare_slots = False  # Fixed weights: a probe has no gradient to give.
  else:
    choice_BS = jnp.argmax(p_BSO, -1).astype(jnp.int32)
    onehot_BSO = jax.nn.one_hot(choice_BS, 3, dtype=jnp.float32)
    w_BSO = onehot_BSO + p_BSO - jax.lax.stop_gradient(p_BSO)  # Straight-through.
  ffn_BSD = jnp.zeros(n_BSD.shape, jnp.float32)
  executed_BS = choice_BS
  for option, mlp in ((SMALL, small), (BIG, big)):
    if dense_eval or slots_O[option] >= s:
      # Every token has a slot: run the MLP on all of them, no gather. The
      # straight-through weight then also gives the router the gradient of the
      # options a token did not take (its value there is 0).
      ffn_BSD += w_BSO[..., option, None] * mlp(n_BSD).astype(jnp.float32)
      continue
    wants_BS = choice_BS == option
    slots = routing.first_come_slots(wants_BS, slots_O[option])
    if probe_spare_slots:
      slots = routing.fill_spare_slots(slots, p_BSO[..., option], ~wants_BS)
    ffn_BSD += routing.dispatch_combine(mlp, n_BSD, slots, w_BSO[..., option])
    executed_BS = jnp.where(wants_BS & ~slots.kept_BS, SKIP, executed_BS)
  return ffn_BSD, p_BSO, choice_BS, executed_BS


class DuoTransformer(transformer.Transformer):
  """Dense transformer whose FFNs are routed per token to skip / small / big."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    c = config
    self.small_mlps = transformer.stacked_blocks(c, c.num_layers, rngs, SmallMLP)
    self.ffn_router = param(
      rngs,
      nnx.initializers.normal(c.dim**-0.5),
      (c.num_layers, c.dim, 3),
      jnp.float32,
      ("layers", "embed", None),
    )

  def _route_layers(
    self, x_BSD, positions_BS, segment_ids_BS, cache, routing_LBS=None, routing_weights_LBSO=None
  ):
    """Every layer with its FFN routed; returns (x_BSD, cache or None, per-layer stats).

    Stats (leading layers axis L): "counts_LO" fraction of tokens that ran each
    option, "expected_cost_L", "routing_LBS" (executed choice, int32),
    "dropped_L" fraction of tokens dropped by the capacity.
    """
    c = self.config
    s = x_BSD.shape[1]
    costs_O = jnp.asarray(c.option_costs, jnp.float32)
    slots_O = option_slots(c, s)
    block_def, block_state = nnx.split(self.layers)
    small_def, small_state = nnx.split(self.small_mlps)
    if routing_LBS is not None:
      routing_LBS = jnp.asarray(routing_LBS, jnp.int32)

    def body(carry, xs_l):
      x_BSD, layer_kv = carry
      block_st, small_st, router_DO, choice_BS, w_BSO = xs_l
      block, small = nnx.merge(block_def, block_st), nnx.merge(small_def, small_st)
      a_BSD, layer_kv = block.attn(block.attn_norm(x_BSD), positions_BS, segment_ids_BS, layer_kv)
      h_BSD = x_BSD + a_BSD
      n_BSD = block.mlp_norm(h_BSD)
      ffn_BSD, p_BSO, choice_BS, executed_BS = routed_ffn(
        n_BSD,
        router_DO,
        small,
        block.mlp,
        slots_O,
        choice_BS=choice_BS,
        weights_BSO=w_BSO,
        probe_spare_slots=c.probe_spare_slots,
      )
      stats = {
        "counts_LO": jnp.mean(jax.nn.one_hot(executed_BS, 3), axis=(0, 1)),
        "expected_cost_L": jnp.mean(p_BSO @ costs_O),
        "routing_LBS": executed_BS,
        "dropped_L": jnp.mean((executed_BS != choice_BS).astype(jnp.float32)),
      }
      return (h_BSD + ffn_BSD.astype(h_BSD.dtype), layer_kv), stats

    xs = (block_state, small_state, self.ffn_router[...], routing_LBS, routing_weights_LBSO)
    return transformer.run_stacked(c, body, x_BSD, cache, xs)

  def __call__(
    self,
    tokens_BS,
    positions_BS=None,
    segment_ids_BS=None,
    *,
    routing_LBS=None,
    routing_weights_LBSO=None,
  ):
    """Forward; `routing_LBS` (int [L, B, S] in {0, 1, 2}) fixes every choice (oracle).

    `routing_weights_LBSO` (float [L, B, S, 3]) instead sets the option weights
    w directly and runs every option on every token, ignoring the capacities
    (one-hot weights reproduce `routing_LBS` at capacity 1; the oracle search
    differentiates the loss through them to score every switch at once).

    Returns (logits_BSV float32, aux); aux["routing_LBS"] (int32 [L, B, S]) is
    the option each token ran at each layer (SKIP where the capacity dropped it).
    """
    if routing_LBS is not None and routing_weights_LBSO is not None:
      raise ValueError("pass routing_LBS or routing_weights_LBSO, not both")
    fixed = routing_LBS is not None or routing_weights_LBSO is not None
    c = self.config
    tokens_BS = jnp.asarray(tokens_BS)
    if positions_BS is None:
      positions_BS = transformer.default_positions(tokens_BS, segment_ids_BS)
    x_BSD, _, stats = self._route_layers(
      self.embed_tokens(tokens_BS),
      positions_BS,
      segment_ids_BS,
      None,
      routing_LBS,
      routing_weights_LBSO,
    )
    frac_O = jnp.mean(stats["counts_LO"], axis=0)
    metrics = {
      "duo/frac_skip": frac_O[SKIP],
      "duo/frac_small": frac_O[SMALL],
      "duo/frac_big": frac_O[BIG],
      "duo/realised_cost": frac_O @ jnp.asarray(c.option_costs, jnp.float32),
      "duo/expected_cost": jnp.mean(stats["expected_cost_L"]),
      "duo/frac_dropped": jnp.mean(stats["dropped_L"]),
    }
    losses = {}
    if c.compute_penalty and not fixed:
      losses["duo/compute"] = c.compute_penalty * metrics["duo/expected_cost"]
    return self.logits_from_hidden(x_BSD), {
      "losses": losses,
      "metrics": metrics,
      "routing_LBS": stats["routing_LBS"],
    }

  def run_layers(self, x_BSD, positions_BS, segment_ids_BS, cache):
    """Every layer with the routers' own choices over a KV cache; (x_BSD, cache)."""
    x_BSD, cache, _ = self._route_layers(x_BSD, positions_BS, segment_ids_BS, cache)
    return x_BSD, cache


def per_token_loss(model: DuoTransformer, tokens_BS, routing_LBS) -> jax.Array:
  """Next-token cross-entropy at each position [B, S] (0 at the last position), rows unsegmented."""
  logits_BSV, _ = model(tokens_BS, routing_LBS=routing_LBS)
  logp_BSV = jax.nn.log_softmax(logits_BSV[:, :-1], axis=-1)
  nll_BS = -jnp.take_along_axis(logp_BSV, tokens_BS[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(nll_BS, ((0, 0), (0, 1)))


def next_token_targets(tokens_BS, segment_ids_BS=None):
  """(targets_BS, loss_mask_BS) for next-token prediction within each row (and segment).

  The target at s is tokens[s + 1]; the mask is 0 at the last position, and,
  with segment ids, where the next token belongs to another segment or the
  token is padding (segment id 0).
  """
  tokens_BS = jnp.asarray(tokens_BS)
  targets_BS = jnp.pad(tokens_BS[:, 1:], ((0, 0), (0, 1)))
  mask_BS = jnp.pad(jnp.ones_like(tokens_BS[:, 1:], jnp.float32), ((0, 0), (0, 1)))
  if segment_ids_BS is not None:
    seg = jnp.asarray(segment_ids_BS)
    same_BS = jnp.pad(seg[:, 1:] == seg[:, :-1], ((0, 0), (0, 1)))
    mask_BS = mask_BS * (same_BS & (seg != 0)).astype(jnp.float32)
  return targets_BS, mask_BS


def _loss_sum(model, batch, **routing):
  """Σ masked next-token CE (nats, float32) of a batch under a routing (the training objective)."""
  logits_BSV, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"], **routing)
  logp_BSV = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
  nll_BS = -jnp.take_along_axis(logp_BSV, batch["targets"][..., None], axis=-1)[..., 0]
  return jnp.sum(nll_BS * batch["loss_mask"].astype(jnp.float32)), aux


_ORACLE_FNS = {}


def _oracle_fns(graphdef):
  """Jitted pieces of the oracle search, cached per model structure (one compile per shape)."""
  if graphdef not in _ORACLE_FNS:

    def trained(st, batch):
      return _loss_sum(nnx.merge(graphdef, st), batch)[1]["routing_LBS"]

    def losses(st, batch, routings_KLBS):  # Loss sum of K routings, one forward each.
      one = lambda r: _loss_sum(nnx.merge(graphdef, st), batch, routing_LBS=r)[0]  # noqa
      return jax.lax.map(one, routings_KLBS)

    def scores(st, batch, routing_LBS):  # (loss sum, d loss sum / d option weights [L,B,S,3]).
      f = lambda w: _loss_sum(nnx.merge(graphdef, st), batch, routing_weights_LBSO=w)[0]  # noqa
      return jax.value_and_grad(f)(jax.nn.one_hot(routing_LBS, 3, dtype=jnp.float32))

    _ORACLE_FNS[graphdef] = tuple(jax.jit(f) for f in (trained, losses, scores))
  return _ORACLE_FNS[graphdef]


def _downgrade_to(routing, grad, costs, limit):
  """Cheapen `routing` (in place) until Σ cost <= limit, cheapest first-order loss per cost saved."""
  flat, g = routing.reshape(-1), grad.reshape(-1, 3)
  rows = np.arange(flat.size)
  while costs[flat].sum() > limit:
    cur_g, cur_c = g[rows, flat], costs[flat]
    ratio = np.full((flat.size, 2), np.inf)
    for o in (SKIP, SMALL):
      saved = cur_c - costs[o]
      ratio[:, o] = np.where(saved > 0, (g[:, o] - cur_g) / np.maximum(saved, 1e-12), np.inf)
    option = np.argmin(ratio, -1)
    best = ratio[rows, option]
    order = np.argsort(best, kind="stable")
    order = order[np.isfinite(best[order])]
    saved = np.cumsum(cur_c[order] - costs[option[order]])
    n = min(int(np.searchsorted(saved, costs[flat].sum() - limit)) + 1, order.size)
    flat[order[:n]] = option[order[:n]]
  return routing


def oracle_search(
  model: DuoTransformer,
  tokens_BS,
  budget: float | None = None,
  *,
  targets_BS=None,
  loss_mask_BS=None,
  positions_BS=None,
  segment_ids_BS=None,
  init_routing_LBS=None,
  max_rounds: int = 40,
  fractions: int = 8,
) -> dict:
  """Local search of a routing [L, B, S] that lowers a batch's loss within a compute budget.

  Objective: Σ loss_mask · next-token CE of the batch, computed by the model's
  own forward with the batch's positions and segment ids (exactly the training
  objective; `targets_BS`/`loss_mask_BS` default to `next_token_targets`).
  Cost: the mean over layers and tokens of the option costs (SKIP 0, SMALL
  small_mlp_dim/mlp_dim, BIG 1), i.e. aux "duo/realised_cost"; `budget`
  defaults to the starting routing's cost.

  Start: `init_routing_LBS`, default the model's own (trained) routers' choices
  on this batch. If the start costs more than the budget (e.g. all BIG), it is
  first cheapened in 4 steps by first-order scores (no loss guarantee then).

  Each round: one backward pass gives the first-order change of the loss for
  every (layer, token, option) switch (gradient w.r.t. the option weights,
  through attention and all later layers). The Lagrangian proposal picks per
  entry argmin_o(score_o + λ·cost_o) with the smallest λ >= 0 that meets the
  budget; candidates are the proposal restricted to its best 1, 1/2, 1/4, ...
  of changes (ranked by Lagrangian gain) and to each single layer, each
  cheapened back under the budget; all are evaluated exactly (one forward
  each) and the best is accepted only if it lowers the batch loss. The search
  stops after `max_rounds` or a round without an accepted move. So, from a
  start within the budget, the result's loss is <= the start's and its cost
  is <= the budget, by construction (the oracle sees the targets: an upper
  bound for routers, not a deployable one).

  Returns a dict: "routing_LBS" (np.int32 [L, B, S]), "loss_sum" and
  "loss_sum_init" (float), "cost", "cost_init", "budget", "rounds", "accepted".
  """
  c = model.config
  graphdef, state = nnx.split(model)
  trained_fn, losses_fn, scores_fn = _oracle_fns(graphdef)
  tokens_BS = jnp.asarray(tokens_BS)
  if targets_BS is None or loss_mask_BS is None:
    default_targets, default_mask = next_token_targets(tokens_BS, segment_ids_BS)
    targets_BS = default_targets if targets_BS is None else targets_BS
    loss_mask_BS = default_mask if loss_mask_BS is None else loss_mask_BS
  batch = {
    "tokens": tokens_BS,
    "targets": jnp.asarray(targets_BS),
    "loss_mask": jnp.asarray(loss_mask_BS),
    "positions": None if positions_BS is None else jnp.asarray(positions_BS),
    "segment_ids": None if segment_ids_BS is None else jnp.asarray(segment_ids_BS),
  }
  costs = np.asarray(c.option_costs, np.float64)
  if init_routing_LBS is None:
    routing = np.array(trained_fn(state, batch), np.int32)
  else:
    routing = np.array(init_routing_LBS, np.int32)
  if routing.shape != (c.num_layers,) + tuple(tokens_BS.shape):
    raise ValueError(
      f"init_routing_LBS shape {routing.shape} != (L, B, S) = "
      f"{(c.num_layers,) + tuple(tokens_BS.shape)}"
    )
  n = routing.size
  cost_init = float(costs[routing].mean())
  budget = cost_init if budget is None else float(budget)
  limit = budget * n + 1e-6  # Σ cost allowed (the costs are exact small fractions).
  loss_init = float(losses_fn(state, batch, jnp.asarray(routing)[None])[0])

  for k in range(4):  # Start over the budget: cheapen it in steps, re-scoring between them.
    excess = costs[routing].sum() - limit
    if excess <= 0:
      break
    _, grad = scores_fn(state, batch, jnp.asarray(routing))
    _downgrade_to(routing, np.asarray(grad, np.float64), costs, limit + excess * (3 - k) / (4 - k))
  loss = float(losses_fn(state, batch, jnp.asarray(routing)[None])[0])

  rounds = accepted = 0
  for round_index in range(1, max_rounds + 1):
    rounds = round_index  # reported: how many rounds ran
    _, grad = scores_fn(state, batch, jnp.asarray(routing))
    g = np.asarray(grad, np.float64)  # [L, B, S, 3]
    g_cur = np.take_along_axis(g, routing[..., None], -1)[..., 0]

    def propose(lam, g=g):
      return np.argmin(g + lam * costs, -1).astype(np.int32)

    lo, hi = 0.0, 1.0
    if costs[propose(0.0)].sum() > limit:
      while costs[propose(hi)].sum() > limit and hi < 1e12:
        hi *= 4
      for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if costs[propose(mid)].sum() <= limit else (mid, hi)
      lam = hi
    else:
      lam = 0.0
    proposal = propose(lam)
    gain = (
      np.take_along_axis(g, proposal[..., None], -1)[..., 0]
      + lam * costs[proposal]
      - g_cur
      - lam * costs[routing]
    )
    changed = np.flatnonzero((proposal != routing).reshape(-1))
    if changed.size == 0:
      break
    changed = changed[np.argsort(gain.reshape(-1)[changed], kind="stable")]
    candidates = []
    for size in sorted({max(1, changed.size >> f) for f in range(fractions)}, reverse=True):
      cand = routing.copy().reshape(-1)
      cand[changed[:size]] = proposal.reshape(-1)[changed[:size]]
      candidates.append(cand.reshape(routing.shape))
    for layer in range(c.num_layers):
      cand = routing.copy()
      cand[layer] = proposal[layer]
      if (cand != routing).any():
        candidates.append(cand)
    candidates = [_downgrade_to(cand, g, costs, limit) for cand in candidates]
    candidates += [routing] * (fractions + c.num_layers - len(candidates))  # One compile.
    cand_losses = np.asarray(losses_fn(state, batch, jnp.asarray(np.stack(candidates))))
    best = int(np.argmin(cand_losses))
    if not cand_losses[best] < loss:
      break
    routing, loss = candidates[best], float(cand_losses[best])
    accepted += 1
  return {
    "routing_LBS": routing,
    "loss_sum": loss,
    "loss_sum_init": loss_init,
    "cost": float(costs[routing].mean()),
    "cost_init": cost_init,
    "budget": budget,
    "rounds": rounds,
    "accepted": accepted,
  }


def greedy_oracle_routing(
  model: DuoTransformer, tokens_BS, budget: float | None = None, **kwargs
) -> np.ndarray:
  """`oracle_search(...)["routing_LBS"]`: the searched routing, np.int32 [L, B, S]."""
  return oracle_search(model, tokens_BS, budget, **kwargs)["routing_LBS"]
