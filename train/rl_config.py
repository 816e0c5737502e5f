"""Validation of a GRPO config's `rl` and `grpo` sections (called by config_lib.validate).

The `rl` section (configs/delethink_grpo.py shows every field):

    env               "delethink" | "longcot"
    chunk_size        Delethink C: chunk 1 generates up to C tokens, later chunks up to C - m
    carryover         Delethink m: tokens carried into the next chunk's prompt
    max_chunks        Delethink I: chunk cap (thinking budget C + (I - 1)(C - m))
    keep_head         Delethink: leading tokens kept in the carry (< m)
    mode              Delethink: "train" (the reference RL carry) | "inference" (Algorithm 1)
    budget            LongCoT: tokens of its one chunk
    task              adaptive.tasks name ("long_sum", "rg:NAME", ...); task_options its options
    prompts_per_step  problems drawn from the task's train split per RL step (P)
    train_problems    0: every drawn problem is new; N: cycle through the split's first N
                      problems (the overfitting check: does the training reward rise?)
    temperature, top_p   sampling of the rollouts
    tokenizer         "byte" or a Hugging Face tokenizer.json path
    chat_template     "auto" (plain for the byte tokenizer, else the tokenizer.json directory's
                      own), "plain", or a Hugging Face tokenizer directory (as data.chat_template)
    require_think     reward needs the answer after `</think>` (the Delethink setting)
    prompt_buckets    prompt lengths the rollout pads to (() = powers of two)

G (samples per prompt) is grpo.group_size and the optimizer steps per RL step grpo.minibatches
(train/grpo.py's GRPOConfig). Every RL step trains on a static number of rows,
batch_size x grpo.minibatches, which must hold P x G x (chunks per trace at most): one row per
chunk, the rest padding; each row is seq_len tokens and must hold a chunk's prompt and output.
"""

from __future__ import annotations

import math
import os

ENVS = ("delethink", "longcot")
MODES = ("train", "inference")
RL_FIELDS = (
  "env",
  "chunk_size",
  "carryover",
  "max_chunks",
  "keep_head",
  "mode",
  "budget",
  "task",
  "task_options",
  "prompts_per_step",
  "train_problems",
  "temperature",
  "top_p",
  "tokenizer",
  "chat_template",
  "require_think",
  "prompt_buckets",
)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _fail(name: str, value, why: str):
  raise ValueError(f"rl.{name}={value!r}: {why}")


def _int(rl, name: str, minimum: int) -> int:
  value = rl[name]
  if not _is_int(value) or value < minimum:
    _fail(name, value, f"must be an integer >= {minimum}")
  return value


def chunks_per_trace(rl) -> int:
  """The most chunks one trace can have (I for Delethink, 1 for LongCoT)."""
  return rl.max_chunks if rl.env == "delethink" else 1


def longest_output(rl) -> int:
  """The most tokens one chunk can generate (C, or the LongCoT budget)."""
  return rl.chunk_size if rl.env == "delethink" else rl.budget


def validate(config, *, dp: int, process_count: int) -> int:
  """Checks config.rl and config.grpo against the rest; returns the tokenizer's vocab size."""
  from train import grpo

  rl = config.rl
  unknown = [k for k in rl.keys() if k not in RL_FIELDS]
  if unknown:
    raise ValueError(f"rl.{unknown[0]}: no such field; rl has fields {list(RL_FIELDS)}")
  missing = [k for k in RL_FIELDS if k not in rl]
  if missing:
    raise ValueError(f"rl.{missing[0]}: required field is missing; rl has {list(RL_FIELDS)}")
  cfg = grpo.GRPOConfig.from_config(config.grpo)

  if rl.env not in ENVS:
    _fail("env", rl.env, f"allowed: {list(ENVS)}")
  if rl.env == "delethink":
    c = _int(rl, "chunk_size", 2)
    m = _int(rl, "carryover", 1)
    if m >= c:
      _fail("carryover", m, f"must be < rl.chunk_size={c}")
    _int(rl, "max_chunks", 1)
    if not _is_int(rl.keep_head) or not 0 <= rl.keep_head < m:
      _fail("keep_head", rl.keep_head, f"must be an integer in [0, rl.carryover={m})")
    if rl.mode not in MODES:
      _fail("mode", rl.mode, f"allowed: {list(MODES)}")
  else:
    _int(rl, "budget", 1)
  _int(rl, "prompts_per_step", 1)
  _int(rl, "train_problems", 0)
  t = rl.temperature
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
    _fail("temperature", t, "must be a finite number > 0 (GRPO needs sampled groups)")
  p = rl.top_p
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
    _fail("top_p", p, "must be a number in (0, 1]")
  if not isinstance(rl.require_think, bool):
    _fail("require_think", rl.require_think, "must be True or False")
  buckets = tuple(rl.prompt_buckets)
  if buckets and (
    not all(_is_int(b) and b > 0 for b in buckets) or list(buckets) != sorted(set(buckets))
  ):
    _fail("prompt_buckets", rl.prompt_buckets, "must be () or increasing positive integers")

  # The task and its options (building it checks the name and every option).
  from adaptive.tasks import make_task

  if not isinstance(rl.task, str) or not rl.task:
    _fail("task", rl.task, "must be a task name, e.g. 'long_sum' or 'rg:chain_sum'")
  try:
    make_task(rl.task, **dict(rl.task_options))
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"rl.task={rl.task!r} with rl.task_options={dict(rl.task_options)}: {e}"
    ) from e

  # Tokenizer and chat template.
  if rl.tokenizer != "byte" and (
    not isinstance(rl.tokenizer, str) or not os.path.isfile(rl.tokenizer)
  ):
    _fail("tokenizer", rl.tokenizer, "expected 'byte' or a path to a tokenizer.json")
  if not isinstance(rl.chat_template, str) or (
    rl.chat_template not in ("auto", "plain") and not os.path.isdir(rl.chat_template)
  ):
    _fail("chat_template", rl.chat_template, "expected 'auto', 'plain' or a tokenizer directory")
  from train import tokenizer as tokenizer_lib

  vocab = tokenizer_lib.load_tokenizer(rl.tokenizer).vocab_size

  # Static shapes of an RL step's rows.
  need = rl.prompts_per_step * cfg.group_size * chunks_per_trace(rl)
  have = config.batch_size * cfg.minibatches
  if have < need:
    raise ValueError(
      f"batch_size={config.batch_size}: an RL step trains on batch_size x grpo.minibatches = "
      f"{have} rows, fewer than rl.prompts_per_step x grpo.group_size x chunks per trace = "
      f"{rl.prompts_per_step} x {cfg.group_size} x {chunks_per_trace(rl)} = {need}; use "
      f"batch_size >= {-(-need // cfg.minibatches)}"
    )
  if config.seq_len < longest_output(rl) + 1:
    raise ValueError(
      f"seq_len={config.seq_len}: a training row holds a chunk's prompt and its up to "
      f"{longest_output(rl)} generated tokens; use seq_len >= longest query + "
      f"{longest_output(rl)}"
    )
  del dp, process_count  # batch_size divisibility is checked by config_lib
  return vocab
