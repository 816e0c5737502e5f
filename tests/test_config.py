"""Malformed configs and overrides fail before anything compiles, naming the field."""

import pytest
from absl import flags
from ml_collections import config_flags

from configs import lm_dense
from train import config_lib

CONFIG_FILE = "configs/lm_dense.py"

# (override path, value, text the message must contain)
MALFORMED = [
  ("seed", -1, "seed=-1"),
  ("total_steps", 0, "total_steps=0"),
  ("batch_size", 12, "batch_size=12"),  # not divisible by data=8
  ("batch_size", 0, "batch_size=0"),
  ("seq_len", 1, "seq_len=1"),
  ("log_every", 0, "log_every=0"),
  ("eval_steps", 0, "eval_steps=0"),
  ("checkpoint_every", -5, "checkpoint_every=-5"),
  ("keep_checkpoints", 0, "keep_checkpoints=0"),
  ("max_nonfinite_steps", 0, "max_nonfinite_steps=0"),
  ("profile_steps", (5, 2), "profile_steps"),
  ("data_loading", "everywhere", "data_loading='everywhere'"),
  ("mesh.data", 3, "mesh"),  # 3 devices != 8
  ("mesh.fsdp", -1, "mesh.fsdp=-1"),  # two -1 axes
  ("mesh.tensor", 0, "mesh.tensor=0"),
  ("logical_axis_rules", (("embed", "model"),), "unknown mesh axis 'model'"),
  ("model.kind", "moe", "model.kind='moe'"),
  ("model.num_heads", 3, "model.num_heads=3"),  # kv heads 2 do not divide it
  ("model.dim", -64, "model.dim=-64"),
  ("model.dtype", "float8", "model.dtype='float8'"),
  ("model.param_dtype", "bfloat16", "model.param_dtype='bfloat16'"),
  ("model.vocab_size", 256, "model.vocab_size=256"),  # byte tokenizer needs 259
  ("optimizer.learning_rate", -1e-3, "optimizer.learning_rate=-0.001"),
  ("optimizer.learning_rate", 0.0, "optimizer.learning_rate=0.0"),
  ("optimizer.schedule", "exponential", "optimizer.schedule='exponential'"),
  ("optimizer.warmup_steps", 10_000, "optimizer.warmup_steps=10000"),
  ("optimizer.weight_decay", -0.1, "optimizer.weight_decay=-0.1"),
  ("optimizer.b2", 1.0, "optimizer.b2=1.0"),
  ("optimizer.grad_clip_norm", -1.0, "optimizer.grad_clip_norm=-1.0"),
  ("optimizer.grad_accum_steps", 0, "optimizer.grad_accum_steps=0"),
  ("optimizer.grad_accum_steps", 4, "grad_accum_steps"),  # 16/4 = 4 rows < data=8
  ("data.source", "nowhere", "data.source='nowhere'"),
  ("data.tasks", ("no_such_task",), "data.tasks"),
]


def set_path(config, path, value):
  *parents, leaf = path.split(".")
  for parent in parents:
    config = config[parent]
  config[leaf] = value


@pytest.mark.parametrize(
  "path,value,message", MALFORMED, ids=[f"{p}={v!r}" for p, v, _ in MALFORMED]
)
def test_malformed_config_names_the_field(path, value, message):
  """config_lib.validate reads the config only: it runs before the model is even traced."""
  config = lm_dense.get_config()  # mesh.data=-1: all 8 devices
  with config.unlocked():
    set_path(config, path, value)
  with pytest.raises(ValueError) as error:
    config_lib.validate(config, num_devices=8)
  assert message in str(error.value)


def test_default_config_is_valid():
  run = config_lib.validate(lm_dense.get_config(), num_devices=8)
  assert run.mesh_shape == {"data": 8, "fsdp": 1, "tensor": 1}
  assert run.model_config.vocab_size >= 259


def parse(argv):
  """Parses command-line overrides of the config file as train.main does."""
  values = flags.FlagValues()
  argv = ["prog", f"--config={CONFIG_FILE}", *argv]
  config_flags.DEFINE_config_file(
    "config", None, "config", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def test_override_of_an_existing_field():
  config = parse(
    ["--config.model.num_layers=2", "--config.optimizer.learning_rate=1e-3", "--config.mesh.fsdp=2"]
  )
  assert config.model.num_layers == 2 and config.optimizer.learning_rate == 1e-3
  assert config.mesh.fsdp == 2


@pytest.mark.parametrize(
  "override", ["--config.no_such_field=1", "--config.model.widht=64", "--config.optimizer.lr=0.1"]
)
def test_override_of_an_unknown_field_is_an_error(override):
  field = override.split("=")[0].split(".")[-1]
  with pytest.raises((KeyError, AttributeError), match=field):
    parse([override])


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.data.name=x", "data.name: no such field; data has fields ["),
    ("--config.total_step=3", "did you mean total_steps?"),
    ("--config.model.dmi=64", "did you mean model.dim?"),
    ("--config.seed.x=1", "seed.x: no such field; seed is a value"),
  ],
)
def test_unknown_override_names_its_dotted_path_and_the_section_fields(override, message):
  with pytest.raises(ValueError) as error:
    config_lib.check_override_paths(config_lib.load_config_file(CONFIG_FILE), [override])
  assert message in str(error.value)
  if override.startswith("--config.data.name"):
    assert "'source'" in str(error.value) and "'tokenizer'" in str(error.value)


def test_existing_overrides_pass_the_path_check():
  config = config_lib.load_config_file(CONFIG_FILE)
  config_lib.check_override_paths(config, ["--config.model.num_layers=2", "--config.mesh.fsdp=2"])


def test_mesh_axis_that_cannot_fit_the_devices_names_the_axis_and_the_device_count():
  config = lm_dense.get_config()  # mesh.data=-1 takes the rest
  config.mesh.tensor = 5
  with pytest.raises(ValueError) as error:
    config_lib.validate(config, num_devices=1)
  assert "mesh.tensor=5" in str(error.value) and "1 device is available" in str(error.value)


def test_override_with_a_wrong_type_is_an_error():
  with pytest.raises(flags.Error, match="total_steps"):
    parse(["--config.total_steps=many"])


def test_config_cannot_grow_new_fields():
  config = lm_dense.get_config()
  with pytest.raises(AttributeError):
    config.totl_steps = 5


@pytest.mark.parametrize("objective", ["lm", "sft"])
def test_objective_lm_and_sft_validate(objective):
  config = lm_dense.get_config()
  with config.unlocked():
    config.objective = objective
  assert config_lib.validate(config, num_devices=8).objective == objective
  assert config_lib.validate(lm_dense.get_config(), num_devices=8).objective == "lm"


def test_unknown_objective_names_the_field():
  config = lm_dense.get_config()
  with config.unlocked():
    config.objective = "ppo"
  with pytest.raises(ValueError, match=r"objective='ppo'; allowed: \['lm', 'sft', 'grpo'\]"):
    config_lib.validate(config, num_devices=8)
