"""Training objectives handed to `train.trainer.setup`: what a batch holds and how it is scored.

    setup = trainer.setup(run, config, mesh)                            # losses.lm(), pretraining
    setup = trainer.setup(run, config, mesh, objective=losses.sft())    # response tokens only
    setup = trainer.setup(run, config, mesh, objective=grpo.objective(grpo_config))

An Objective is pure data and pure functions; the trainer owns everything else (mesh,
logical-axis rules, donated state, gradient accumulation, clipping, the non-finite skip):

    batch_dtypes          field -> NumPy dtype; [B, S] per-token fields and [B] per-row fields
    totals(batch)         -> {name: scalar} over the whole optimizer batch (normalisers)
    loss(logits_BSV, micro_batch, totals) -> (loss, metrics)

Gradient accumulation splits a batch into micro-batches (rows a, A+a, 2A+a, ...). `loss` and
every metric it returns are a micro-batch's *share*, normalised by the whole batch's `totals`,
so that summed over the micro-batches they are the whole batch's value (with one micro-batch
they are the value). The trainer sums them and reports `totals` as metrics too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = Mapping[str, jax.Array]

# The fields every objective's batch starts with: the model's inputs and next-token targets.
LM_DTYPES = {
  "tokens": np.int32,
  "targets": np.int32,
  "positions": np.int32,
  "segment_ids": np.int32,
  "loss_mask": np.float32,
}
MODEL_INPUTS = ("tokens", "positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss as the trainer sees it (see the module docstring)."""

  name: str
  batch_dtypes: Mapping[str, type]
  totals: Callable[[Batch], dict[str, jax.Array]]
  loss: Callable[[jax.Array, Batch, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def masked_cross_entropy_sum(
  logits_BSV: jax.Array, targets_BS: jax.Array, loss_mask_BS: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(sum of masked next-token cross entropy in nats, sum of the mask), float32."""
  logits_BSV = logits_BSV.astype(jnp.float32)
  ce_BS = optax.softmax_cross_entropy_with_integer_labels(logits_BSV, targets_BS)
  mask_BS = loss_mask_BS.astype(jnp.float32)
  return jnp.sum(ce_BS * mask_BS), jnp.sum(mask_BS)


def token_logprobs_and_entropy(
  logits_BSV: jax.Array, targets_BS: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(log p(target) in nats [B, S], entropy of the next-token distribution in nats [B, S]), float32."""
  logits_BSV = logits_BSV.astype(jnp.float32)
  lse_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
  target_logit_BS = jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)[..., 0]
  probs_BSV = jnp.exp(logits_BSV - lse_BS[..., None])
  entropy_BS = lse_BS - jnp.sum(probs_BSV * logits_BSV, axis=-1)
  return target_logit_BS - lse_BS, entropy_BS


def token_logprobs(logits_BSV: jax.Array, targets_BS: jax.Array) -> jax.Array:
  """log p(target) in nats, [B, S] float32."""
  logits_BSV = logits_BSV.astype(jnp.float32)
  target_logit_BS = jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)[..., 0]
  return target_logit_BS - jax.nn.logsumexp(logits_BSV, axis=-1)


def _mask_total(batch: Batch) -> dict[str, jax.Array]:
  return {"loss_tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32))}


def _cross_entropy(logits_BSV, batch, totals):
  ce_sum, _ = masked_cross_entropy_sum(logits_BSV, batch["targets"], batch["loss_mask"])
  loss = ce_sum / jnp.maximum(totals["loss_tokens"], 1.0)
  return loss, {"lm_loss": loss}


def lm() -> Objective:
  """Next-token cross entropy over `loss_mask` (float32 [B, S]), normalised by the batch's mask total.

  Metrics: `lm_loss` (nats per loss token); totals: `loss_tokens`.
  """
  return Objective(name="lm", batch_dtypes=LM_DTYPES, totals=_mask_total, loss=_cross_entropy)


def sft() -> Objective:
  """Supervised fine-tuning: the same masked cross entropy, where `loss_mask` marks response tokens.

  A row is one chat-formatted (prompt, response) pair (or several, packed with segment ids);
  prompt and padding tokens have loss_mask 0, so only the response is learned. Metrics as lm().
  """
  return Objective(name="sft", batch_dtypes=LM_DTYPES, totals=_mask_total, loss=_cross_entropy)
