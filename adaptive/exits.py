"""Early exit: confidence measures, decaying thresholds, LayerSkip schedules, calibration.

Plain JAX/NumPy (nothing here imports `models`): the pieces an early-exit model
and its evaluation share.

Confidence (CALM, Schuster et al. 2022, arXiv:2207.07061, "confidence measures"):
a token may leave the stack after an exit when its confidence there reaches the
threshold. `softmax_top2_diff` (top-1 minus top-2 probability, CALM's "softmax
response"), `max_probability`, `hidden_cosine` (cosine similarity of the hidden
states before and after the exit's layer, CALM's "hidden-state saturation") and
`classifier_probability` (σ of a learned per-exit classifier's logit).

Thresholds decay with the generated token's index t out of N
(`decayed_threshold`, CALM's decaying threshold).

LayerSkip (Elhoushi et al. 2024, arXiv:2404.16710): layer dropout rising with
depth (`layer_drop_probabilities`) and the normalised early-exit loss scales with
their rotational / gradual curricula (`layerskip_loss_scales`). CALM's
per-layer losses weighted by layer index: `calm_loss_weights`.

Calibration (Learn-then-Test, Angelopoulos et al. 2021, as used by CALM):
`calibrate_threshold` returns the smallest threshold of a grid whose disagreement
with the full model is at most ε with probability at least 1 − δ, by
fixed-sequence testing of binomial-tail p-values, with the bound it certifies.

Shapes: N held-out units, E exits, K candidate thresholds, V vocabulary, D width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

CONFIDENCE_MEASURES = ("softmax_diff", "max_prob", "cosine", "classifier")
CURRICULA = ("none", "rotational", "gradual")
LAYER_DROP_CURRICULA = ("constant", "exponential")


# -- confidence ------------------------------------------------------------------------------


def softmax_top2_diff(logits_V: jax.Array) -> jax.Array:
  """Top-1 minus top-2 softmax probability over the last axis, float32 in [0, 1]."""
  probs_V = jax.nn.softmax(logits_V.astype(jnp.float32), axis=-1)
  top2 = jax.lax.top_k(probs_V, 2)[0]
  return top2[..., 0] - top2[..., 1]


def max_probability(logits_V: jax.Array) -> jax.Array:
  """Largest softmax probability over the last axis, float32 in (0, 1]."""
  return jnp.max(jax.nn.softmax(logits_V.astype(jnp.float32), axis=-1), axis=-1)


def hidden_cosine(previous_D: jax.Array, hidden_D: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Cosine similarity of two hidden states over the last axis, float32 in [-1, 1]."""
  a, b = previous_D.astype(jnp.float32), hidden_D.astype(jnp.float32)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, eps)


def classifier_probability(logit: jax.Array) -> jax.Array:
  """σ(logit) of a learned exit classifier: its estimate that the exit agrees with the top."""
  return jax.nn.sigmoid(logit.astype(jnp.float32))


def confidence(
  measure: str,
  *,
  logits_V: jax.Array | None = None,
  previous_D: jax.Array | None = None,
  hidden_D: jax.Array | None = None,
  classifier_logit: jax.Array | None = None,
) -> jax.Array:
  """The confidence `measure` (one of CONFIDENCE_MEASURES) from the inputs it needs."""
  if measure == "softmax_diff":
    return softmax_top2_diff(logits_V)
  if measure == "max_prob":
    return max_probability(logits_V)
  if measure == "cosine":
    return hidden_cosine(previous_D, hidden_D)
  if measure == "classifier":
    return classifier_probability(classifier_logit)
  raise ValueError(f"measure={measure!r}; allowed: {CONFIDENCE_MEASURES}")


def decayed_threshold(threshold, step, max_steps: int, tau) -> jax.Array:
  """CALM's decaying threshold λ(t) = clip_[0,1](0.9·λ + 0.1·exp(−τ·t/N)).

  Schuster et al. 2022 (CALM), "decaying threshold": early tokens of a
  generation get a stricter threshold (their errors propagate further), later
  ones approach 0.9·λ. `step` t is the index of the generated token, N =
  `max_steps` the most tokens generated, τ = `tau` ≥ 0 the decay temperature.
  (The released t5x code scales the exponential by λ instead:
  λ·(0.9 + 0.1·exp(−τ·t/N)); this follows the paper.)
  """
  decay = jnp.exp(-jnp.asarray(tau, jnp.float32) * jnp.asarray(step, jnp.float32) / max_steps)
  return jnp.clip(0.9 * jnp.asarray(threshold, jnp.float32) + 0.1 * decay, 0.0, 1.0)


# -- LayerSkip and CALM training schedules ---------------------------------------------------


def layer_drop_probabilities(
  num_layers: int,
  p_max: float,
  *,
  step=0,
  total_steps: int = 0,
  curriculum: str = "constant",
) -> jax.Array:
  """LayerSkip layer dropout p_l = S(t)·p_max·(exp(l·ln2/(L−1)) − 1), l = 0..L−1, float32 [L].

  p rises from 0 at the first layer to p_max·S(t) at the last. S(t) = 1
  ("constant", continual pre-training / fine-tuning) or exp(t·ln2/T) − 1
  ("exponential", pre-training from scratch: no dropout at the start, full at
  t = T = `total_steps`; t is clipped to T).
  """
  if num_layers < 2:
    raise ValueError(f"num_layers={num_layers}: layer dropout needs at least 2 layers")
  l = jnp.arange(num_layers, dtype=jnp.float32)
  depth = jnp.exp(l * math.log(2.0) / (num_layers - 1)) - 1.0
  if curriculum == "constant":
    time = jnp.float32(1.0)
  elif curriculum == "exponential":
    t = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
    time = jnp.exp(t * math.log(2.0) / total_steps) - 1.0
  else:
    raise ValueError(f"curriculum={curriculum!r}; allowed: {LAYER_DROP_CURRICULA}")
  return time * p_max * depth


def exit_indices(num_layers: int, exit_layers: Sequence[int]) -> np.ndarray:
  """LayerSkip's 0-based layer index l of each exit and the final layer, int [E + 1].

  `exit_layers` count blocks: the exit after n blocks reads x_n, the output of
  0-based layer l = n − 1.
  """
  return np.asarray([*exit_layers, num_layers]) - 1


def layerskip_loss_scales(
  num_layers: int,
  exit_layers: Sequence[int],
  step=0,
  *,
  e_scale: float = 1.0,
  curriculum: str = "none",
  rotation: int = 2,
  total_steps: int = 0,
) -> jax.Array:
  """LayerSkip's normalised early-exit loss scales ẽ_{t,l}, float32 [E + 1], summing to 1.

  Entries follow `exit_layers` (blocks before each early exit), then the final
  layer. With l the exit's 0-based layer index (`exit_indices`):

    e_l = e_scale·Σ_{i=0..l} i              for l < L − 1
    e_{L−1} = L − 1 + e_scale·Σ_{i=0..L−2} i
    ẽ_{t,l} = C(t, l)·e_l / Σ_i C(t, i)·e_i

  Curriculum C (the final layer is always on):
    "none": every exit on.
    "rotational": early exit j (0-based among the early exits) is on at step t
      iff (j − t) mod R == 0, R = `rotation` (every R-th exit, shifting by one
      each step; with an exit after every layer this is the paper's C_rot,R).
    "gradual": on iff l ≥ L − 1 − ⌊2L·t/T⌋, T = `total_steps`: one more exit
      from the top every T/(2L) steps, all on from t = T/2 (C_grad).
  """
  l = jnp.asarray(exit_indices(num_layers, exit_layers), jnp.float32)
  last = num_layers - 1
  e = jnp.where(l < last, e_scale * l * (l + 1) / 2, last + e_scale * (last - 1) * last / 2)
  num_early = len(exit_layers)
  t = jnp.asarray(step, jnp.int32)
  if curriculum == "none":
    on = jnp.ones(num_early, bool)
  elif curriculum == "rotational":
    on = (jnp.arange(num_early, dtype=jnp.int32) - t) % rotation == 0
  elif curriculum == "gradual":
    reached = jnp.floor(2.0 * num_layers * t.astype(jnp.float32) / total_steps)
    on = l[:num_early] >= last - reached
  else:
    raise ValueError(f"curriculum={curriculum!r}; allowed: {CURRICULA}")
  on = jnp.concatenate([on, jnp.ones(1, bool)])
  scaled = jnp.where(on, e, 0.0)
  return scaled / jnp.sum(scaled)


def calm_loss_weights(num_layers: int, exit_layers: Sequence[int]) -> np.ndarray:
  """CALM's per-layer loss weights ω_n = n / Σ n over the exits and the final layer, [E + 1].

  n counts blocks (the exit after n blocks; the final layer is n = L), so
  deeper exits weigh more and the weights sum to 1.
  """
  n = np.asarray([*exit_layers, num_layers], np.float64)
  return n / n.sum()


# -- which exit a token takes, and how often it disagrees --------------------------------------


def first_exit(confidence_NE: np.ndarray, threshold) -> np.ndarray:
  """Index of the first early exit whose confidence reaches `threshold`, else E (the top).

  confidence_NE [N, E] per early exit; `threshold` a scalar or [N] (e.g. decayed
  per position). Returns int [N] in [0, E].
  """
  confidence_NE = np.asarray(confidence_NE)
  reached_NE = confidence_NE >= np.reshape(np.asarray(threshold), (-1, 1))
  e = confidence_NE.shape[1]
  return np.where(reached_NE.any(axis=1), reached_NE.argmax(axis=1), e)


def disagreement_at_thresholds(
  confidence_NE: np.ndarray, agrees_NE: np.ndarray, thresholds_K: Sequence[float]
) -> np.ndarray:
  """Whether each unit's early-exit prediction differs from the full model's, bool [N, K].

  agrees_NE[n, e]: exit e predicts what the full model predicts for unit n (the
  top layer always agrees). Unit n at threshold k takes `first_exit`.
  """
  agrees_NE = np.asarray(agrees_NE, bool)
  n, e = agrees_NE.shape
  agrees_NE1 = np.concatenate([agrees_NE, np.ones((n, 1), bool)], axis=1)
  out = np.empty((n, len(thresholds_K)), bool)
  for k, threshold in enumerate(thresholds_K):
    taken_N = first_exit(confidence_NE, threshold)
    out[:, k] = ~agrees_NE1[np.arange(n), taken_N]
  return out


# -- calibration -----------------------------------------------------------------------------


def binomial_cdf(k: int, n: int, p: float) -> float:
  """P(Binomial(n, p) ≤ k) = Σ_{i=0..k} C(n, i)·p^i·(1 − p)^(n−i), summed in log space."""
  if k < 0:
    return 0.0
  if k >= n or p <= 0.0:
    return 1.0
  if p >= 1.0:
    return 0.0
  log_p, log_q = math.log(p), math.log1p(-p)
  terms = [
    math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
    for i in range(k + 1)
  ]
  top = max(terms)
  return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in terms))


def binomial_upper_bound(k: int, n: int, delta: float) -> float:
  """Exact (Clopper–Pearson) one-sided 1 − δ upper confidence bound on a rate from k of n.

  The largest p with P(Binomial(n, p) ≤ k) ≥ δ, by bisection (to 1e-12); a
  rate is certified ≤ ε at risk δ exactly when this bound is ≤ ε.
  """
  if k >= n:
    return 1.0
  lo, hi = 0.0, 1.0
  for _ in range(64):
    mid = (lo + hi) / 2
    if binomial_cdf(k, n, mid) >= delta:
      lo = mid
    else:
      hi = mid
    if hi - lo < 1e-12:
      break
  return lo


@dataclasses.dataclass(frozen=True)
class Calibration:
  """What `calibrate_threshold` certifies.

  Attributes:
    threshold: the smallest certified threshold (+inf when none is: never exit).
    p_value: P(Binomial(n, ε) ≤ k) at that threshold (≤ δ), k the disagreements
      among n units; 1.0 when nothing was certified.
    risk_bound: the 1 − δ upper confidence bound on its disagreement rate
      (`binomial_upper_bound`, ≤ ε); 1.0 when nothing was certified.
    empirical_risk: k / n at that threshold (0 when nothing was certified).
    num_units: n.
    tolerance: ε.
    risk: δ.
    p_values: the p-value of every threshold tested, in testing order
      (descending thresholds; testing stops at the first one above δ).
  """

  threshold: float
  p_value: float
  risk_bound: float
  empirical_risk: float
  num_units: int
  tolerance: float
  risk: float
  p_values: tuple[tuple[float, float], ...]


def calibrate_threshold(
  disagree_NK: np.ndarray, thresholds_K: Sequence[float], *, tolerance: float, risk: float
) -> Calibration:
  """Learn-then-Test: the smallest threshold whose disagreement rate is ≤ ε w.p. ≥ 1 − δ.

  disagree_NK[n, k]: held-out unit n disagrees with the full model when exits
  use threshold k (`disagreement_at_thresholds`). For each threshold λ the null
  hypothesis "disagreement rate R(λ) > ε" has the binomial-tail p-value
  P(Binomial(n, ε) ≤ k_λ) (under the null, fewer disagreements than observed are
  at most that likely). Fixed-sequence testing walks the thresholds from the
  largest (safest) down, rejecting while p ≤ δ, and stops at the first failure;
  this controls the family-wise error at δ with no monotonicity assumption, so
  the last rejected λ has R(λ) ≤ ε with probability ≥ 1 − δ over the draw of
  the held-out set.

  The guarantee needs the n units to be i.i.d. draws from the deployment
  distribution: pass one indicator per independent unit (e.g. a sequence-level
  "any token disagrees", or one token sampled per held-out sequence), not every
  token of the same few sequences.
  """
  disagree_NK = np.asarray(disagree_NK, bool)
  n, k = disagree_NK.shape
  if k != len(thresholds_K):
    raise ValueError(f"disagree_NK has {k} columns for {len(thresholds_K)} thresholds")
  if n < 1:
    raise ValueError("disagree_NK: needs at least one held-out unit")
  if not 0 < tolerance < 1:
    raise ValueError(f"tolerance={tolerance!r}: must be in (0, 1)")
  if not 0 < risk < 1:
    raise ValueError(f"risk={risk!r}: must be in (0, 1)")
  counts_K = disagree_NK.sum(axis=0)
  order = np.argsort(-np.asarray(thresholds_K, np.float64), kind="stable")
  best = None
  tested = []
  for j in order:
    p_value = binomial_cdf(int(counts_K[j]), n, tolerance)
    tested.append((float(thresholds_K[j]), p_value))
    if p_value > risk:
      break
    best = (j, p_value)
  if best is None:
    return Calibration(math.inf, 1.0, 1.0, 0.0, n, tolerance, risk, tuple(tested))
  j, p_value = best
  return Calibration(
    threshold=float(thresholds_K[j]),
    p_value=p_value,
    risk_bound=binomial_upper_bound(int(counts_K[j]), n, risk),
    empirical_risk=float(counts_K[j]) / n,
    num_units=n,
    tolerance=tolerance,
    risk=risk,
    p_values=tuple(tested),
  )
