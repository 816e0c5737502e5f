"""Compute accounting: FLOPs a model executes, from its config and routing statistics.

Counts multiply-adds as 2 FLOPs. Conventions (DESIGN.md, "Compute accounting"):

  forward = 2 · tokens · (matmul parameters per token)          linear layers
          + 2 · B · L² · H · Dh per attention layer              causal QKᵀ and AV
          + 2 · tokens · D · V                                   LM head
  training = 3 × forward                                         backward ≈ 2 × forward

Embedding lookups, norms, activations and softmax are not counted. Causal
attention counts half of the L×L score matrix. With a sliding window W < L the
visible keys per query are about W, so the attention term uses L·W instead of
L²/2 (times two). Any object with the attributes of `models.transformer.Config`
works: this module never imports `models`.

Adaptive variants (`executed_train_flops` dispatches on the config's fields):

  Mixture-of-Depths (`routed_every`, `capacity`): a routed block runs its linear
    layers on k = round(capacity·S) tokens per row (× k/S) and attention over k
    tokens (× (k/S)²), plus the router (D per token) and the predictor MLP
    (D·H + H per token) on all S tokens.
  Duo (`small_mlp_dim`): attention in every layer; the FFN costs the big MLP on
    round(big_capacity·S) slots per row and the small MLP on
    round(small_capacity·S) (the static dispatch buffers, whatever the routing),
    plus a D×3 router per token. `duo_routed_forward_flops` counts instead the
    options the tokens took ("duo/frac_small", "duo/frac_big" from aux).
  FiRST (`skip_penalty`): a skipped (sequence, layer) executes nothing; the
    realised skip fraction is "first/skip_fraction" (0 while training with
    relaxed gates, which execute every layer). Routers: pooling + D per layer
    and sequence.
  Early exit (`exit_layers`), training: every layer executes (LayerSkip's
    dropped layers are masked, not removed), plus the LM head at each early
    exit whose loss is computed ("early_exit/exit_heads"; the rotational
    curriculum skips the others) and the exit classifiers (D per exit and
    token). Decoding (`early_exit_decode_step_flops`): a row runs its blocks up
    to its exit in full; every later block still projects its K and V from the
    frozen state (propagated K/V); each exit a row reaches computes its
    confidence (for the softmax measures, the LM head on the exit state).

The numbers count executed work: what a kernel that skips the unselected
tokens/layers does. XLA's cost analysis of a masked program counts the full
L×L score matrix (masked entries included), i.e. twice the causal term here.
"""

from __future__ import annotations

from typing import Any

from adaptive import routing

TRAIN_MULTIPLIER = 3.0


def attention_projection_params(config: Any) -> int:
  """Parameters of q, k, v and o projections of one layer (biases ignored)."""
  q_and_o = 2 * config.dim * config.num_heads * config.head_dim
  k_and_v = 2 * config.dim * config.num_kv_heads * config.head_dim
  return q_and_o + k_and_v


def mlp_params(config: Any, mlp_dim: int | None = None) -> int:
  """Parameters of one SwiGLU MLP (gate, up, down)."""
  return 3 * config.dim * (config.mlp_dim if mlp_dim is None else mlp_dim)


def attention_score_flops(config: Any, batch: int, seq_len: int) -> float:
  """FLOPs of QKᵀ and AV of one causal attention layer over `seq_len` tokens."""
  # Full (non-causal) attention: 2 matmuls × 2 FLOPs × B·L·L·H·Dh; causal keeps half.
  window = getattr(config, "sliding_window", None)
  if window is None or window >= seq_len:
    visible_pairs = seq_len * seq_len / 2
  else:
    visible_pairs = seq_len * window - window * window / 2
  return 4.0 * batch * visible_pairs * config.num_heads * config.head_dim


def lm_head_flops(config: Any, tokens: int) -> float:
  return 2.0 * tokens * config.dim * config.vocab_size


def dense_forward_flops(config: Any, batch: int, seq_len: int) -> float:
  """Forward FLOPs of the dense transformer on a [batch, seq_len] batch."""
  tokens = batch * seq_len
  per_layer = 2.0 * tokens * (
    attention_projection_params(config) + mlp_params(config)
  ) + attention_score_flops(config, batch, seq_len)
  return config.num_layers * per_layer + lm_head_flops(config, tokens)


def dense_train_flops(config: Any, batch: int, seq_len: int) -> float:
  """Training (forward + backward) FLOPs of one dense step on [batch, seq_len]."""
  return TRAIN_MULTIPLIER * dense_forward_flops(config, batch, seq_len)


def dense_layer_flops(config: Any, batch: int, seq_len: int) -> float:
  """Forward FLOPs of one dense block (projections, MLP, causal attention)."""
  tokens = batch * seq_len
  return 2.0 * tokens * (
    attention_projection_params(config) + mlp_params(config)
  ) + attention_score_flops(config, batch, seq_len)


def _metric(metrics: dict[str, float] | None, name: str, default: float) -> float:
  if metrics is None or name not in metrics:
    return default
  return float(metrics[name])


def _num_routed_layers(config: Any) -> int:
  return len(range(config.routed_offset, config.num_layers, config.routed_every))


def mod_routed_tokens(config: Any, seq_len: int) -> int:
  """k: tokens per row a MoD routed block processes (round(capacity·S), in [1, S])."""
  return routing.capacity_k(config.capacity, seq_len)


def mod_forward_flops(
  config: Any, batch: int, seq_len: int, metrics: dict[str, float] | None = None
) -> float:
  """Forward FLOPs of a Mixture-of-Depths model; k/S from "mod/routed_fraction" if given."""
  tokens = batch * seq_len
  k = _metric(metrics, "mod/routed_fraction", mod_routed_tokens(config, seq_len) / seq_len)
  k = k * seq_len
  routed = _num_routed_layers(config)
  routed_layer = 2.0 * batch * k * (
    attention_projection_params(config) + mlp_params(config)
  ) + attention_score_flops(config, batch, k)
  hidden = getattr(config, "predictor_hidden", 0)
  router_and_predictor = 2.0 * tokens * (config.dim + config.dim * hidden + hidden)
  return (
    (config.num_layers - routed) * dense_layer_flops(config, batch, seq_len)
    + routed * (routed_layer + router_and_predictor)
    + lm_head_flops(config, tokens)
  )


def duo_forward_flops(
  config: Any, batch: int, seq_len: int, metrics: dict[str, float] | None = None
) -> float:
  """Forward FLOPs a Duo model executes: each MLP on its capacity's slots (metrics unused).

  The small and big MLPs run on round(capacity·S) slots per row whatever the
  routing is (static shapes; `models.duo` dispatch), so this depends on the
  config alone. `duo_routed_forward_flops` counts the options the tokens took.
  """
  del metrics
  small = routing.capacity_k(config.small_capacity, seq_len) / seq_len
  big = routing.capacity_k(config.big_capacity, seq_len) / seq_len
  return duo_routed_forward_flops(
    config, batch, seq_len, {"duo/frac_small": small, "duo/frac_big": big}
  )


def duo_routed_forward_flops(
  config: Any, batch: int, seq_len: int, metrics: dict[str, float] | None = None
) -> float:
  """Forward FLOPs of the options the tokens took ("duo/frac_small", "duo/frac_big").

  What a dispatcher with exactly the needed slots would spend; the routing
  quality measure of the Duo study (default: all big, the dense FFN).
  """
  tokens = batch * seq_len
  frac_small = _metric(metrics, "duo/frac_small", 0.0)
  frac_big = _metric(metrics, "duo/frac_big", 1.0)
  ffn = (
    2.0
    * tokens
    * (frac_small * mlp_params(config, config.small_mlp_dim) + frac_big * mlp_params(config))
  )
  router = 2.0 * tokens * config.dim * 3
  attn = 2.0 * tokens * attention_projection_params(config) + attention_score_flops(
    config, batch, seq_len
  )
  return config.num_layers * (attn + ffn + router) + lm_head_flops(config, tokens)


def first_forward_flops(
  config: Any, batch: int, seq_len: int, metrics: dict[str, float] | None = None
) -> float:
  """Forward FLOPs of a FiRST model with the realised skip fraction (default 0)."""
  tokens = batch * seq_len
  executed = 1.0 - _metric(metrics, "first/skip_fraction", 0.0)
  router = tokens * config.dim + 2.0 * batch * config.dim  # Pooling + linear, per layer.
  return config.num_layers * (
    executed * dense_layer_flops(config, batch, seq_len) + router
  ) + lm_head_flops(config, tokens)


def _early_exits(config: Any) -> tuple[int, ...]:
  return tuple(config.exit_layers) or tuple(range(1, config.num_layers))


def kv_projection_flops(config: Any, tokens: int) -> float:
  """FLOPs of one layer's K and V projections for `tokens` tokens."""
  return 2.0 * tokens * 2 * config.dim * config.num_kv_heads * config.head_dim


def decode_attention_flops(config: Any, batch: int, context_len: int) -> float:
  """QKᵀ and AV of one layer for one query per row over `context_len` keys (itself included)."""
  window = getattr(config, "sliding_window", None)
  keys = context_len if window is None else min(context_len, window)
  return 4.0 * batch * keys * config.num_heads * config.head_dim


def exit_check_flops(config: Any, tokens: int, measure: str) -> float:
  """FLOPs of one exit's confidence for `tokens` tokens (`adaptive.exits` measures).

  "softmax_diff" / "max_prob": the LM head on the exit state; "classifier": a
  D-vector dot product; "cosine": a dot product and two squared norms.
  """
  if measure in ("softmax_diff", "max_prob"):
    return lm_head_flops(config, tokens)
  if measure == "classifier":
    return 2.0 * tokens * config.dim
  if measure == "cosine":
    return 6.0 * tokens * config.dim
  raise ValueError(f"measure={measure!r}; allowed: softmax_diff, max_prob, classifier, cosine")


def early_exit_forward_flops(
  config: Any, batch: int, seq_len: int, metrics: dict[str, float] | None = None
) -> float:
  """Training forward FLOPs of an early-exit model.

  The dense forward (dropped layers execute, masked), the LM head at the
  "early_exit/exit_heads" early exits whose loss ran (default: every early
  exit when any exit loss or classifier is on) and the exit classifiers.
  """
  tokens = batch * seq_len
  num_exits = len(_early_exits(config))
  trains_exits = getattr(config, "exit_loss", "none") != "none"
  classifier = bool(getattr(config, "exit_classifier", False))
  heads = _metric(metrics, "early_exit/exit_heads", num_exits if trains_exits or classifier else 0)
  return (
    dense_forward_flops(config, batch, seq_len)
    + heads * lm_head_flops(config, tokens)
    + classifier * num_exits * 2.0 * tokens * config.dim
  )


def early_exit_decode_step_flops(
  config: Any, batch: int, context_len: int, exit_layers, measure: str | None = "softmax_diff"
) -> float:
  """FLOPs of one cached decode step with exits (`models.early_exit.forward_cached_exits`).

  One token per row, attending over `context_len` keys (itself included).
  `exit_layers` holds each row's exit (blocks it ran in full, 1..L). The
  batched step has static shapes, so a block runs attention and MLP for every
  row while any row is still inside (up to the deepest exit), and only the K/V
  projections after; an exit's confidence (`measure`; None for a fixed exit,
  which checks nothing) is computed for every row while any row reaches it.
  The LM head runs once per row at the end. For what a per-token kernel would
  execute, sum this over the rows with batch=1.
  """
  exit_layers = [
    int(e) for e in (exit_layers if hasattr(exit_layers, "__iter__") else [exit_layers])
  ]
  if not exit_layers or min(exit_layers) < 1 or max(exit_layers) > config.num_layers:
    raise ValueError(
      f"exit_layers={exit_layers!r}: need one per row, each in [1, {config.num_layers}]"
    )
  deepest = max(exit_layers)
  full_layer = 2.0 * batch * (
    attention_projection_params(config) + mlp_params(config)
  ) + decode_attention_flops(config, batch, context_len)
  propagated = (config.num_layers - deepest) * kv_projection_flops(config, batch)
  checks = 0.0
  if measure is not None:
    reached = sum(1 for e in _early_exits(config) if e <= deepest)
    checks = reached * exit_check_flops(config, batch, measure)
  return deepest * full_layer + propagated + checks + lm_head_flops(config, batch)


def m2r2_adapter_flops(config: Any, tokens: int) -> float:
  """The accelerated stream's adapters: U_l V_lᵀ Δ_l in every block, 2 matmuls of D x r per token."""
  return config.num_layers * 4.0 * tokens * config.dim * config.adapter_rank


def executed_forward_flops(
  config: Any, batch: int, seq_len: int, metrics: dict[str, float] | None = None
) -> float:
  """Forward FLOPs executed on [batch, seq_len], dispatching on the config's fields."""
  if hasattr(config, "adapter_rank"):
    adapters = m2r2_adapter_flops(config, batch * seq_len)
    return early_exit_forward_flops(config, batch, seq_len, metrics) + adapters
  if hasattr(config, "exit_layers"):
    return early_exit_forward_flops(config, batch, seq_len, metrics)
  if hasattr(config, "routed_every") and hasattr(config, "capacity"):
    return mod_forward_flops(config, batch, seq_len, metrics)
  if hasattr(config, "small_mlp_dim"):
    return duo_forward_flops(config, batch, seq_len, metrics)
  if hasattr(config, "skip_penalty"):
    return first_forward_flops(config, batch, seq_len, metrics)
  return dense_forward_flops(config, batch, seq_len)


def executed_train_flops(
  config: Any, batch: int, seq_len: int, metrics: dict[str, float] | None = None
) -> float:
  """Training FLOPs the model actually executes on one [batch, seq_len] step.

  `metrics` are the scalar routing statistics the model reported in
  `aux["metrics"]` (realised skip fractions and the like); adaptive variants
  use them, the dense model ignores them (it executes every layer on every
  token).
  """
  return TRAIN_MULTIPLIER * executed_forward_flops(config, batch, seq_len, metrics)


def self_speculative_pass_flops(
  config: Any, batch: int, context_len: int, *, draft_layers: int, draft_tokens: int
) -> float:
  """FLOPs of one draft-and-verify iteration of self-speculative decoding (`models.speculative`).

  E = draft_layers, k = draft_tokens, per row: k draft steps through blocks
  [0, E) and the LM head (rejected drafts included), the k-th draft's own
  position through blocks [0, E) (no head), then one verify pass through
  blocks [E, L) and the head over the k + 1 positions. Each query attends over
  `context_len` keys (the filled length; XLA's count of a fixed cache is its
  capacity). Every row of the batch runs the whole pass (static shapes).
  """
  e, k, num_layers = draft_layers, draft_tokens, config.num_layers
  per_token_layer = 2.0 * (
    attention_projection_params(config) + mlp_params(config)
  ) + decode_attention_flops(config, 1, context_len)
  drafts = batch * (k + 1) * e * per_token_layer + k * lm_head_flops(config, batch)
  verify = batch * (k + 1) * (num_layers - e) * per_token_layer
  return drafts + verify + lm_head_flops(config, batch * (k + 1))


def self_speculative_decode_flops(
  config: Any,
  verify_passes: int,
  context_len: float,
  *,
  draft_layers: int,
  draft_tokens: int,
  batch: int = 1,
) -> float:
  """Executed FLOPs of the decode loop of a self-speculative `generate` (prefill excluded).

  `verify_passes`: `SpeculativeStats.verify_passes` (loop iterations, every
  row computing) with the call's batch, or a row's `verify_passes_B` with
  batch=1 for what that row needed; `context_len`: the mean keys per query.
  Plain decoding of the same tokens costs one dense step (L blocks + head)
  per token: speculation executes more FLOPs, it saves sequential steps.
  """
  return verify_passes * self_speculative_pass_flops(
    config, batch, context_len, draft_layers=draft_layers, draft_tokens=draft_tokens
  )
