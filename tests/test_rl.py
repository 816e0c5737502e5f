"""The GRPO loop (train/rl.py) through train.main: config errors, metrics, chunk rows, kill -9
and resume, two processes against one.

Tiny sizes: a 1-layer model, C = 16, m = 8, I = 2, 2 prompts x 2 samples. A fresh model never
writes a boxed answer, so the runs here score traces by a stand-in reward (the parity of the
visible window's length) that gives GRPO non-zero advantages to train on.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from cli_env import environment, finish

from adaptive.envs import Chunk
from configs import delethink_grpo, longcot_grpo
from train import config_lib, rl, rl_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 6
OVERRIDES = {
  "total_steps": TOTAL,
  "batch_size": 4,  # 2 prompts x 2 samples x 2 chunks = 8 rows = 4 x 2 minibatches
  "seq_len": 208,
  "checkpoint_every": 1,
  "rl.chunk_size": 16,
  "rl.carryover": 8,
  "rl.max_chunks": 2,
  "rl.keep_head": 2,
  "rl.prompts_per_step": 2,
  "rl.task_options.length": 2,
  "rl.task_options.min_length": 2,
  "rl.prompt_buckets": (192,),
  "grpo.group_size": 2,
  "model.dim": 32,
  "model.num_layers": 1,
  "model.num_heads": 2,
  "model.num_kv_heads": 1,
  "model.head_dim": 16,
  "model.mlp_dim": 64,
  "optimizer.learning_rate": 1e-2,
}
# Wall-clock figures (and compile counts, which a resumed process pays again) differ per run.
TIMING = {
  "rollout_seconds",
  "update_seconds",
  "seconds_per_step",
  "rollout_tokens_per_second",
  "rollout_compiles",
}
FIELDS = {
  "reward",
  "accuracy",
  "trace_length_mean",
  "trace_length_max",
  "chunks_per_trace",
  "eos_rate",
  "clip_fraction",
  "approx_kl",
  "rollout_seconds",
  "update_seconds",
  "rollout_tokens_per_second",
  "longest_context",
  "loss",
  "learning_rate",
  "grad_norm",
}


def parity_reward(task, problem, window_text, *, require_think=True):
  del task, problem, require_think
  return float(len(window_text) % 2 == 0)


def set_path(config, path, value):
  *parents, leaf = path.split(".")
  for parent in parents:
    config = config[parent]
  config[leaf] = value


def tiny_config(**changes):
  config = delethink_grpo.get_config()
  with config.unlocked():
    for path, value in {**OVERRIDES, **changes}.items():
      set_path(config, path, value)
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f)}


def without_timing(records):
  return {s: {k: v for k, v in r.items() if k not in TIMING} for s, r in records.items()}


# ----------------------------------------------------------------------------- config

MALFORMED = [
  ("objective", "rl", "objective='rl'"),
  ("rl.env", "chunked", "rl.env='chunked'"),
  ("rl.chunk_size", 0, "rl.chunk_size=0"),
  ("rl.carryover", 64, "rl.carryover=64"),  # = chunk_size
  ("rl.keep_head", 32, "rl.keep_head=32"),  # = carryover
  ("rl.max_chunks", 0, "rl.max_chunks=0"),
  ("rl.mode", "eval", "rl.mode='eval'"),
  ("rl.task", "no_such_task", "rl.task='no_such_task'"),
  ("rl.task_options.lenght", 3, "lenght"),
  ("rl.prompts_per_step", 0, "rl.prompts_per_step=0"),
  ("rl.train_problems", -1, "rl.train_problems=-1"),
  ("rl.temperature", 0.0, "rl.temperature=0.0"),
  ("rl.top_p", 1.5, "rl.top_p=1.5"),
  ("rl.tokenizer", "/no/tokenizer.json", "rl.tokenizer='/no/tokenizer.json'"),
  ("rl.chat_template", "/no/dir", "rl.chat_template='/no/dir'"),
  ("rl.prompt_buckets", (64, 32), "rl.prompt_buckets=(64, 32)"),
  ("rl.samples", 8, "rl.samples: no such field"),
  ("grpo.clip_low", -0.1, "grpo.clip_low=-0.1"),
  ("grpo.group_size", 1, "grpo.group_size=1"),
  ("grpo.loss_agg", "sum", "grpo.loss_agg='sum'"),
  ("grpo.minibatches", 0, "grpo.minibatches=0"),
  ("grpo.clip", 0.2, "grpo.clip: no such field"),
  ("batch_size", 8, "batch_size=8"),  # 8 x 2 < 4 prompts x 4 samples x 3 chunks
  ("seq_len", 32, "seq_len=32"),  # < C + 1
]


@pytest.mark.parametrize(
  "path,value,message", MALFORMED, ids=[f"{p}={v!r}" for p, v, _ in MALFORMED]
)
def test_malformed_rl_config_names_the_field(path, value, message):
  config = delethink_grpo.get_config()
  with config.unlocked():
    set_path(config, path, value)
  with pytest.raises(ValueError) as error:
    config_lib.validate(config, num_devices=8)
  assert message in str(error.value)


@pytest.mark.parametrize("module", [delethink_grpo, longcot_grpo])
def test_grpo_configs_are_valid(module):
  run = config_lib.validate(module.get_config(), num_devices=8)
  assert run.objective == "grpo"


def test_longcot_budget_is_checked():
  config = longcot_grpo.get_config()
  config.rl.budget = 0
  with pytest.raises(ValueError, match=r"rl.budget=0"):
    config_lib.validate(config, num_devices=8)


def test_schedule_counts_optimizer_steps():
  config = rl.optimizer_config(tiny_config(**{"optimizer.warmup_steps": 2}), minibatches=3)
  assert config.total_steps == 3 * TOTAL and config.optimizer.warmup_steps == 6


# ----------------------------------------------------------------------------- rows


def chunk(prompt, output, logprobs=None):
  output = np.asarray(output, np.int32)
  if logprobs is None:
    logprobs = -np.arange(1, len(output) + 1, dtype=np.float32)
  return Chunk(np.asarray(prompt, np.int32), output, np.asarray(logprobs, np.float32))


def test_every_chunk_is_a_row_with_its_trace_advantage_and_length():
  # Trace 0: two chunks (3 + 2 generated tokens); trace 1: one chunk of 4 tokens.
  traces = [
    (chunk([5, 6], [7, 8, 9]), chunk([5, 6, 8, 9], [10, 11])),
    (chunk([5, 6, 7], [12, 13, 14, 2]),),
  ]
  rows = rl_rows.chunk_rows(traces, [0.5, -1.5], rows=4, seq_len=8, pad_id=0)
  np.testing.assert_array_equal(rows["trace_index"], [0, 0, 1, -1])
  np.testing.assert_array_equal(rows["advantages"], [0.5, 0.5, -1.5, 0.0])
  np.testing.assert_array_equal(rows["trace_lengths"], [5, 5, 4, 0])
  # Row 1 = prompt [5, 6, 8, 9] ⊕ output [10, 11]: targets 6 8 9 10 11, the last two generated.
  np.testing.assert_array_equal(rows["tokens"][1], [5, 6, 8, 9, 10, 0, 0, 0])
  np.testing.assert_array_equal(rows["targets"][1], [6, 8, 9, 10, 11, 0, 0, 0])
  np.testing.assert_array_equal(rows["positions"][1], [0, 1, 2, 3, 4, 0, 0, 0])
  np.testing.assert_array_equal(rows["segment_ids"][1], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows["loss_mask"][1], [0, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows["rollout_logprobs"][1], [0, 0, 0, -1, -2, 0, 0, 0])
  np.testing.assert_array_equal(rows["loss_mask"][2], [0, 0, 1, 1, 1, 1, 0, 0])
  assert rows["loss_mask"][3].sum() == 0 and rows["segment_ids"][3].sum() == 0
  # Minibatch k holds rows k, k + M, ...
  mini = rl_rows.take_minibatch(rows, 1, 2)
  np.testing.assert_array_equal(mini["trace_index"], [0, -1])
  with pytest.raises(ValueError, match="seq_len=4"):
    rl_rows.chunk_rows(traces, [0.5, -1.5], rows=4, seq_len=4, pad_id=0)
  with pytest.raises(ValueError, match="do not fit 2 rows"):
    rl_rows.chunk_rows(traces, [0.5, -1.5], rows=2, seq_len=8, pad_id=0)


# ----------------------------------------------------------------------------- runs


def test_grpo_run_writes_every_metric(tmp_path, monkeypatch):
  import jax

  from train import main

  monkeypatch.setattr(rl, "reward_on_window", parity_reward)
  summary = main.train_and_evaluate(
    tiny_config(total_steps=2), str(tmp_path), devices=jax.devices()[:2]
  )
  assert summary["status"] == "completed" and summary["step"] == 2
  records = read_metrics(tmp_path)
  assert sorted(records) == [1, 2]
  for record in records.values():
    assert FIELDS <= set(record), FIELDS - set(record)
    assert 1 <= record["chunks_per_trace"] <= 2
    assert record["longest_context"] <= 192 + 16
    assert np.isfinite(record["loss"])
  # The stand-in reward splits some group, so the policy is trained on non-zero advantages.
  assert any(0 < r["reward"] < 1 for r in records.values())
  assert any(r["grad_norm"] > 0 for r in records.values())
  assert os.path.isdir(tmp_path / "tensorboard")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


# The CLI with the stand-in reward (train.main's __main__, run as `python -m train.main`).
CLI = (
  "import runpy, sys, test_rl, train.rl; train.rl.reward_on_window = test_rl.parity_reward; "
  "sys.argv[0] = 'train.main'; runpy.run_module('train.main', run_name='__main__')"
)


def command(workdir, *extra, total=TOTAL):
  overrides = {**OVERRIDES, "total_steps": total}
  return [
    sys.executable,
    "-c",
    CLI,
    "--config=configs/delethink_grpo.py",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in overrides.items()),
    *extra,
  ]


def start(workdir, *extra, devices=2, total=TOTAL):
  env = environment(devices)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
  return subprocess.Popen(
    command(workdir, *extra, total=total),
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def test_kill_9_then_resume_gives_identical_metrics(tmp_path):
  from test_main import committed_steps, wait_for_commit, wait_for_step

  code, out = finish(start(tmp_path / "uninterrupted"))
  assert code == 0, out[-3000:]
  uninterrupted = without_timing(read_metrics(tmp_path / "uninterrupted"))
  assert sorted(uninterrupted) == list(range(1, TOTAL + 1))
  assert any(r["grad_norm"] > 0 for r in uninterrupted.values())

  workdir = tmp_path / "killed"
  kill_at = random.Random().randint(2, TOTAL - 2)
  proc = start(workdir)
  wait_for_step(workdir, proc, kill_at)
  wait_for_commit(workdir, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  if proc.returncode != -signal.SIGKILL:
    pytest.fail(f"the run ended before the kill: {proc.communicate()[0][-3000:]}")
  committed = committed_steps(workdir)
  code, out = finish(start(workdir))
  assert code == 0, out[-3000:]
  assert f"resumed from step {committed[-1]}" in out, (committed, out[-3000:])
  assert without_timing(read_metrics(workdir)) == uninterrupted, f"killed at step >= {kill_at}"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  port = free_port()
  multi = [
    start(
      tmp_path / "multi",
      f"--coordinator_address=localhost:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      devices=1,
      total=2,
    )
    for i in range(2)
  ]
  single = start(tmp_path / "single", devices=2, total=2)
  for proc in [*multi, single]:
    code, out = finish(proc)
    assert code == 0, out[-3000:]
  one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "multi")
  assert sorted(one) == sorted(two) == [1, 2]
  # The rollouts of step 1 see the same parameters, so they are equal; the update agrees to
  # float rounding (another reduction order).
  for key in ("reward", "trace_length_mean", "chunks_per_trace", "train_rows"):
    assert one[1][key] == two[1][key], key
  for key in ("loss", "grad_norm", "approx_kl", "clip_fraction"):
    np.testing.assert_allclose(two[1][key], one[1][key], rtol=1e-4, atol=1e-6, err_msg=key)
