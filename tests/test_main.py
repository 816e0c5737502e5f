"""The CLI end to end (subprocesses): kill -9 then resume, SIGTERM, multi-process detection."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from cli_env import environment, finish

from train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 12
OVERRIDES = [
  f"--config.total_steps={TOTAL}",
  "--config.batch_size=4",
  "--config.seq_len=32",
  "--config.log_every=1",
  "--config.eval_every=6",
  "--config.eval_steps=1",
  "--config.checkpoint_every=2",
  "--config.keep_checkpoints=2",
  "--config.model.dim=64",
  "--config.model.num_layers=2",
  "--config.model.mlp_dim=128",
  "--config.model.head_dim=16",
  "--config.model.dtype=float32",
  "--config.optimizer.warmup_steps=2",
  "--config.data.prefetch=0",
  "--config.mesh.data=2",
]


def start(workdir, *extra):
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "train.main",
      "--config=configs/lm_dense.py",
      f"--workdir={workdir}",
      *OVERRIDES,
      *extra,
    ],
    cwd=ROOT,
    env=environment(2),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: (r["loss"], r.get("eval_loss")) for r in records}


def wait_for_step(workdir, proc, step, timeout=240):
  """Blocks until metrics.jsonl has a record of `step` (or later)."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.communicate()[0][-3000:]}")
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
      if steps and max(steps) >= step:
        return max(steps)
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"no step {step} within {timeout}s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  code, out = finish(start(workdir))
  assert code == 0, out[-3000:]
  return losses(workdir)


def test_uninterrupted_run_learns_and_leaves_artifacts(uninterrupted):
  assert sorted(uninterrupted) == list(range(1, TOTAL + 1))
  assert uninterrupted[TOTAL][0] < uninterrupted[1][0]
  assert uninterrupted[6][1] is not None and uninterrupted[12][1] is not None


def committed_steps(workdir) -> list[int]:
  """Checkpoint steps whose save finished (orbax renames a step's tmp directory on commit)."""
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def wait_for_commit(workdir, proc, timeout=240):
  deadline = time.time() + timeout
  while not committed_steps(workdir):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      raise AssertionError(f"no checkpoint committed: {proc.communicate()[0][-3000:]}")
    time.sleep(0.05)


def test_kill_9_then_resume_gives_identical_losses(tmp_path, uninterrupted):
  # Saves are asynchronous, so the kill waits for one to commit: the resume path is the one
  # under test (a kill before any commit restarts fresh: test_checkpoint covers that).
  kill_at = random.Random().randint(3, TOTAL - 4)
  proc = start(tmp_path)
  wait_for_step(tmp_path, proc, kill_at)
  wait_for_commit(tmp_path, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  if proc.returncode != -signal.SIGKILL:
    pytest.fail(f"the run ended before the kill: {proc.communicate()[0][-3000:]}")
  committed = committed_steps(tmp_path)
  code, out = finish(start(tmp_path))
  assert code == 0, out[-3000:]
  assert f"resumed from step {committed[-1]}" in out, (committed, out[-3000:])
  assert losses(tmp_path) == uninterrupted, f"killed at step >= {kill_at}"
  assert str(TOTAL) in os.listdir(tmp_path / "checkpoints")
  assert os.path.isdir(tmp_path / "tensorboard")


def test_sigterm_saves_and_exits_0_then_resumes(tmp_path, uninterrupted):
  proc = start(tmp_path)
  wait_for_step(tmp_path, proc, 3)
  proc.send_signal(signal.SIGTERM)
  code, out = finish(proc)
  assert code == 0, out[-3000:]
  assert "SIGTERM: saved checkpoint at step" in out
  saved = int(out.split("SIGTERM: saved checkpoint at step ")[1].split(";")[0])
  assert str(saved) in os.listdir(tmp_path / "checkpoints")
  code, out = finish(start(tmp_path))
  assert code == 0 and f"resumed from step {saved}" in out, out[-3000:]
  assert losses(tmp_path) == uninterrupted


def test_bad_override_fails_before_compiling(tmp_path):
  code, out = finish(start(tmp_path, "--config.optimizer.learning_rate=-1"), timeout=120)
  assert code != 0 and "optimizer.learning_rate=-1" in out
  assert not os.path.exists(tmp_path / "checkpoints")


def test_distributed_is_decided_from_flags_and_environment():
  assert not main.wants_distributed(None, None, environ={})
  assert not main.wants_distributed(None, 1, environ={"TPU_WORKER_HOSTNAMES": "localhost"})
  assert main.wants_distributed("10.0.0.1:1234", 2, environ={})
  assert main.wants_distributed(None, None, environ={"JAX_COORDINATOR_ADDRESS": "h:1"})
  assert main.wants_distributed(None, None, environ={"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"})
