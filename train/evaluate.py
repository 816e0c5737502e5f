"""Evaluation CLI: accuracy and accuracy versus thinking budget on held-out problems.

    python -m train.evaluate --config=configs/sft_traces.py --workdir=DIR [--output=eval.json]
        [--config.rl_eval.heldout=200 --config.init_from=/path/to/hf_model ...]

The model: the newest committed checkpoint in DIR/checkpoints, else `config.init_from` (a
Hugging Face directory with config.json, or another run's checkpoint directory). Held-out
problems of `rl_eval.task` are rendered with the data section's chat template and tokenized
as SFT prompts are (`train.sft_data.encode_prompt`), then every environment in `rl_eval.envs`
runs on them (`train.rollout`, with a progress bar) with `rl_eval.num_samples` samples each. A
few traces are printed with their chunk boundaries marked, and DIR/`rl_eval.output` gets:

    {"model": ..., "task": ..., "problems": N, "num_samples": G, "temperature": T,
     "accuracy", "stderr", "problem_stderr", "count", "mean_thinking_tokens"
                                                            (the first env, its largest setting)
     "delethink": {"chunk_size", "carryover", "keep_head", "mode", "accuracy", ...,
                   "curve": [{"max_chunks", "thinking_budget", "accuracy", "stderr", "count",
                              "mean_thinking_tokens", "eos_rate"}, ...]},
     "longcot":   {"budget", "accuracy", ..., "curve": [{"budget", ...}, ...]},
     "seconds": wall time}

accuracy is the mean reward over the N * G traces, stderr its binomial standard error
sqrt(p (1 - p) / count); thinking tokens are generated tokens (EOS included). Each curve point
also has problem_accuracy (per held-out problem, in order: the mean reward of its G traces)
and problem_stderr (the standard error with problems as the units: std(problem_accuracy) /
sqrt(N)), from which two models on the same problems can be compared pairwise.

Accuracy versus budget comes from ONE generation per trace at the largest setting:
- Delethink, cap I in `rl_eval.max_chunks`: the trace's first I chunks are exactly the trace a
  run with max_chunks = I would produce (chunk c's prompt depends only on earlier chunks and
  its sampling key only on (problem, sample, c)); it is scored as the reference scores a trace
  cut at the cap: the reward of chunk I's visible window (its carry ⊕ its output).
- LongCoT, budget b in `rl_eval.longcot_budgets` (as the paper trims LongCoT traces): the
  first b tokens of the generation. The answer is read as everywhere else (the last complete
  `\\boxed{}` after the first `</think>`), so a trimmed trace without `</think>` or without a
  complete box scores 0. Because that rule lets a later box replace an earlier one, scoring
  each prefix alone would not be monotone in b (a trace that boxes the right answer, then a
  wrong one, would win at a middle budget and lose in full). So a trace earns its full reward
  from the smallest listed budget b from which every listed prefix >= b has the full trace's
  answer, and 0 below it: the curve is monotone and ends at the full generation's accuracy, and
  for a trace that never revises its answer it equals scoring each prefix alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from adaptive import envs as envs_lib
from adaptive import tasks as tasks_lib

ENVS = ("delethink", "longcot")
DELETHINK_MODES = ("inference", "train")


def default_rl_eval_config() -> ml_collections.ConfigDict:
  """The `rl_eval` section: what is evaluated and how (CPU-sized defaults)."""
  return ml_collections.ConfigDict(
    dict(
      task="long_sum",  # an adaptive.tasks name
      task_options=ml_collections.ConfigDict(),  # its make_task options
      heldout=32,  # held-out problems evaluated
      seed=0,  # which held-out problems, and the sampling keys
      envs=("delethink", "longcot"),  # evaluated in this order; the first is the headline
      chunk_size=64,  # Delethink C
      carryover=32,  # Delethink m
      keep_head=8,  # Delethink: tokens of the first chunk (inference) / of the carry (train) kept
      mode="inference",  # Delethink carry rule: "inference" (Algorithm 1) or "train"
      max_chunks=(1, 2, 3, 4),  # Delethink caps I (test-time scaling); one run at the largest
      longcot_budgets=(32, 64, 128, 160),  # LongCoT budgets; one run at the largest, trimmed
      temperature=0.6,  # 0 = greedy
      top_p=1.0,
      num_samples=1,  # G traces per problem
      batch_problems=32,  # problems per rollout call (rows = batch_problems * G)
      print_samples=2,  # traces printed with their chunk boundaries
      require_think=True,  # an answer must follow </think>
      output="eval.json",  # file name in the workdir
    )
  )


# ----------------------------------------------------------------------------- validation


def _fail(field: str, value, allowed: str):
  raise ValueError(f"rl_eval.{field}={value!r}: {allowed}")


def _is_int(value) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_int(ev, field: str, minimum: int) -> int:
  if not _is_int(ev[field]) or ev[field] < minimum:
    _fail(field, ev[field], f"must be an integer >= {minimum}")
  return int(ev[field])


def _check_increasing(ev, field: str) -> tuple[int, ...]:
  values = ev[field]
  if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
    _fail(field, values, "must be a non-empty tuple of increasing positive integers")
  if not all(_is_int(v) and v >= 1 for v in values) or list(values) != sorted(set(values)):
    _fail(field, values, "must be a non-empty tuple of increasing positive integers")
  return tuple(int(v) for v in values)


def validate_rl_eval(ev) -> tasks_lib.Task:
  """Checks the rl_eval section (ValueError names the field); returns its task. No compiles."""
  missing = [f for f in default_rl_eval_config() if f not in ev]
  if missing:
    _fail(missing[0], None, "missing field; start from train.evaluate.default_rl_eval_config()")
  for field in ("heldout", "num_samples", "batch_problems"):
    _check_int(ev, field, 1)
  for field in ("seed", "print_samples"):
    _check_int(ev, field, 0)
  envs = ev.envs
  if isinstance(envs, str) or not envs or not set(envs) <= set(ENVS) or len(set(envs)) != len(envs):
    _fail("envs", envs, f"must be a non-empty tuple of distinct names from {list(ENVS)}")
  if "delethink" in envs:
    if ev.mode not in DELETHINK_MODES:
      _fail("mode", ev.mode, f"allowed {list(DELETHINK_MODES)}")
    caps = _check_increasing(ev, "max_chunks")
    try:
      envs_lib.DelethinkEnv(ev.chunk_size, ev.carryover, caps[-1], [0], ev.keep_head, ev.mode)
    except ValueError as e:
      named = str(e).split("=", 1)[0]  # the environment's message starts with its argument
      field = named if named in ("chunk_size", "carryover", "keep_head") else "chunk_size"
      raise ValueError(f"rl_eval.{field}: {e}") from e
  if "longcot" in envs:
    _check_increasing(ev, "longcot_budgets")
  t = ev.temperature
  if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
    _fail("temperature", t, "must be a finite number >= 0 (0 = greedy)")
  p = ev.top_p
  if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
    _fail("top_p", p, "must be in (0, 1]")
  if not isinstance(ev.require_think, bool):
    _fail("require_think", ev.require_think, "must be True or False")
  if not isinstance(ev.output, str) or not ev.output or os.sep in ev.output:
    _fail("output", ev.output, "must be a file name (written in the workdir)")
  options = ev.task_options
  if not hasattr(options, "keys"):
    _fail("task_options", options, "must be a ConfigDict of the task's options")
  try:
    tasks_lib.make_task(ev.task)
  except ValueError as e:
    raise ValueError(f"rl_eval.task={ev.task!r}: {e}") from e
  try:
    return tasks_lib.make_task(ev.task, **dict(options))
  except ValueError as e:
    raise ValueError(f"rl_eval.task_options={dict(options)!r}: {e}") from e


def rl_eval_section(config) -> ml_collections.ConfigDict:
  """config.rl_eval; a GRPO config without one is evaluated from its rl section (its task and
  environment, caps 1..2I for Delethink, budgets B/4, B/2, B for LongCoT)."""
  if "rl_eval" in config:
    return config.rl_eval
  if "rl" not in config:
    raise ValueError(
      "config.rl_eval: missing section; add train.evaluate.default_rl_eval_config() to the config"
    )
  rl, ev = config.rl, default_rl_eval_config()
  for field in ("task", "chunk_size", "carryover", "keep_head", "mode", "temperature", "top_p"):
    ev[field] = rl[field]
  ev.task_options = ml_collections.ConfigDict(dict(rl.task_options))
  ev.require_think = rl.require_think
  ev.envs = (rl.env,)
  ev.max_chunks = tuple(range(1, 2 * int(rl.max_chunks) + 1))
  ev.longcot_budgets = tuple(sorted({max(1, int(rl.budget) // d) for d in (4, 2, 1)}))
  return ev


def prompting(config):
  """(tokenizer, chat template) of the run: the rl section's (GRPO) or the data section's."""
  from train import sft_data
  from train.tokenizer import load_tokenizer

  if "rl" in config:
    section = ml_collections.ConfigDict(
      {"tokenizer": config.rl.tokenizer, "chat_template": config.rl.chat_template or "auto"}
    )
  else:
    section = config.data
  return load_tokenizer(section.tokenizer), sft_data.chat_template(section)


# ----------------------------------------------------------------------------- scoring


def summary(rewards, thinking, problem_index, num_problems: int) -> dict:
  """accuracy (mean reward), its binomial standard error, count, mean thinking tokens; and per
  problem (rows grouped by `problem_index`, int [count], into `num_problems`): its mean reward,
  and the standard error that takes problems as the units (a problem's samples are not
  independent draws). rewards, thinking: float [count]."""
  count = int(rewards.size)
  accuracy = float(rewards.mean()) if count else 0.0
  per_problem = np.bincount(problem_index, weights=rewards, minlength=num_problems) / np.maximum(
    np.bincount(problem_index, minlength=num_problems), 1
  )
  return {
    "accuracy": accuracy,
    "stderr": math.sqrt(accuracy * (1 - accuracy) / count) if count else 0.0,
    "problem_stderr": float(per_problem.std(ddof=1) / math.sqrt(num_problems))
    if num_problems > 1
    else 0.0,
    "count": count,
    "mean_thinking_tokens": float(thinking.mean()) if count else 0.0,
    "problem_accuracy": [round(float(x), 6) for x in per_problem],
  }


def delethink_curve(task, problems, queries, result, caps, decode, require_think) -> list[dict]:
  """Per cap I: the reward of chunk I's visible window (or the trace's last, if shorter)."""
  curve, problem_index = [], np.asarray(result.problem_index, np.int64)
  for cap in caps:
    rewards, thinking, eos = [], [], []
    for row, trace in enumerate(result.traces):
      p = int(result.problem_index[row])
      chunks = trace[:cap]
      last = chunks[-1]
      window = np.concatenate([last.prompt[len(queries[p]) :], last.output])
      rewards.append(
        tasks_lib.reward_on_window(task, problems[p], decode(window), require_think=require_think)
      )
      thinking.append(sum(len(c.output) for c in chunks))
      eos.append(len(trace) <= cap and bool(result.ended_on_eos[row]))
    point = {
      "max_chunks": cap,
      **summary(np.array(rewards), np.array(thinking), problem_index, len(problems)),
    }
    point["eos_rate"] = float(np.mean(eos)) if eos else 0.0
    curve.append(point)
  return curve


def longcot_curve(task, problems, result, budgets, decode, require_think) -> list[dict]:
  """Per budget b: the trimmed-trace rule of the module docstring (monotone in b)."""
  rewards = np.zeros((len(budgets), len(result.traces)))
  thinking = np.zeros_like(rewards)
  for row, trace in enumerate(result.traces):
    problem = problems[int(result.problem_index[row])]
    output = trace[0].output
    full_text = decode(output)
    full_answer = tasks_lib.extract_answer(full_text, require_think=require_think)
    full_reward = task.score(problem, full_text, require_think=require_think)
    settled = True  # every listed prefix from this budget up has the full trace's answer
    for i in reversed(range(len(budgets))):
      prefix = decode(output[: budgets[i]])
      settled = (
        settled and tasks_lib.extract_answer(prefix, require_think=require_think) == full_answer
      )
      rewards[i, row] = full_reward if settled else 0.0
      thinking[i, row] = min(len(output), budgets[i])
  index = np.asarray(result.problem_index, np.int64)
  return [
    {"budget": b, **summary(rewards[i], thinking[i], index, len(problems))}
    for i, b in enumerate(budgets)
  ]


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class Rollouts:
  """What a rollout function returns (the fields of `train.rollout.Rollout` evaluation reads)."""

  traces: list
  ended_on_eos: np.ndarray
  problem_index: np.ndarray


def _batched(rollout_fn, env, queries, ev, sampling, rng, progress) -> Rollouts:
  """`rollout_fn` over batches of `batch_problems` problems; rows stay problem-major."""
  traces, eos, index = [], [], []
  for start in range(0, len(queries), ev.batch_problems):
    ids = list(range(start, min(start + ev.batch_problems, len(queries))))
    result = rollout_fn(
      env,
      [queries[i] for i in ids],
      num_samples=ev.num_samples,
      sampling=sampling,
      rng=rng,
      problem_ids=ids,
      progress=progress,
    )
    traces.extend(result.traces)
    eos.extend(np.asarray(result.ended_on_eos).tolist())
    index.extend(ids[int(p)] for p in result.problem_index)
  return Rollouts(traces, np.array(eos, bool), np.array(index, np.int32))


def print_samples(env_name, problems, queries, result, decode, count, file=None) -> None:
  """The first `count` traces, each chunk's output after a `‖ chunk k ‖` marker."""
  file = sys.stdout if file is None else file
  for row in range(min(count, len(result.traces))):
    p = int(result.problem_index[row])
    trace = result.traces[row]
    end = "EOS" if result.ended_on_eos[row] else "cut"
    print(
      f"\n=== {env_name} sample {row}: problem {p}, answer {problems[p].answer!r}, "
      f"{len(trace)} chunk(s), {sum(len(c.output) for c in trace)} tokens, ended: {end} ===",
      file=file,
    )
    print(decode(queries[p]), file=file)
    for k, chunk in enumerate(trace, 1):
      carry = len(chunk.prompt) - len(queries[p])
      print(f"‖ chunk {k} (carry {carry} tokens) ‖ {decode(chunk.output)}", file=file)


def evaluate(
  ev, rollout_fn: Callable, tokenizer, template, *, progress: bool = False, out=None
) -> dict:
  """Runs every env of the rl_eval section `ev` on its held-out problems; returns the results.

  rollout_fn(env, queries, *, num_samples, sampling, rng, problem_ids, progress) -> an object
  with `traces`, `ended_on_eos`, `problem_index` (as `train.rollout.rollout` with its model
  bound; tests pass a scripted generator).
  """
  import jax

  from models import decoding
  from train import sft_data

  task = validate_rl_eval(ev)
  started = time.perf_counter()
  problems = task.problems("heldout", int(ev.heldout), seed=int(ev.seed))
  queries = [sft_data.encode_prompt(tokenizer, template.render(p.question)) for p in problems]
  sampling = decoding.Sampling(temperature=float(ev.temperature), top_p=float(ev.top_p))
  rng = None if sampling.greedy else jax.random.key(int(ev.seed))
  decode, eos = tokenizer.decode, [int(tokenizer.eos_id)]
  results = {
    "task": ev.task,
    "task_options": dict(ev.task_options),
    "problems": len(problems),
    "num_samples": int(ev.num_samples),
    "temperature": float(ev.temperature),
  }
  for name in ev.envs:
    if name == "delethink":
      caps = tuple(ev.max_chunks)
      env = envs_lib.DelethinkEnv(
        ev.chunk_size, ev.carryover, caps[-1], eos, keep_head=ev.keep_head, mode=ev.mode
      )
      result = _batched(rollout_fn, env, queries, ev, sampling, rng, progress)
      curve = delethink_curve(task, problems, queries, result, caps, decode, ev.require_think)
      for point in curve:
        point["thinking_budget"] = ev.chunk_size + (point["max_chunks"] - 1) * (
          ev.chunk_size - ev.carryover
        )
      section = dict(chunk_size=ev.chunk_size, carryover=ev.carryover, keep_head=ev.keep_head)
      section["mode"] = ev.mode
    else:
      budgets = tuple(ev.longcot_budgets)
      env = envs_lib.LongCoTEnv(budgets[-1], eos)
      result = _batched(rollout_fn, env, queries, ev, sampling, rng, progress)
      curve = longcot_curve(task, problems, result, budgets, decode, ev.require_think)
      section = {"budget": budgets[-1]}
    section.update({k: curve[-1][k] for k in ("accuracy", "stderr", "problem_stderr", "count")})
    section["mean_thinking_tokens"] = curve[-1]["mean_thinking_tokens"]
    section["curve"] = curve
    results[name] = section
    print_samples(name, problems, queries, result, decode, int(ev.print_samples), file=out)
  headline = results[ev.envs[0]]
  for key in ("accuracy", "stderr", "problem_stderr", "count", "mean_thinking_tokens"):
    results[key] = headline[key]
  results["seconds"] = time.perf_counter() - started
  return results


def load_model(config, workdir: str):
  """(model, what was loaded): DIR/checkpoints' newest committed step, else config.init_from."""
  import jax
  from flax import nnx

  from train import checkpoint as checkpoint_lib
  from train import config_lib, sharding, trainer

  devices = jax.devices()
  run = config_lib.validate(config, num_devices=len(devices), process_count=jax.process_count())
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  checkpoints = os.path.join(workdir, "checkpoints")
  has_checkpoint = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
  source = checkpoints if has_checkpoint else config.init_from
  if not source:
    raise ValueError(
      f"--workdir={workdir!r}: no checkpoint in {checkpoints} and config.init_from is empty; "
      "train first or set --config.init_from to a checkpoint or Hugging Face directory"
    )
  if not has_checkpoint and checkpoint_lib.is_hf_directory(source):
    from models import hf

    model, _ = hf.load(source, dtype=run.model_config.dtype, mesh=mesh, rules=rules)
    return model, f"Hugging Face model {source}"
  setup = trainer.setup(run, config, mesh, donate=False)
  params = checkpoint_lib.load_params(source, setup.abstract_state["params"])
  if "model_state" in setup.abstract_state:
    from models import registry

    build = lambda: registry.build(run.model_kind, run.model_config, rngs=nnx.Rngs(config.seed))
    rest = jax.jit(
      lambda: nnx.split(build(), nnx.Param, ...)[2].to_pure_dict(),
      out_shardings=setup.state_shardings["model_state"],
    )()
    return nnx.merge(setup.graphdef, params, rest), f"checkpoint {source}"
  return nnx.merge(setup.graphdef, params), f"checkpoint {source}"


def run(config, workdir: str, *, output: str | None = None, model=None, rollout_fn=None) -> dict:
  """Validates, loads the model (unless given), evaluates and writes the JSON; returns it."""
  from train import rollout as rollout_lib

  ev = rl_eval_section(config)
  validate_rl_eval(ev)
  tokenizer, template = prompting(config)
  what = "scripted generator"
  if rollout_fn is None:
    if model is None:
      model, what = load_model(config, workdir)
    else:
      what = "model given in-process"
    rollout_fn = functools.partial(rollout_lib.rollout, model, pad_id=int(tokenizer.pad_id))
  results = {"model": what}
  results.update(evaluate(ev, rollout_fn, tokenizer, template, progress=True))
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, output or ev.output)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  for name in ev.envs:
    section = results[name]
    setting = "max_chunks" if name == "delethink" else "budget"
    curve = ", ".join(f"{p[setting]}: {p['accuracy']:.3f}" for p in section["curve"])
    print(
      f"{name}: accuracy {section['accuracy']:.3f} ± {section['stderr']:.3f} "
      f"(n={section['count']}), mean thinking {section['mean_thinking_tokens']:.1f} tokens; "
      f"by {setting}: {curve}"
    )
  print(f"wrote {path}")
  return results


def main(argv):
  del argv
  from absl import flags

  FLAGS = flags.FLAGS
  try:
    run(FLAGS.config, FLAGS.workdir, output=FLAGS.output)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file with an rl_eval section.")
  flags.DEFINE_string("workdir", None, "Run directory (its checkpoints/ is evaluated).")
  flags.DEFINE_string("output", None, "JSON file name in the workdir (default rl_eval.output).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
