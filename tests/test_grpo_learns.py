"""GRPO end to end on a bandit: sampled rollouts, chunk rows, group advantages and the clipped
loss from the model's logits must move the policy towards rewarded tokens. With the advantages
negated the same test fails (the reward falls to 0); the row layout itself is pinned by
tests/test_rl.py::test_every_chunk_is_a_row_with_its_trace_advantage_and_length."""

import jax
import numpy as np
import optax
from flax import nnx

from adaptive.envs import Chunk
from models import decoding, transformer
from train import grpo, losses, rl_rows

VOCAB, PROMPTS, GROUP, NEW = 16, 4, 8, 4
REWARDED = 5  # reward = the fraction of generated tokens equal to this id


def rollouts(model, prompts_PS, key):
  """(traces, rewards_PG): GROUP samples of NEW tokens per prompt, with their log-probs."""
  tokens_BS = np.repeat(prompts_PS, GROUP, axis=0)
  lengths_B = np.full(len(tokens_BS), prompts_PS.shape[1], np.int32)
  out = decoding.generate(
    model,
    tokens_BS,
    lengths_B,
    max_new_tokens=NEW,
    sampling=decoding.Sampling(temperature=1.0),
    rng=key,
  )
  generated_BN, logprobs_BN = np.asarray(out.tokens_BN), np.asarray(out.logprobs_BN)
  traces = [(Chunk(tokens_BS[i], generated_BN[i], logprobs_BN[i]),) for i in range(len(tokens_BS))]
  rewards_PG = (generated_BN == REWARDED).mean(axis=1).reshape(PROMPTS, GROUP)
  return traces, rewards_PG


def test_grpo_raises_the_reward_of_a_bandit():
  config = transformer.Config(
    vocab_size=VOCAB,
    dim=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
    dtype="float32",
  )
  model = transformer.Transformer(config, rngs=nnx.Rngs(0))
  cfg = grpo.GRPOConfig(group_size=GROUP, loss_agg="token-mean")
  objective = grpo.objective(cfg)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = optax.adam(3e-2)
  opt_state = optimizer.init(params)
  prompts_PS = np.random.default_rng(0).integers(1, VOCAB, size=(PROMPTS, 3)).astype(np.int32)

  @jax.jit
  def update(params, opt_state, batch):
    def loss_fn(p):
      m = nnx.merge(graphdef, p, rest)
      logits_BSV, _ = m(batch["tokens"], batch["positions"], batch["segment_ids"])
      return objective.loss(logits_BSV, batch, objective.totals(batch))[0]

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  mean_rewards = []
  for step in range(12):
    model = nnx.merge(graphdef, params, rest)
    traces, rewards_PG = rollouts(model, prompts_PS, jax.random.key(step))
    mean_rewards.append(float(rewards_PG.mean()))
    advantages = np.asarray(grpo.group_advantages(rewards_PG, "grpo")).reshape(-1)
    rows = rl_rows.chunk_rows(traces, advantages, rows=len(traces), seq_len=8, pad_id=0)
    batch = {k: rows[k] for k in losses.LM_DTYPES}
    batch |= {k: rows[k] for k in ("advantages", "rollout_logprobs", "trace_lengths")}
    batch["old_logprobs"] = rows["rollout_logprobs"]  # on-policy: one update per rollout
    params, opt_state = update(params, opt_state, batch)
  # Uniform-ish at the start (about 1/16 of tokens rewarded); GRPO must raise it steadily.
  assert mean_rewards[0] < 0.2, mean_rewards
  assert np.mean(mean_rewards[-3:]) > 3 * max(mean_rewards[0], 0.05), mean_rewards
