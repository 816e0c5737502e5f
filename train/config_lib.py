"""Validation of a training config before anything compiles.

    run = validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    run.mesh_shape   # {"data": 8, "fsdp": 1, "tensor": 1}
    run.model_config # the model's validated Config dataclass

Every check raises ValueError with a message that names the field, the bad
value and what is allowed. The config files under configs/ lock their
ConfigDict, so a command-line override of a field that does not exist fails in
ml_collections before this module runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
from collections.abc import Mapping, Sequence
from typing import Any

from models import registry
from train import sharding

SCHEDULES = ("cosine", "constant", "linear")
# config.objective: "lm" (pretraining, the default when absent), "sft" (loss on response tokens
# of the data section's chat-formatted rows) or "grpo" (the RL loop of train/rl.py).
OBJECTIVES = ("lm", "sft", "grpo")
DATA_LOADING = ("sharded", "replicated")
REQUIRED_FIELDS = (
  "seed",
  "total_steps",
  "batch_size",
  "seq_len",
  "checkpoint_every",
  "eval_every",
  "eval_steps",
  "log_every",
  "mesh",
  "logical_axis_rules",
  "model",
  "optimizer",
  "data",
  "init_from",
  "keep_checkpoints",
  "max_nonfinite_steps",
  "profile_steps",
)
OPTIMIZER_FIELDS = (
  "learning_rate",
  "schedule",
  "warmup_steps",
  "min_learning_rate_ratio",
  "weight_decay",
  "b1",
  "b2",
  "eps",
  "grad_clip_norm",
  "grad_accum_steps",
)


@dataclasses.dataclass(frozen=True)
class Run:
  """What validation resolved: the concrete mesh shape and model config."""

  mesh_shape: dict[str, int]
  model_kind: str
  model_config: Any
  micro_batch_size: int
  objective: str = "lm"


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int, meaning: str = "") -> None:
  if not _is_int(value) or value < minimum:
    allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ValueError(f"{name}={value!r}: must be {allowed}{meaning}")


def _check_float(
  name: str, value, low: float, high: float, *, low_open=False, high_open=False
) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if ok:
    ok = (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high
    )
  if not ok:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    raise ValueError(f"{name}={value!r}: must be a finite number in {lo}{low}, {high}{hi}")


def model_fields(config) -> tuple[str, dict[str, Any]]:
  """(kind, fields) of the config's model section."""
  fields = dict(config.model)
  kind = fields.pop("kind", "dense")
  return kind, fields


def objective_name(config) -> str:
  """config.objective ("lm" when the config has no such field), checked."""
  name = config.get("objective", "lm")
  if name not in OBJECTIVES:
    raise ValueError(f"objective={name!r}; allowed: {list(OBJECTIVES)}")
  return name


def validate(config, *, num_devices: int, process_count: int = 1) -> Run:
  """Checks every field of a training config; returns the resolved Run.

  A "grpo" config has no data section; its rl and grpo sections are checked instead
  (train/rl_config.py).
  """
  objective = objective_name(config)
  required = REQUIRED_FIELDS
  if objective == "grpo":
    required = tuple(f for f in REQUIRED_FIELDS if f != "data") + ("rl", "grpo")
  missing = [f for f in required if f not in config]
  if missing:
    raise ValueError(
      f"config.{missing[0]}: required field is missing; a {objective} training config "
      f"has {list(required)}"
    )
  _check_int("seed", config.seed, 0)
  _check_int("total_steps", config.total_steps, 1)
  _check_int("batch_size", config.batch_size, 1, " (global batch, in sequences)")
  _check_int("seq_len", config.seq_len, 2)
  _check_int("checkpoint_every", config.checkpoint_every, 0, " (0 = only at the end)")
  _check_int("eval_every", config.eval_every, 0, " (0 = never)")
  _check_int("eval_steps", config.eval_steps, 1)
  _check_int("log_every", config.log_every, 1)
  _check_int("keep_checkpoints", config.keep_checkpoints, 1)
  _check_int("max_nonfinite_steps", config.max_nonfinite_steps, 1)
  if not isinstance(config.init_from, str):
    raise ValueError(f"init_from={config.init_from!r}: must be a path string ('' = none)")
  profile = tuple(config.profile_steps)
  if profile and (
    len(profile) != 2 or not all(_is_int(s) for s in profile) or not 0 <= profile[0] < profile[1]
  ):
    raise ValueError(
      f"profile_steps={config.profile_steps!r}: must be () or (start, stop) with 0 <= start < stop"
    )

  data_loading = config.get("data_loading", "sharded")
  if data_loading not in DATA_LOADING:
    raise ValueError(f"data_loading={data_loading!r}; allowed: {list(DATA_LOADING)}")

  # Mesh and rules.
  mesh_shape = sharding.resolve_mesh_shape(dict(config.mesh), num_devices)
  sharding.rules_dict(config.logical_axis_rules)
  dp = sharding.data_parallel_size(mesh_shape)

  # Optimizer.
  opt = config.optimizer
  missing = [f for f in OPTIMIZER_FIELDS if f not in opt]
  if missing:
    raise ValueError(f"optimizer.{missing[0]}: required field is missing")
  _check_float("optimizer.learning_rate", opt.learning_rate, 0.0, 10.0, low_open=True)
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; allowed: {list(SCHEDULES)}")
  _check_int("optimizer.warmup_steps", opt.warmup_steps, 0)
  if opt.warmup_steps > config.total_steps:
    raise ValueError(
      f"optimizer.warmup_steps={opt.warmup_steps}: must be <= total_steps={config.total_steps}"
    )
  _check_float("optimizer.min_learning_rate_ratio", opt.min_learning_rate_ratio, 0.0, 1.0)
  _check_float("optimizer.weight_decay", opt.weight_decay, 0.0, 10.0)
  _check_float("optimizer.b1", opt.b1, 0.0, 1.0, high_open=True)
  _check_float("optimizer.b2", opt.b2, 0.0, 1.0, high_open=True)
  _check_float("optimizer.eps", opt.eps, 0.0, 1.0, low_open=True)
  _check_float("optimizer.grad_clip_norm", opt.grad_clip_norm, 0.0, math.inf)
  _check_int("optimizer.grad_accum_steps", opt.grad_accum_steps, 1)

  # Batch divisibility.
  if config.batch_size % process_count:
    raise ValueError(
      f"batch_size={config.batch_size}: must be divisible by the process count {process_count}"
    )
  if config.batch_size % opt.grad_accum_steps:
    raise ValueError(
      f"batch_size={config.batch_size}: must be divisible by "
      f"optimizer.grad_accum_steps={opt.grad_accum_steps}"
    )
  micro = config.batch_size // opt.grad_accum_steps
  if micro % dp:
    raise ValueError(
      f"batch_size={config.batch_size}: each micro-batch (batch_size / "
      f"optimizer.grad_accum_steps = {micro}) must be divisible by the data-parallel size "
      f"mesh.data * mesh.fsdp = {dp}"
    )

  # Model.
  kind, fields = model_fields(config)
  model_config = registry.make_config(kind, fields)
  tensor = mesh_shape["tensor"]
  if model_config.num_heads % tensor:
    raise ValueError(
      f"model.num_heads={model_config.num_heads}: must be divisible by mesh.tensor={tensor}"
    )
  if model_config.param_dtype != "float32":
    raise ValueError(
      f"model.param_dtype={model_config.param_dtype!r}: training keeps "
      f"float32 parameters and optimizer state; allowed: ['float32']"
    )

  if objective == "grpo":
    from train import rl_config

    vocab = rl_config.validate(config, dp=dp, process_count=process_count)
  else:
    # Data (the data module validates its own section).
    from train import data as data_lib

    data_lib.validate_data_config(
      config.data,
      seq_len=config.seq_len,
      global_batch_size=config.batch_size,
      process_count=process_count,
    )
    vocab = tokenizer_vocab_size(config.data)
  if vocab is not None and model_config.vocab_size < vocab:
    raise ValueError(
      f"model.vocab_size={model_config.vocab_size}: must be >= the "
      f"tokenizer's vocabulary size {vocab}"
    )
  return Run(
    mesh_shape=mesh_shape,
    model_kind=kind,
    model_config=model_config,
    micro_batch_size=micro,
    objective=objective,
  )


def tokenizer_vocab_size(data_config: Mapping[str, Any]) -> int | None:
  """Vocabulary size of the data section's tokenizer, or None if it names none."""
  spec = data_config.get("tokenizer") if hasattr(data_config, "get") else None
  if spec is None:
    return None
  from train import tokenizer as tokenizer_lib

  return tokenizer_lib.load_tokenizer(spec).vocab_size


def load_config_file(spec: str):
  """get_config() of a config file given as PATH or PATH:ARG (the --config flag's value)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_adaptive_config", path)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f"--config={spec!r}: not a Python config file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_override_paths(config, argv: Sequence[str]) -> None:
  """Every `--config.A.B=V` in argv names an existing field of `config`.

  Raises ValueError naming the full dotted path, the fields its section has and
  the closest one, before ml_collections reports only the last key.
  """
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config.") :].split("=", 1)[0]
    section, walked = config, []
    for key in path.split("."):
      fields = list(section.keys()) if hasattr(section, "keys") else []
      if key not in fields:
        where = ".".join(walked) or "the config"
        dotted = ".".join([*walked, key])
        if not fields:
          raise ValueError(f"{dotted}: no such field; {where} is a value, not a section")
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean {'.'.join([*walked, close[0]])}?" if close else ""
        raise ValueError(f"{dotted}: no such field; {where} has fields {sorted(fields)}{hint}")
      section, walked = section[key], [*walked, key]
