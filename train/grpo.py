"""GRPO: group advantages, the clipped policy-gradient loss and its aggregation (pure functions).

    cfg = grpo.GRPOConfig.from_config(config.grpo)        # validates; ValueError names the field
    advantages_NG = grpo.group_advantages(rewards_NG, cfg.advantage, cfg.std_eps)
    setup = trainer.setup(run, config, mesh, objective=grpo.objective(cfg))
    batch["old_logprobs"] = setup.logprobs(state, batch)  # before the first update of the RL step
    for mini in minibatches(batch):                       # several optimizer steps per RL step
      state, metrics = setup.train_step(state, mini)

Per token t of a row with advantage A (the formulas of DESIGN.md, "Markovian thinking"):

    r      = exp(clamp(logp - logp_old, -20, 20))
    pg     = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    pg     = min(pg, -dual_clip A)                 where A < 0 (dual clip; dual_clip = 0: off)
    w      = min(exp(logp_old - logp_rollout), importance_cap)   (importance_cap = 0: w = 1)
    loss_t = w pg + kl_coef k3(ref) - entropy_coef H_t,
    k3(ref) = exp(d) - d - 1,  d = clamp(logp_ref - logp, -20, 20)

`logp_old` and `logp_rollout` are data (no gradient); only `logp` (and the entropy H, from the
same logits) carry gradient. The batch (static shapes; one sequence per row, padding rows
have loss_mask 0 everywhere):

    tokens, targets, positions, segment_ids   int32 [B, S]
    loss_mask          float32 [B, S]   1 on response (generated) tokens
    advantages         float32 [B]      the row's trace advantage
    rollout_logprobs   float32 [B, S]   log p(target) from the sampler
    old_logprobs       float32 [B, S]   log p(target) under the parameters before this RL step
    trace_lengths      float32 [B]      generated tokens of the row's whole trace (delethink)
    ref_logprobs       float32 [B, S]   log p(target) under the frozen reference (kl_coef > 0)

Aggregation over the valid rows (rows with a loss token), with n_b the row's loss tokens:

    token-mean                    sum_bt loss / sum_b n_b
    sequence-mean-token-mean      mean_b (sum_t loss / n_b)
    sequence-mean-token-sum-norm  mean_b (sum_t loss / norm_length)   (Dr. GRPO; 0 = S)
    delethink                     mean_b (sum_t loss / trace_lengths_b)  (every chunk a row)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import losses

ESTIMATORS = ("grpo", "drgrpo", "rloo")
AGGREGATIONS = (
  "token-mean",
  "sequence-mean-token-mean",
  "sequence-mean-token-sum-norm",
  "delethink",
)
LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------- config


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """The GRPO loss settings; defaults are the Delethink paper's. Validated on construction."""

  advantage: str = "grpo"  # grpo: (R - mean) / (std + eps); drgrpo: R - mean; rloo
  group_size: int = 8  # samples per problem (G)
  clip_low: float = 0.2  # r is clipped below at 1 - clip_low
  clip_high: float = 0.26  # r is clipped above at 1 + clip_high
  dual_clip: float = 3.0  # c > 1: the loss of an A < 0 token is at most -c A; 0 = off
  importance_cap: float = 2.0  # truncated importance weight cap (>= 1, inf = untruncated); 0 = off
  kl_coef: float = 0.0  # weight of the k3 KL to a frozen reference (needs ref_logprobs)
  entropy_coef: float = 0.0  # weight of the entropy bonus (subtracted from the loss)
  loss_agg: str = "delethink"  # one of AGGREGATIONS
  norm_length: int = 0  # sequence-mean-token-sum-norm's divisor in tokens; 0 = the row length S
  std_eps: float = 1e-6  # added to the group std (grpo)
  minibatches: int = 2  # optimizer steps per RL step (the caller's loop)

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first bad field (`grpo.clip_low=-0.1: ...`)."""

    def fail(name, why):
      raise ValueError(f"grpo.{name}={getattr(self, name)!r}: {why}")

    if self.advantage not in ESTIMATORS:
      fail("advantage", f"allowed: {list(ESTIMATORS)}")
    minimum_group = 1 if self.advantage == "drgrpo" else 2
    if not _is_int(self.group_size) or self.group_size < minimum_group:
      fail(
        "group_size",
        f"must be an integer >= {minimum_group} for advantage={self.advantage!r}",
      )
    if not _is_number(self.clip_low) or not 0 <= self.clip_low < 1:
      fail("clip_low", "must be in [0, 1)")
    if not _is_number(self.clip_high) or not 0 <= self.clip_high < math.inf:
      fail("clip_high", "must be a finite number >= 0")
    if not _is_number(self.dual_clip) or not (self.dual_clip == 0 or 1 < self.dual_clip < math.inf):
      fail("dual_clip", "must be 0 (off) or a finite number > 1")
    if not _is_number(self.importance_cap) or not (
      self.importance_cap == 0 or self.importance_cap >= 1
    ):
      fail("importance_cap", "must be 0 (off) or a number >= 1 (inf = untruncated)")
    for name in ("kl_coef", "entropy_coef"):
      value = getattr(self, name)
      if not _is_number(value) or not 0 <= value < math.inf:
        fail(name, "must be a finite number >= 0")
    if self.loss_agg not in AGGREGATIONS:
      fail("loss_agg", f"allowed: {list(AGGREGATIONS)}")
    if not _is_int(self.norm_length) or self.norm_length < 0:
      fail("norm_length", "must be an integer >= 0 (0 = the row length)")
    if not _is_number(self.std_eps) or not 0 < self.std_eps < math.inf:
      fail("std_eps", "must be a finite number > 0")
    if not _is_int(self.minibatches) or self.minibatches < 1:
      fail("minibatches", "must be a positive integer")

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> GRPOConfig:
    """From a `grpo` config section (ConfigDict or dict); missing fields take the defaults."""
    values = dict(section)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in values:
      if key not in fields:
        raise ValueError(f"grpo.{key}: no such field; grpo has fields {fields}")
    return cls(**values)


# ----------------------------------------------------------------------------- advantages


def group_advantages(rewards_NG, estimator: str, std_eps: float = 1e-6) -> jax.Array:
  """Advantages [N, G] float32 of N groups of G rewards (the samples of one problem).

  grpo:   (R - mean) / (std + std_eps), std with ddof 1 (needs G >= 2)
  drgrpo: R - mean
  rloo:   R - (mean of the group's other G - 1 rewards) = G / (G - 1) (R - mean) (needs G >= 2)
  """
  rewards_NG = jnp.asarray(rewards_NG, jnp.float32)
  if rewards_NG.ndim != 2:
    raise ValueError(f"rewards: must be [groups, group_size], got shape {rewards_NG.shape}")
  g = rewards_NG.shape[1]
  if estimator not in ESTIMATORS:
    raise ValueError(f"advantage={estimator!r}: allowed: {list(ESTIMATORS)}")
  if estimator != "drgrpo" and g < 2:
    raise ValueError(f"rewards: advantage={estimator!r} needs groups of >= 2 samples, got {g}")
  centred_NG = rewards_NG - jnp.mean(rewards_NG, axis=1, keepdims=True)
  if estimator == "drgrpo":
    return centred_NG
  if estimator == "rloo":
    return centred_NG * (g / (g - 1))
  std_N1 = jnp.std(rewards_NG, axis=1, keepdims=True, ddof=1)
  return centred_NG / (std_N1 + std_eps)


# ----------------------------------------------------------------------------- loss


def batch_dtypes(cfg: GRPOConfig) -> dict[str, type]:
  """The GRPO batch's fields and dtypes (see the module docstring for shapes)."""
  dtypes = dict(losses.LM_DTYPES)
  dtypes.update(
    advantages=np.float32,
    rollout_logprobs=np.float32,
    old_logprobs=np.float32,
    trace_lengths=np.float32,
  )
  if cfg.kl_coef > 0:
    dtypes["ref_logprobs"] = np.float32
  return dtypes


def batch_totals(batch) -> dict[str, jax.Array]:
  """Normalisers over the whole optimizer batch: loss tokens and valid rows (float32 scalars)."""
  mask_BS = batch["loss_mask"].astype(jnp.float32)
  return {
    "loss_tokens": jnp.sum(mask_BS),
    "rows": jnp.sum((jnp.sum(mask_BS, axis=1) > 0).astype(jnp.float32)),
  }


def token_terms(logp_BS, batch, cfg: GRPOConfig) -> dict[str, jax.Array]:
  """Per-token pieces [B, S] float32: `policy` (w pg), `ratio`, `log_ratio`, `weight` and flags.

  Flags (float 0/1): `clip_low` (A < 0 and r below 1 - clip_low: the clipped branch wins),
  `clip_high` (A > 0 and r above 1 + clip_high), `dual_clip` (A < 0 and -c A is the minimum),
  `capped` (the importance weight hit its cap).
  """
  advantage_B1 = batch["advantages"].astype(jnp.float32)[:, None]
  old_BS = batch["old_logprobs"].astype(jnp.float32)
  log_ratio_BS = jnp.clip(logp_BS - old_BS, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  ratio_BS = jnp.exp(log_ratio_BS)
  unclipped_BS = -advantage_B1 * ratio_BS
  clipped_BS = -advantage_B1 * jnp.clip(ratio_BS, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
  pg_BS = jnp.maximum(unclipped_BS, clipped_BS)
  negative_B1 = advantage_B1 < 0
  clip_wins_BS = clipped_BS > unclipped_BS
  dual_BS = jnp.zeros_like(pg_BS, bool)
  if cfg.dual_clip:
    bound_B1 = -cfg.dual_clip * advantage_B1
    dual_BS = negative_B1 & (pg_BS > bound_B1)
    pg_BS = jnp.where(negative_B1, jnp.minimum(pg_BS, bound_B1), pg_BS)
  weight_BS = jnp.ones_like(pg_BS)
  capped_BS = jnp.zeros_like(pg_BS, bool)
  if cfg.importance_cap:
    raw_BS = jnp.exp(old_BS - batch["rollout_logprobs"].astype(jnp.float32))
    capped_BS = raw_BS > cfg.importance_cap
    weight_BS = jnp.minimum(raw_BS, cfg.importance_cap)
  return {
    "policy": weight_BS * pg_BS,
    "ratio": ratio_BS,
    "log_ratio": log_ratio_BS,
    "weight": weight_BS,
    "clip_low": (clip_wins_BS & negative_B1).astype(jnp.float32),
    "clip_high": (clip_wins_BS & (advantage_B1 > 0)).astype(jnp.float32),
    "dual_clip": dual_BS.astype(jnp.float32),
    "capped": capped_BS.astype(jnp.float32),
  }


def k3_kl_BS(logp_BS, ref_logp_BS) -> jax.Array:
  """k3 estimate of KL(pi || ref) per token, exp(d) - d - 1 with d = clamp(ref - logp), [B, S]."""
  d_BS = jnp.clip(ref_logp_BS - logp_BS, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  return jnp.exp(d_BS) - d_BS - 1.0


def aggregate(values_BS, batch, totals, cfg: GRPOConfig) -> jax.Array:
  """This (micro-)batch's share of the `cfg.loss_agg` aggregate of per-token `values_BS`."""
  mask_BS = batch["loss_mask"].astype(jnp.float32)
  masked_BS = values_BS * mask_BS
  if cfg.loss_agg == "token-mean":
    return jnp.sum(masked_BS) / jnp.maximum(totals["loss_tokens"], 1.0)
  if cfg.loss_agg == "sequence-mean-token-mean":
    divisor_B = jnp.maximum(jnp.sum(mask_BS, axis=1), 1.0)
  elif cfg.loss_agg == "sequence-mean-token-sum-norm":
    divisor_B = jnp.full(mask_BS.shape[:1], float(cfg.norm_length or mask_BS.shape[1]))
  else:  # delethink
    divisor_B = jnp.maximum(batch["trace_lengths"].astype(jnp.float32), 1.0)
  row_B = jnp.sum(masked_BS, axis=1) / divisor_B
  return jnp.sum(row_B) / jnp.maximum(totals["rows"], 1.0)


def loss_from_logprobs(logp_BS, batch, cfg: GRPOConfig, totals=None, entropy_BS=None):
  """(loss, metrics) of per-token log p(target) [B, S] (and entropy [B, S] in nats, if given).

  `totals` default to the batch's own (one micro-batch). Metrics are shares like the loss
  (summed over micro-batches they are the batch's): `grpo/policy_loss` (aggregated like the
  loss), and token means over the loss tokens: `lm_loss` (-logp of the sampled tokens),
  `grpo/approx_kl` (k3 of KL(pi_old || pi) from r), `grpo/clip_low_fraction`,
  `grpo/clip_high_fraction`, `grpo/dual_clip_fraction`, `grpo/importance_weight`,
  `grpo/importance_capped_fraction`, `grpo/ratio`, and with their inputs `grpo/entropy` and
  `grpo/kl_ref`.
  """
  totals = batch_totals(batch) if totals is None else totals
  logp_BS = logp_BS.astype(jnp.float32)
  terms = token_terms(logp_BS, batch, cfg)
  loss_BS = terms["policy"]
  mask_BS = batch["loss_mask"].astype(jnp.float32)
  tokens = jnp.maximum(totals["loss_tokens"], 1.0)
  token_mean = lambda x_BS: jax.lax.stop_gradient(jnp.sum(x_BS * mask_BS) / tokens)
  ratio_BS = terms["ratio"]
  metrics = {
    "lm_loss": token_mean(-logp_BS),
    "grpo/policy_loss": jax.lax.stop_gradient(aggregate(loss_BS, batch, totals, cfg)),
    "grpo/approx_kl": token_mean(ratio_BS - 1.0 - terms["log_ratio"]),
    "grpo/clip_low_fraction": token_mean(terms["clip_low"]),
    "grpo/clip_high_fraction": token_mean(terms["clip_high"]),
    "grpo/dual_clip_fraction": token_mean(terms["dual_clip"]),
    "grpo/importance_weight": token_mean(terms["weight"]),
    "grpo/importance_capped_fraction": token_mean(terms["capped"]),
    "grpo/ratio": token_mean(ratio_BS),
  }
  if cfg.kl_coef > 0:
    kl_BS = k3_kl_BS(logp_BS, batch["ref_logprobs"].astype(jnp.float32))
    loss_BS = loss_BS + cfg.kl_coef * kl_BS
    metrics["grpo/kl_ref"] = token_mean(kl_BS)
  if entropy_BS is not None:
    metrics["grpo/entropy"] = token_mean(entropy_BS)
    if cfg.entropy_coef > 0:
      loss_BS = loss_BS - cfg.entropy_coef * entropy_BS
  return aggregate(loss_BS, batch, totals, cfg), metrics


def objective(cfg: GRPOConfig) -> losses.Objective:
  """The GRPO loss for `trainer.setup(..., objective=...)`, from the model's logits."""

  def loss(logits_BSV, batch, totals):
    logp_BS, entropy_BS = losses.token_logprobs_and_entropy(logits_BSV, batch["targets"])
    return loss_from_logprobs(logp_BS, batch, cfg, totals, entropy_BS)

  return losses.Objective(
    name="grpo", batch_dtypes=batch_dtypes(cfg), totals=batch_totals, loss=loss
  )
