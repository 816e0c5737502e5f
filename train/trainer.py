"""The sharded train step: AdamW, schedules, clipping, gradient accumulation, non-finite skip.

    setup = trainer.setup(run, config, mesh)          # abstract state + shardings, nothing allocated
    state = setup.init()                              # sharded init: jit(out_shardings=...)
    state, metrics = setup.train_step(state, batch)   # jitted, state donated
    sums = setup.eval_step(state, batch)
    logp_BS = setup.logprobs(state, batch)            # log p(targets) under the state's params

The loss is a parameter: `setup(..., objective=grpo.objective(cfg))` trains GRPO (or
`losses.sft()`, SFT) through the same mesh, rules, donation, accumulation and clipping;
the default, `losses.lm()`, is pretraining (train/losses.py says what an objective is).

The train state is a dict of pure pytrees (what the checkpoint holds):

    params          float32 parameters as a pure dict (nnx.State.to_pure_dict())
    model_state     other nnx variables of the model, if any (absent when none)
    opt_state       optax state; Adam moments are sharded like their parameters
    step            int32, advances on every step (also on skipped ones)
    rng             uint32 raw key data, the run's base key
    nonfinite_streak, nonfinite_total   int32 counters of skipped steps

A batch is a dict of the objective's fields; every objective has the [B, S] arrays
tokens, targets, positions, segment_ids (0 = padding) and loss_mask (float32). The
LM loss is the masked next-token cross entropy, normalised by the batch's mask total
(so gradient accumulation over micro-batches gives the same gradient as one big
batch). Every objective's loss gets the already weighted auxiliary losses the model
reports in `aux["losses"]` added.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import registry
from train import losses, sharding

# The LM batch (every objective's batch has these fields; see train/losses.py).
BATCH_DTYPES = dict(losses.LM_DTYPES)
BATCH_FIELDS = tuple(BATCH_DTYPES)
masked_cross_entropy_sum = losses.masked_cross_entropy_sum
# What Setup.logprobs reads.
LOGPROB_FIELDS = (*losses.MODEL_INPUTS, "targets")


# ----------------------------------------------------------------------------- optimizer


def make_schedule(opt, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Learning rate at a step: linear warmup to the peak, then cosine/linear/constant.

  Warmup reaches the peak at step `warmup_steps - 1` (step 0 already trains).
  Decay runs from the end of warmup to `total_steps`, down to
  `learning_rate * min_learning_rate_ratio`.
  """
  peak = float(opt.learning_rate)
  end = peak * float(opt.min_learning_rate_ratio)
  warmup = int(opt.warmup_steps)
  decay_steps = max(total_steps - warmup, 1)
  kind = opt.schedule

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1.0) / warmup) if warmup else 1.0
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if kind == "cosine":
      decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif kind == "linear":
      decayed = peak + (end - peak) * progress
    elif kind == "constant":
      decayed = jnp.full_like(progress, peak)
    else:
      raise ValueError(f"optimizer.schedule={kind!r}; allowed: cosine, linear, constant")
    return warm * decayed

  return schedule


def weight_decay_mask(abstract_params_state: nnx.State) -> Any:
  """True for matrices (two or more non-`layers` axes); norms and biases are not decayed."""
  flat = {}
  for path, variable in abstract_params_state.flat_state():
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
      flat[path] = variable.get_value().ndim >= 2
    else:
      flat[path] = sum(a != "layers" for a in axes) >= 2
  return nnx.State.from_flat_path(flat).to_pure_dict()


def make_optimizer(opt, total_steps: int, decay_mask=None) -> optax.GradientTransformation:
  """Global-norm clipping (if grad_clip_norm > 0) then AdamW on the schedule."""
  schedule = make_schedule(opt, total_steps)
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
  parts.append(
    optax.adamw(
      schedule,
      b1=float(opt.b1),
      b2=float(opt.b2),
      eps=float(opt.eps),
      weight_decay=float(opt.weight_decay),
      mask=decay_mask,
    )
  )
  return optax.chain(*parts)


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
  """Everything compiled for one run on one mesh."""

  mesh: Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: Callable
  abstract_state: Any  # ShapeDtypeStructs with .sharding set
  state_shardings: Any
  batch_shardings: dict[str, NamedSharding]
  init: Callable[[], Any]
  train_step: Callable
  eval_step: Callable
  params_finite: Callable
  objective: losses.Objective
  logprobs: Callable  # (state, batch) -> log p(targets) [B, S]; see setup()


def _split(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def _target_kwargs(model, mb) -> dict:
  """The batch's targets and loss mask for a model whose own losses take them (early exit: its
  exit losses then train on exactly the objective's targets, e.g. SFT's response tokens)."""
  if "targets_BS" not in inspect.signature(type(model).__call__).parameters:
    return {}
  return {"targets_BS": mb["targets"], "loss_mask_BS": mb["loss_mask"]}


def setup(
  run, config, mesh: Mesh, *, objective: losses.Objective | None = None, donate: bool = True
) -> Setup:
  """Builds the abstract state, its shardings and the jitted init/train/eval/logprobs steps.

  `objective` (default losses.lm()) is the loss `train_step` minimises and decides the
  batch's fields. `eval_step` is always the LM cross entropy (sums) over the batch's
  loss_mask. `logprobs(state, batch)` runs the model forward under `state["params"]` (any
  params pytree sharded like the state's, e.g. a frozen reference) in the train step's
  micro-batches and returns log p(targets) [B, S] float32, e.g. GRPO's old log-probs.
  """
  objective = losses.lm() if objective is None else objective
  kind, model_config = run.model_kind, run.model_config
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  seed = int(config.seed)
  grad_accum = int(config.optimizer.grad_accum_steps)

  def build(rngs_seed):
    return registry.build(kind, model_config, rngs=nnx.Rngs(rngs_seed))

  abstract_model = nnx.eval_shape(lambda: build(seed))
  graphdef, abstract_params, abstract_rest = _split(abstract_model)
  params_shardings = sharding.state_shardings(abstract_params, mesh, rules)
  rest_shardings = sharding.state_shardings(abstract_rest, mesh, rules, warn_replicated=False)
  abstract_params_pure = jax.tree.map(
    lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), abstract_params.to_pure_dict()
  )
  tx = make_optimizer(config.optimizer, int(config.total_steps), weight_decay_mask(abstract_params))
  schedule = make_schedule(config.optimizer, int(config.total_steps))
  repl = sharding.replicated(mesh)
  has_rest = bool(jax.tree.leaves(abstract_rest.to_pure_dict()))

  state_shardings = {
    "params": params_shardings,
    "opt_state": sharding.optimizer_shardings(tx, abstract_params_pure, params_shardings, mesh),
    "step": repl,
    "rng": repl,
    "nonfinite_streak": repl,
    "nonfinite_total": repl,
  }
  if has_rest:
    state_shardings["model_state"] = rest_shardings

  def init_fn():
    model = build(seed)
    _, params, rest = _split(model)
    params = params.to_pure_dict()
    state = {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(jax.random.key(seed)),
      "nonfinite_streak": jnp.zeros((), jnp.int32),
      "nonfinite_total": jnp.zeros((), jnp.int32),
    }
    if has_rest:
      state["model_state"] = rest.to_pure_dict()
    return state

  abstract_state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    jax.eval_shape(init_fn),
    state_shardings,
  )
  init = jax.jit(init_fn, out_shardings=state_shardings)

  batch_sharding = sharding.batch_sharding(mesh)
  batch_shardings = {k: batch_sharding for k in objective.batch_dtypes}
  lm_shardings = {k: batch_sharding for k in BATCH_FIELDS}

  def forward(params, rest, mb, training=True):
    """(logits_BSV, aux losses, aux metrics, new model_state) of one (micro-)batch.

    training=False runs the model in NNX eval mode (`deterministic=True`): no LayerSkip layer
    drop and no curriculum step, for evaluation and for re-scoring rollouts."""
    model = nnx.merge(graphdef, params, rest) if has_rest else nnx.merge(graphdef, params)
    if not training:
      model.eval()
    logits_BSV, aux = model(
      mb["tokens"], mb["positions"], mb["segment_ids"], **_target_kwargs(model, mb)
    )
    new_rest = _split(model)[2].to_pure_dict() if has_rest else rest
    aux = aux or {}
    return logits_BSV, dict(aux.get("losses", {})), dict(aux.get("metrics", {})), new_rest

  def micro_loss(params, rest, mb, totals):
    logits_BSV, aux_losses, aux_metrics, new_rest = forward(params, rest, mb)
    objective_loss, objective_metrics = objective.loss(logits_BSV, mb, totals)
    aux_total = sum(aux_losses.values(), jnp.zeros((), jnp.float32)) / grad_accum
    loss = objective_loss + aux_total
    return loss, (objective_metrics, aux_losses, aux_metrics, new_rest)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def to_micro(x):  # [B, ...] -> [A, B/A, ...], micro-batch a = rows a, A+a, 2A+a, ...
    x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
    spec = PartitionSpec(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  def from_micro(x):  # the inverse of to_micro
    x = x.swapaxes(0, 1)
    return x.reshape((x.shape[0] * grad_accum,) + x.shape[2:])

  def train_step(state, batch):
    params = state["params"]
    rest = state.get("model_state", {})
    totals = objective.totals(batch)
    if grad_accum == 1:
      (loss, (objective_metrics, aux_losses, aux_metrics, rest)), grads = grad_fn(
        params, rest, batch, totals
      )
    else:
      micro = {k: to_micro(v) for k, v in batch.items()}

      def body(carry, mb):
        grads_acc, loss_acc, metrics_acc, rest = carry
        (loss, (objective_metrics, aux_losses, aux_metrics, rest)), grads = grad_fn(
          params, rest, mb, totals
        )
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        metrics_acc = jax.tree.map(jnp.add, metrics_acc, objective_metrics)
        return (grads_acc, loss_acc + loss, metrics_acc, rest), (aux_losses, aux_metrics)

      zeros = jax.tree.map(jnp.zeros_like, params)
      zero = jnp.zeros((), jnp.float32)
      first = jax.tree.map(lambda x: x[0], micro)
      metric_shapes = jax.eval_shape(lambda: micro_loss(params, rest, first, totals)[1][0])
      metric_zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), metric_shapes)
      (grads, loss, objective_metrics, rest), (aux_losses, aux_metrics) = jax.lax.scan(
        body, (zeros, zero, metric_zeros, rest), micro
      )
      aux_losses = jax.tree.map(jnp.mean, aux_losses)
      aux_metrics = jax.tree.map(jnp.mean, aux_metrics)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    step = state["step"]
    streak = jnp.where(finite, 0, state["nonfinite_streak"] + 1).astype(jnp.int32)
    new_state = {
      "params": keep(new_params, params),
      "opt_state": keep(new_opt_state, state["opt_state"]),
      "step": step + 1,
      "rng": state["rng"],
      "nonfinite_streak": streak,
      "nonfinite_total": state["nonfinite_total"] + (~finite).astype(jnp.int32),
    }
    if has_rest:
      new_state["model_state"] = keep(rest, state["model_state"])
    metrics = {"loss": loss}
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in objective_metrics.items()})
    metrics.update(
      {
        "grad_norm": grad_norm,
        "learning_rate": schedule(step),
        "finite": finite.astype(jnp.float32),
        "nonfinite_streak": streak,
        "nonfinite_total": new_state["nonfinite_total"],
      }
    )
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in totals.items()})
    metrics.update({f"aux_loss/{k}": jnp.asarray(v, jnp.float32) for k, v in aux_losses.items()})
    metrics.update({f"aux/{k}": jnp.asarray(v, jnp.float32) for k, v in aux_metrics.items()})
    return new_state, metrics

  jitted_step = jax.jit(
    train_step,
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, repl),
    donate_argnums=(0,) if donate else (),
  )

  rest_in_shardings = rest_shardings if has_rest else repl

  def eval_fn(params, rest, batch):
    logits_BSV, _, _, _ = forward(params, rest, batch, training=False)
    ce_sum, count = masked_cross_entropy_sum(logits_BSV, batch["targets"], batch["loss_mask"])
    return {"ce_sum": ce_sum, "count": count}

  jitted_eval = jax.jit(
    eval_fn, in_shardings=(params_shardings, rest_in_shardings, lm_shardings), out_shardings=repl
  )

  def eval_step(state, batch):
    lm_batch = {k: batch[k] for k in BATCH_FIELDS}
    return jitted_eval(state["params"], state.get("model_state", {}), lm_batch)

  def logprobs_fn(params, rest, batch):
    # In the train step's micro-batches, so a batch that trains also fits here.
    def one(mb):
      return losses.token_logprobs(forward(params, rest, mb, training=False)[0], mb["targets"])

    if grad_accum == 1:
      return one(batch)
    return from_micro(jax.lax.map(one, {k: to_micro(v) for k, v in batch.items()}))

  jitted_logprobs = jax.jit(
    logprobs_fn,
    in_shardings=(
      params_shardings,
      rest_in_shardings,
      {k: batch_sharding for k in LOGPROB_FIELDS},
    ),
    out_shardings=batch_sharding,
  )

  def logprobs(state, batch):
    """log p(targets) in nats, [B, S] float32 sharded like the batch, under state["params"]."""
    model_batch = {k: batch[k] for k in LOGPROB_FIELDS}
    return jitted_logprobs(state["params"], state.get("model_state", {}), model_batch)

  params_finite = jax.jit(
    lambda p: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])),
    in_shardings=(state_shardings,),
    out_shardings=repl,
  )

  return Setup(
    mesh=mesh,
    graphdef=graphdef,
    tx=tx,
    schedule=schedule,
    abstract_state=abstract_state,
    state_shardings=state_shardings,
    batch_shardings=batch_shardings,
    init=init,
    train_step=jitted_step,
    eval_step=eval_step,
    params_finite=params_finite,
    objective=objective,
    logprobs=logprobs,
  )


def state_is_finite(setup_: Setup, state) -> bool:
  """True when every floating leaf of the state is finite (checked before a save)."""
  return bool(setup_.params_finite(state))


def device_batch(
  local_batch: dict[str, np.ndarray], setup_: Setup, fields: Sequence[str] | None = None
) -> dict[str, jax.Array]:
  """Global jax arrays from this process's rows, sharded over (data, fsdp).

  `fields`: which of the objective's fields (default all of them; LOGPROB_FIELDS is what
  `setup_.logprobs` reads, so old log-probs can be computed before a batch is complete).
  """
  from train import data as data_lib

  dtypes = setup_.objective.batch_dtypes
  fields = tuple(dtypes) if fields is None else tuple(fields)
  missing = [k for k in fields if k not in local_batch or k not in dtypes]
  if missing:
    raise ValueError(
      f"batch: field {missing[0]!r} is missing; the {setup_.objective.name} objective's "
      f"batch has {sorted(dtypes)}"
    )
  local = {k: np.asarray(local_batch[k], dtypes[k]) for k in fields}
  return data_lib.global_batch(local, setup_.batch_shardings["tokens"])


def num_params(abstract_state) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state["params"]))
