"""GRPO against the formulas written out in NumPy (float64), mesh independence, config errors."""

import functools
import math

import jax
import numpy as np
import pytest

from configs import lm_dense
from train import config_lib, grpo, sharding, trainer

ESTIMATORS = ("grpo", "drgrpo", "rloo")
AGGREGATIONS = (
  "token-mean",
  "sequence-mean-token-mean",
  "sequence-mean-token-sum-norm",
  "delethink",
)


# ----------------------------------------------------------------------------- NumPy reference


def reference_advantages(rewards, estimator, eps=1e-6):
  """Per group of G rewards, one sample at a time, in float64."""
  rewards = np.asarray(rewards, np.float64)
  out = np.zeros_like(rewards)
  for n, group in enumerate(rewards):
    g = len(group)
    mean = sum(group) / g
    for i, reward in enumerate(group):
      if estimator == "grpo":
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (g - 1))
        out[n, i] = (reward - mean) / (std + eps)
      elif estimator == "drgrpo":
        out[n, i] = reward - mean
      else:  # rloo: the mean of the other samples is the baseline
        out[n, i] = reward - (sum(group) - reward) / (g - 1)
  return out


def reference_token(logp, old, rollout, a, cfg, ref=None, entropy=0.0):
  """(loss, d loss / d logp) of one token, from DESIGN.md's formulas."""
  log_ratio = logp - old
  inside = -20 < log_ratio < 20
  r = math.exp(min(max(log_ratio, -20.0), 20.0))
  dr = r if inside else 0.0
  unclipped = -a * r
  clipped = -a * min(max(r, 1 - cfg["clip_low"]), 1 + cfg["clip_high"])
  if unclipped >= clipped:
    loss, grad = unclipped, -a * dr
  else:  # r is outside the clip range: a constant
    loss, grad = clipped, 0.0
  if cfg["dual_clip"] and a < 0 and loss > -cfg["dual_clip"] * a:
    loss, grad = -cfg["dual_clip"] * a, 0.0
  if cfg["importance_cap"]:
    w = min(math.exp(old - rollout), cfg["importance_cap"])
    loss, grad = w * loss, w * grad
  if cfg["kl_coef"]:
    d = ref - logp
    d_inside = -20 < d < 20
    d = min(max(d, -20.0), 20.0)
    loss += cfg["kl_coef"] * (math.exp(d) - d - 1)
    grad += cfg["kl_coef"] * ((1 - math.exp(d)) if d_inside else 0.0)
  loss -= cfg["entropy_coef"] * entropy
  return loss, grad


def reference_loss(logp, batch, cfg, entropy=None):
  """(loss, gradient [B, S]) with every row and token written out."""
  mask = batch["loss_mask"]
  b_rows, s = mask.shape
  token_loss = np.zeros((b_rows, s))
  token_grad = np.zeros((b_rows, s))
  for b in range(b_rows):
    for t in range(s):
      if mask[b, t]:
        token_loss[b, t], token_grad[b, t] = reference_token(
          float(logp[b, t]),
          float(batch["old_logprobs"][b, t]),
          float(batch["rollout_logprobs"][b, t]),
          float(batch["advantages"][b]),
          cfg,
          None if "ref_logprobs" not in batch else float(batch["ref_logprobs"][b, t]),
          0.0 if entropy is None else float(entropy[b, t]),
        )
  mode = cfg["loss_agg"]
  if mode == "token-mean":
    n = mask.sum()
    return token_loss.sum() / n, token_grad / n
  rows = [b for b in range(b_rows) if mask[b].sum() > 0]
  loss, grad = 0.0, np.zeros((b_rows, s))
  for b in rows:
    if mode == "sequence-mean-token-mean":
      divisor = mask[b].sum()
    elif mode == "sequence-mean-token-sum-norm":
      divisor = cfg["norm_length"] or s
    else:  # delethink: the whole trace's generated length
      divisor = batch["trace_lengths"][b]
    loss += token_loss[b].sum() / divisor / len(rows)
    grad[b] = token_grad[b] / divisor / len(rows)
  return loss, grad


def as_cfg(config):
  return {f: getattr(config, f) for f in config.__dataclass_fields__}


# ----------------------------------------------------------------------------- fixtures

# Log-ratios where some variant's loss has a kink (clip edges, dual clips, the clamp).
KINKS = tuple(math.log(x) for x in (0.8, 1.26, 3.0, 0.9, 1.4, 2.5)) + (-20.0, 20.0)
TRACE_OF_ROW = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5])  # chunk rows of 6 traces


def policy_batch(seed, estimator, *, s=7, with_ref=False):
  """Chunks of 6 traces (2 problems x 3 samples) with log-ratios on both sides of every clip.

  Returns (logp, batch for JAX, the same batch in float64 for the reference); the JAX batch's
  advantages come from grpo.group_advantages, the reference's from reference_advantages.
  """
  b_rows = len(TRACE_OF_ROW)
  rng = np.random.default_rng(seed)
  rewards = rng.integers(0, 2, (2, 3)).astype(np.float64)
  rewards[0] = [1.0, 0.0, 0.0]  # a group with both signs
  rewards[1, 0] = 0.5
  trace_of_row = TRACE_OF_ROW
  mask = (rng.random((b_rows, s)) < 0.8).astype(np.float32)
  mask[:, 0] = 0.0  # the prompt
  mask[4] = 0.0  # a padding row
  logp = rng.uniform(-6, -0.1, (b_rows, s))
  log_ratio = rng.uniform(-2.5, 2.5, (b_rows, s))
  log_ratio[0, 1:4] = [25.0, -25.0, 4.0]  # clamped above and below; far above the clip
  log_ratio[1, 1:4] = [-4.0, 1.5, 0.0]  # far below; above the dual clip for A < 0
  log_ratio[3, 1:4] = [25.0, -25.0, 1.5]  # the same where A < 0 (trace 2 has reward 0)
  mask[:4, 1:4] = 1.0  # every edge case above and below is a loss token
  for kink in KINKS:  # keep away from the kinks, where the derivative is undefined
    near = np.abs(log_ratio - kink) < 0.02
    log_ratio[near] += 0.05
  old = logp - log_ratio
  rollout = old - rng.uniform(-0.3, 0.3, (b_rows, s))
  rollout[2, 1:4] = old[2, 1:4] - [5.0, -5.0, 30.0]  # capped weight, tiny weight, capped far
  lengths = np.array([mask[trace_of_row == i].sum() for i in range(6)])
  batch = {
    "loss_mask": mask,
    "old_logprobs": old.astype(np.float32),
    "rollout_logprobs": rollout.astype(np.float32),
    "trace_lengths": np.maximum(lengths[trace_of_row], 1).astype(np.float32),
  }
  if with_ref:
    batch["ref_logprobs"] = (logp + rng.uniform(-1, 1, (b_rows, s))).astype(np.float32)
  # Values as JAX sees them (float32), in float64 for the reference.
  batch64 = {k: np.asarray(v, np.float64) for k, v in batch.items()}
  batch64["advantages"] = reference_advantages(rewards, estimator).reshape(-1)[trace_of_row]
  batch["advantages"] = np.asarray(grpo.group_advantages(rewards, estimator)).reshape(-1)[
    trace_of_row
  ]
  return logp.astype(np.float32), batch, batch64


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_advantages_match_reference(estimator):
  rewards = np.array([[1, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0.5, 2, -1, 0, 3]], np.float32)
  got = np.asarray(grpo.group_advantages(rewards, estimator))
  np.testing.assert_allclose(got, reference_advantages(rewards, estimator), rtol=1e-5, atol=1e-6)


VARIANTS = {
  "paper": {},
  "no-dual-no-cap": dict(dual_clip=0.0, importance_cap=0.0),
  "kl": dict(kl_coef=0.3, clip_low=0.1, clip_high=0.4, dual_clip=2.5, importance_cap=1.5),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("loss_agg", AGGREGATIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_loss_and_gradient_match_reference(estimator, loss_agg, variant):
  config = grpo.GRPOConfig(
    advantage=estimator, loss_agg=loss_agg, norm_length=9, **VARIANTS[variant]
  )
  logp, batch, batch64 = policy_batch(1, estimator, with_ref=config.kl_coef > 0)
  expected, expected_grad = reference_loss(np.float64(logp), batch64, as_cfg(config))

  def loss(lp):
    return grpo.loss_from_logprobs(lp, batch, config)[0]

  got, grad = jax.value_and_grad(loss)(logp)
  assert float(got) == pytest.approx(expected, rel=1e-5)
  scale = np.abs(expected_grad).max()
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-6 * scale)


def reference_from_logits(logits, targets, batch, cfg):
  """The GRPO loss of float64 logits: log-softmax and entropy written out."""
  shifted = logits - logits.max(-1, keepdims=True)
  logp_all = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
  entropy = -(np.exp(logp_all) * logp_all).sum(-1)
  return reference_loss(logp, batch, cfg, entropy)[0]


@pytest.mark.parametrize("loss_agg", AGGREGATIONS)
def test_objective_from_logits_matches_finite_differences(loss_agg):
  """Entropy bonus and k3 KL through the logits: central differences of the reference."""
  config = grpo.GRPOConfig(loss_agg=loss_agg, kl_coef=0.2, entropy_coef=0.05)
  rng = np.random.default_rng(3)
  b_rows, s, v = 4, 5, 6
  logits = rng.normal(0, 1.5, (b_rows, s, v)).astype(np.float32)
  targets = rng.integers(0, v, (b_rows, s)).astype(np.int32)
  shifted = np.float64(logits) - np.float64(logits).max(-1, keepdims=True)
  logp_all = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
  old = logp - rng.choice([-0.6, -0.1, 0.05, 0.15, 0.5], (b_rows, s))  # both clip sides
  mask = np.ones((b_rows, s), np.float32)
  mask[0, :2] = 0.0
  mask[3] = 0.0
  batch = {
    "targets": targets,
    "loss_mask": mask,
    "advantages": np.array([1.2, -0.7, -1.5, 0.0], np.float32),
    "old_logprobs": old.astype(np.float32),
    "rollout_logprobs": (old + rng.uniform(-1, 1, (b_rows, s))).astype(np.float32),
    "ref_logprobs": (logp + rng.uniform(-1, 1, (b_rows, s))).astype(np.float32),
    "trace_lengths": np.array([7.0, 5.0, 12.0, 1.0], np.float32),
  }
  batch64 = {k: np.asarray(v, np.float64) for k, v in batch.items() if k != "targets"}
  cfg = as_cfg(config)
  objective = grpo.objective(config)

  def loss(lg):
    return objective.loss(lg, batch, objective.totals(batch))[0]

  got, grad = jax.value_and_grad(loss)(logits)
  x = np.float64(logits)
  assert float(got) == pytest.approx(reference_from_logits(x, targets, batch64, cfg), rel=1e-5)
  h = 1e-6
  expected_grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[index] += h
    down[index] -= h
    expected_grad[index] = (
      reference_from_logits(up, targets, batch64, cfg)
      - reference_from_logits(down, targets, batch64, cfg)
    ) / (2 * h)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("loss_agg", AGGREGATIONS)
def test_micro_batch_shares_sum_to_the_batch(loss_agg):
  """What gradient accumulation relies on: shares under the whole batch's totals add up."""
  config = grpo.GRPOConfig(loss_agg=loss_agg, kl_coef=0.1)
  logp, batch, _ = policy_batch(4, "grpo", with_ref=True)
  whole, whole_metrics = grpo.loss_from_logprobs(logp, batch, config)
  totals = grpo.batch_totals(batch)
  shares = []
  for a in range(3):  # the trainer's micro-batch a: rows a, A + a, 2A + a
    rows = np.arange(a, len(logp), 3)
    sub = {k: v[rows] for k, v in batch.items()}
    shares.append(grpo.loss_from_logprobs(logp[rows], sub, config, totals))
  assert sum(float(loss) for loss, _ in shares) == pytest.approx(float(whole), rel=1e-5)
  for key, value in whole_metrics.items():
    total = sum(float(metrics[key]) for _, metrics in shares)
    assert total == pytest.approx(float(value), rel=1e-5, abs=1e-7), key


def test_metrics_count_clipped_tokens():
  config = grpo.GRPOConfig(advantage="drgrpo", loss_agg="token-mean")
  logp, batch, batch64 = policy_batch(2, "drgrpo")
  _, metrics = grpo.loss_from_logprobs(logp, batch, config)
  mask = batch64["loss_mask"] > 0
  a = np.broadcast_to(batch64["advantages"][:, None], mask.shape)
  r = np.exp(np.clip(np.float64(logp) - batch64["old_logprobs"], -20, 20))
  n = mask.sum()
  low = (mask & (a < 0) & (r < 0.8)).sum() / n
  high = (mask & (a > 0) & (r > 1.26)).sum() / n
  dual = (mask & (a < 0) & (r > 3.0)).sum() / n
  raw_weight = np.exp(batch64["old_logprobs"] - batch64["rollout_logprobs"])
  assert low > 0 and high > 0 and dual > 0
  assert float(metrics["grpo/clip_low_fraction"]) == pytest.approx(low)
  assert float(metrics["grpo/clip_high_fraction"]) == pytest.approx(high)
  assert float(metrics["grpo/dual_clip_fraction"]) == pytest.approx(dual)
  assert float(metrics["grpo/importance_capped_fraction"]) == pytest.approx(
    (mask & (raw_weight > 2.0)).sum() / n
  )
  approx_kl = ((r - 1 - np.log(r)) * mask).sum() / n
  assert float(metrics["grpo/approx_kl"]) == pytest.approx(approx_kl, rel=1e-4)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("clip_low", -0.1, r"grpo.clip_low=-0.1: must be in \[0, 1\)"),
    ("clip_low", 1.0, "grpo.clip_low=1.0"),
    ("clip_high", float("inf"), "grpo.clip_high=inf"),
    ("dual_clip", 0.5, "grpo.dual_clip=0.5: must be 0 .off. or a finite number > 1"),
    ("importance_cap", 0.5, "grpo.importance_cap=0.5"),
    ("kl_coef", -1.0, "grpo.kl_coef=-1.0"),
    ("entropy_coef", float("nan"), "grpo.entropy_coef=nan"),
    ("loss_agg", "seq-mean", "grpo.loss_agg='seq-mean': allowed"),
    ("advantage", "ppo", "grpo.advantage='ppo'"),
    ("group_size", 1, "grpo.group_size=1: must be an integer >= 2"),
    ("group_size", True, "grpo.group_size=True"),
    ("norm_length", -3, "grpo.norm_length=-3"),
    ("minibatches", 0, "grpo.minibatches=0"),
    ("std_eps", 0.0, "grpo.std_eps=0.0"),
  ],
)
def test_malformed_config_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    grpo.GRPOConfig(**{field: value})
  with pytest.raises(ValueError, match=message):
    grpo.GRPOConfig.from_config({field: value})


def test_config_from_section():
  config = grpo.GRPOConfig.from_config({"advantage": "drgrpo", "group_size": 1, "kl_coef": 0.1})
  assert config.group_size == 1 and config.clip_high == 0.26
  assert "ref_logprobs" in grpo.objective(config).batch_dtypes
  with pytest.raises(ValueError, match="grpo.clip: no such field"):
    grpo.GRPOConfig.from_config({"clip": 0.2})
  with pytest.raises(ValueError, match="rewards"):
    grpo.group_advantages(np.ones((3, 1)), "grpo")


# ----------------------------------------------------------------------------- sharded step


def model_config(mesh, accum=1):
  c = lm_dense.get_config()
  c.total_steps = 10
  c.batch_size = 4  # the optimizer mini-batch, in rows
  c.seq_len = 16
  c.model.update(
    dict(
      dim=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64, dtype="float32"
    )
  )
  # Adam's step is about lr * sign(g) where |g| >> eps, so a gradient at float-noise level
  # would turn rounding differences between meshes into lr-sized parameter differences;
  # an eps near the gradients' scale keeps the update Lipschitz in the gradient.
  c.optimizer.update(dict(warmup_steps=0, schedule="constant", learning_rate=1e-3, eps=1e-4))
  c.optimizer.grad_accum_steps = accum
  c.data.prefetch = 0
  c.mesh.update(mesh)
  return c


def rollout_batch(seed=0, b_rows=8, s=16, vocab=320):
  """A fixed batch of chunk rows: prompt, response, padding; row 7 is all padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (b_rows, s)).astype(np.int32)
  prompt = rng.integers(3, 7, b_rows)
  length = rng.integers(9, s + 1, b_rows)
  index = np.arange(s)[None]
  segment_ids = (index < length[:, None]).astype(np.int32)
  segment_ids[7] = 0
  # Next-token targets; the loss is on targets that are response tokens.
  loss_mask = ((index >= prompt[:, None] - 1) & (index < length[:, None] - 1)).astype(np.float32)
  loss_mask[7] = 0.0
  trace_of_row = np.array([0, 0, 1, 2, 3, 3, 4, 5])
  advantages = np.asarray(grpo.group_advantages([[1, 0, 0], [1, 1, 0]], "grpo")).reshape(-1)
  lengths = np.array([loss_mask[trace_of_row == i].sum() for i in range(6)])
  return {
    "tokens": tokens,
    "targets": np.roll(tokens, -1, 1),
    "positions": np.broadcast_to(index, (b_rows, s)).astype(np.int32),
    "segment_ids": segment_ids,
    "loss_mask": loss_mask,
    "advantages": advantages[trace_of_row].astype(np.float32),
    "rollout_logprobs": rng.normal(-np.log(vocab), 0.4, (b_rows, s)).astype(np.float32),
    "trace_lengths": lengths[trace_of_row].astype(np.float32),
  }


GRPO_STEP_CONFIG = grpo.GRPOConfig(kl_coef=0.05, entropy_coef=0.01, minibatches=2)


@functools.cache  # the tests share compiled steps (compiling dominates their time)
def grpo_setup(mesh_sizes, num_devices, accum=1):
  """A GRPO setup on the first `num_devices` devices; `mesh_sizes` as sorted (axis, size) pairs."""
  config = model_config(dict(mesh_sizes), accum)
  devices = jax.devices()[:num_devices]
  run = config_lib.validate(config, num_devices=num_devices)
  objective = grpo.objective(GRPO_STEP_CONFIG)
  return trainer.setup(
    run, config, sharding.make_mesh(dict(config.mesh), devices), objective=objective
  )


@functools.cache
def initial_state():
  """One initial train state on the host, placed on every mesh (one init compile)."""
  return jax.device_get(grpo_setup((("data", 1),), 1).init())


def rl_steps(setup):
  """Two RL steps on one rollout batch: old and reference log-probs, two mini-batch updates each."""
  state = jax.device_put(initial_state(), setup.state_shardings)
  batch = rollout_batch()
  inputs = trainer.device_batch(batch, setup, fields=trainer.LOGPROB_FIELDS)
  old = np.asarray(jax.device_get(setup.logprobs(state, inputs)))
  batch.update(old_logprobs=old, ref_logprobs=old - 0.1)
  losses, metrics = [], None
  for _ in range(2):  # the same rollouts again: the ratios move away from 1
    for rows in np.split(np.arange(8), GRPO_STEP_CONFIG.minibatches):
      mini = {k: v[rows] for k, v in batch.items()}
      state, metrics = setup.train_step(state, trainer.device_batch(mini, setup))
      losses.append(float(metrics["loss"]))
  return old, np.array(losses), jax.device_get(state["params"]), jax.device_get(metrics)


def test_grpo_step_is_the_same_on_8_devices_as_on_1():
  assert jax.device_count() == 8
  old_1, losses_1, params_1, metrics_1 = rl_steps(grpo_setup((("data", 1),), 1))
  mixed = grpo_setup((("data", 2), ("fsdp", 2), ("tensor", 2)), 8)
  old_8, losses_8, params_8, _ = rl_steps(mixed)
  assert np.all(np.isfinite(losses_1)) and np.isfinite(old_1).all()
  assert float(metrics_1["finite"]) == 1.0 and float(metrics_1["grpo/ratio"]) != 1.0
  np.testing.assert_allclose(old_8, old_1, rtol=0, atol=1e-5)
  np.testing.assert_allclose(losses_8, losses_1, rtol=0, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), params_8, params_1)
  # The updates moved the parameters well beyond the tolerance.
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params_1, initial_state()["params"])
  assert max(jax.tree.leaves(moved)) > 1e-3


def test_grpo_gradient_accumulation_equals_one_batch():
  """Micro-batches of 2 rows: the same loss, metrics and parameters as the 4-row mini-batch."""
  batch = rollout_batch(seed=1)
  rng = np.random.default_rng(2)
  batch["old_logprobs"] = batch["rollout_logprobs"] + rng.normal(0, 0.3, (8, 16)).astype(np.float32)
  batch["ref_logprobs"] = batch["old_logprobs"] - 0.2
  results = {}
  for accum in (1, 2):
    setup = grpo_setup((("data", 1),), 1, accum)
    state = jax.device_put(initial_state(), setup.state_shardings)
    metrics = []
    for rows in np.split(np.arange(8), 2):
      mini = {k: v[rows] for k, v in batch.items()}
      state, m = setup.train_step(state, trainer.device_batch(mini, setup))
      metrics.append(jax.device_get(m))
    results[accum] = metrics, jax.device_get(state["params"])
  (metrics_1, params_1), (metrics_2, params_2) = results[1], results[2]
  for m1, m2 in zip(metrics_1, metrics_2, strict=True):
    assert m1.keys() == m2.keys()
    for key in m1:
      assert float(m2[key]) == pytest.approx(float(m1[key]), rel=1e-5, abs=1e-6), key
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), params_2, params_1)
