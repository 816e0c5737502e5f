"""The GRPO loop (config.objective = "grpo"): rollouts in a reasoning environment, rewards,
group advantages, and several optimizer steps per RL step through trainer.setup's sharded,
donated update.

Per RL step s (config.total_steps counts RL steps):
  1. P = rl.prompts_per_step problems from the task's train split (a checkpointed iterator);
     each is rendered with the chat template and tokenized as the SFT data does.
  2. G = grpo.group_size samples each through train.rollout with the key
     fold_in(state.rng, s) (the rollout folds in problem id, sample and chunk).
  3. Reward of a trace: the task's score of decode(its last chunk's visible window)
     (adaptive.tasks.reward_on_window); advantages per group of G (grpo.advantage).
  4. One training row per chunk, carrying its trace's advantage and total generated length
     (train/rl_rows.py), padded to batch_size x grpo.minibatches rows of seq_len tokens.
  5. old log-probs of every row under the current parameters (Setup.logprobs), then
     grpo.minibatches optimizer steps, minibatch k = rows k, k + M, ...

The learning-rate schedule runs over optimizer steps: total_steps x minibatches, and warmup
optimizer.warmup_steps x minibatches (both fields count RL steps in a GRPO config). The
state's `step` counts optimizer steps; the RL step is step // minibatches.

The rollout runs on every process on its first local device, with the full parameters (one
host copy per RL step), and every process builds the same rows and keeps its share of each
minibatch; the update is sharded like pretraining. Checkpoints hold the train state (params,
optimizer state, step, rng) and, as the data item, the problem iterator's state.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from adaptive.envs import DelethinkEnv, LongCoTEnv
from adaptive.tasks import ChatTemplate, make_task, reward_on_window
from models import decoding
from train import checkpoint as checkpoint_lib
from train import grpo as grpo_lib
from train import metrics as metrics_lib
from train import rl_rows, sharding, trainer
from train import rollout as rollout_lib
from train.problem_iterator import ProblemIterator
from train.tokenizer import load_tokenizer


def optimizer_config(config, minibatches: int):
  """A copy of `config` whose total_steps and warmup count optimizer steps (for the schedule)."""
  copy = config.copy_and_resolve_references()
  with copy.unlocked():
    copy.total_steps = int(config.total_steps) * minibatches
    copy.optimizer.warmup_steps = int(config.optimizer.warmup_steps) * minibatches
  return copy


def make_env(rl, eos_ids):
  """The environment the rl section describes."""
  if rl.env == "delethink":
    return DelethinkEnv(
      rl.chunk_size, rl.carryover, rl.max_chunks, eos_ids, keep_head=rl.keep_head, mode=rl.mode
    )
  return LongCoTEnv(rl.budget, eos_ids)


class Prompter:
  """Problem -> query token ids (chat template applied) and token ids -> text.

  Queries are encoded as the SFT data does (train/sft_data.py's encode_prompt: BOS ⊕ text for
  the byte tokenizer, the text alone for a Hugging Face one, whose template writes its BOS), so
  a policy fine-tuned there sees the same prompts here.
  """

  def __init__(self, rl):
    self.tokenizer = load_tokenizer(rl.tokenizer)
    spec = rl.chat_template
    if spec == "plain" or (spec == "auto" and rl.tokenizer == "byte"):
      self.template = ChatTemplate.plain()
    else:
      directory = os.path.dirname(os.path.abspath(rl.tokenizer)) if spec == "auto" else spec
      self.template = ChatTemplate.from_tokenizer_dir(directory)

  def query(self, question: str) -> np.ndarray:
    from train.sft_data import encode_prompt

    return encode_prompt(self.tokenizer, self.template.render(question))

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids)


class _Stream:
  """The problem iterator as the checkpoint's data item (get_state/set_state)."""

  def __init__(self, problems: ProblemIterator):
    self.problems = problems

  def get_state(self):
    return {"problems": self.problems.get_state()}

  def set_state(self, state):
    self.problems.set_state(state["problems"])


def _rollout_model(setup, state):
  """The model with the state's parameters, whole, on this process's first local device."""
  from flax import nnx

  parts = {"params": state["params"]}
  if "model_state" in state:
    parts["model_state"] = state["model_state"]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    parts = multihost_utils.process_allgather(parts, tiled=True)
  parts = jax.device_put(parts, jax.local_devices()[0])
  if "model_state" in parts:
    return nnx.merge(setup.graphdef, parts["params"], parts["model_state"])
  return nnx.merge(setup.graphdef, parts["params"])


def _local_rows(batch: dict) -> dict:
  """This process's share (contiguous, in process order) of a global host batch."""
  rows = next(iter(batch.values())).shape[0] // jax.process_count()
  start = jax.process_index() * rows
  return {k: v[start : start + rows] for k, v in batch.items()}


def _step_key(state, rl_step: int):
  rng = np.asarray(state["rng"].addressable_data(0))
  return jax.random.fold_in(jax.random.wrap_key_data(rng), rl_step)


def rl_step(config, setup, state, problems: ProblemIterator, prompter: Prompter, task, step: int):
  """One RL step (rollout, rewards, rows, old log-probs, minibatch updates).

  Returns (new state, host metrics of the step as a flat dict of floats).
  """
  rl, cfg = config.rl, grpo_lib.GRPOConfig.from_config(config.grpo)
  g, minibatches = cfg.group_size, cfg.minibatches
  drawn = problems.take(rl.prompts_per_step)
  queries = [prompter.query(p.question) for _, p in drawn]
  env = make_env(rl, [prompter.tokenizer.eos_id])
  started = time.perf_counter()
  result = rollout_lib.rollout(
    _rollout_model(setup, state),
    env,
    queries,
    num_samples=g,
    sampling=decoding.Sampling(temperature=float(rl.temperature), top_p=float(rl.top_p)),
    rng=_step_key(state, step),
    problem_ids=[i for i, _ in drawn],
    prompt_buckets=tuple(rl.prompt_buckets) or None,
    pad_id=prompter.tokenizer.pad_id,
  )
  rollout_seconds = time.perf_counter() - started

  started = time.perf_counter()
  windows = env.visible_windows
  rewards_R = np.array(
    [
      reward_on_window(
        task,
        drawn[p][1],
        prompter.decode(windows[r]),
        require_think=bool(rl.require_think),
      )
      for r, p in enumerate(result.problem_index)
    ],
    np.float32,
  )
  advantages_R = np.asarray(
    grpo_lib.group_advantages(rewards_R.reshape(-1, g), cfg.advantage, cfg.std_eps)
  ).reshape(-1)
  rows = rl_rows.chunk_rows(
    result.traces,
    advantages_R,
    rows=int(config.batch_size) * minibatches,
    seq_len=int(config.seq_len),
    pad_id=prompter.tokenizer.pad_id,
  )
  rows.pop("trace_index")
  minis = [_local_rows(rl_rows.take_minibatch(rows, k, minibatches)) for k in range(minibatches)]
  # Old log-probs of every minibatch before the first update of this RL step.
  batches = []
  for mini in minis:
    fields = [k for k in setup.objective.batch_dtypes if k != "old_logprobs"]
    batch = trainer.device_batch(mini, setup, fields=fields)
    batch["old_logprobs"] = setup.logprobs(state, batch)
    batches.append(batch)
  step_metrics = []
  for batch in batches:
    state, metrics = setup.train_step(state, batch)
    step_metrics.append(metrics)
  step_metrics = jax.device_get(step_metrics)
  update_seconds = time.perf_counter() - started

  lengths = env.trace_lengths
  mean = lambda key: float(np.mean([float(m[key]) for m in step_metrics]))
  record = {
    "reward": float(rewards_R.mean()),
    "accuracy": float((rewards_R >= 1.0).mean()),
    "trace_length_mean": float(lengths.mean()),
    "trace_length_max": int(lengths.max()),
    "chunks_per_trace": float(env.num_chunks.mean()),
    "eos_rate": float(result.ended_on_eos.mean()),
    "longest_context": int(env.longest_contexts.max()),
    "loss": mean("loss"),
    "policy_loss": mean("grpo/policy_loss"),
    "clip_fraction": mean("grpo/clip_low_fraction") + mean("grpo/clip_high_fraction"),
    "dual_clip_fraction": mean("grpo/dual_clip_fraction"),
    "approx_kl": mean("grpo/approx_kl"),
    "importance_capped_fraction": mean("grpo/importance_capped_fraction"),
    "entropy": mean("grpo/entropy"),
    "grad_norm": mean("grad_norm"),
    "learning_rate": float(step_metrics[-1]["learning_rate"]),
    "train_rows": int(sum(len(t) for t in result.traces)),
    "nonfinite_steps": int(step_metrics[-1]["nonfinite_total"]),
    "nonfinite_streak": int(step_metrics[-1]["nonfinite_streak"]),
    "rollout_seconds": rollout_seconds,
    "update_seconds": update_seconds,
    "rollout_tokens_per_second": result.stats.tokens_per_second,
    "rollout_tokens": result.stats.generated_tokens,
    "rollout_compiles": result.stats.compiles,
  }
  return state, record


def progress_line(step: int, total: int, record: dict) -> str:
  """One readable line of an RL step's figures."""
  return (
    f"rl step {step}/{total} | reward {record['reward']:.3f} | acc {record['accuracy']:.3f} | "
    f"len {record['trace_length_mean']:.0f} (max {record['trace_length_max']}) | "
    f"chunks {record['chunks_per_trace']:.2f} | eos {record['eos_rate']:.2f} | "
    f"ctx {record['longest_context']} | loss {record['loss']:.4f} | "
    f"clip {record['clip_fraction']:.3f} | kl {record['approx_kl']:.2e} | "
    f"rollout {record['rollout_seconds']:.1f}s ({record['rollout_tokens_per_second']:.0f} tok/s) "
    f"| update {record['update_seconds']:.1f}s"
  )


def train_and_evaluate(config, workdir: str, *, run, devices) -> dict:
  """Runs (or resumes) a GRPO run; returns the summary dict train.main's CLI prints."""
  from train import main as main_lib

  cfg = grpo_lib.GRPOConfig.from_config(config.grpo)
  minibatches = cfg.minibatches
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  setup = trainer.setup(
    run, optimizer_config(config, minibatches), mesh, objective=grpo_lib.objective(cfg)
  )
  task = make_task(config.rl.task, **dict(config.rl.task_options))
  prompter = Prompter(config.rl)
  problems = ProblemIterator(
    task, split="train", seed=int(config.seed), pool=int(config.rl.train_problems)
  )
  stream = _Stream(problems)
  with main_lib._ClosingAll() as closing:
    writer = closing.add(metrics_lib.MetricsWriter(workdir, enabled=is_main))
    ckpt = closing.add(
      checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
      )
    )
    state, how = main_lib._initial_state(config, setup, run, mesh, ckpt, stream, writer)
    step_opt = int(jax.device_get(state["step"].addressable_data(0)))
    if step_opt % minibatches:
      raise ValueError(
        f"grpo.minibatches={minibatches}: the checkpoint's optimizer step {step_opt} is not a "
        f"whole number of RL steps (was it written with another grpo.minibatches?)"
      )
    step, total = step_opt // minibatches, int(config.total_steps)
    if is_main:
      print(
        f"{how}: {trainer.num_params(setup.abstract_state) / 1e6:.2f}M parameters, mesh "
        f"{dict(mesh.shape)}, {jax.process_count()} process(es), GRPO on {config.rl.task} "
        f"({config.rl.env}), rl step {step}/{total}",
        flush=True,
      )
    preemption = main_lib._Preemption()
    summary = {"status": "completed", "losses": {}, "rewards": {}}
    saver = main_lib._Saver(ckpt, setup, stream, step)

    try:
      while step < total:
        if preemption.reached(step):
          saver.save(step, state)
          summary["status"] = "preempted"
          if is_main:
            print(f"SIGTERM: saved checkpoint at step {step}; exiting", flush=True)
          break
        started = time.perf_counter()
        state, record = rl_step(config, setup, state, problems, prompter, task, step)
        step += 1
        record["seconds_per_step"] = time.perf_counter() - started
        if record["nonfinite_streak"] >= config.max_nonfinite_steps:
          raise main_lib.NonFiniteError(
            f"rl step {step}: {record['nonfinite_streak']} consecutive optimizer steps had a "
            f"non-finite loss or gradient (max_nonfinite_steps={config.max_nonfinite_steps})"
          )
        writer.write(step, record)
        summary["losses"][step] = record["loss"]
        summary["rewards"][step] = record["reward"]
        if is_main and (step % config.log_every == 0 or step == total or step == 1):
          print(progress_line(step, total, record), flush=True)
        if config.checkpoint_every and step % config.checkpoint_every == 0 or step == total:
          saver.save(step, state)
    finally:
      preemption.restore()
  summary["step"] = step
  return summary
