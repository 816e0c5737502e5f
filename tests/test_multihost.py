"""Two processes x 2 CPU devices (jax.distributed on localhost, gloo) vs one process x 4 devices."""

import json
import os
import socket
import subprocess
import sys

import pytest
from cli_env import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = [
  "--config.total_steps=4",
  "--config.batch_size=8",
  "--config.seq_len=32",
  "--config.log_every=1",
  "--config.eval_every=2",
  "--config.eval_steps=1",
  "--config.checkpoint_every=2",
  "--config.model.dim=64",
  "--config.model.num_layers=2",
  "--config.model.mlp_dim=128",
  "--config.model.head_dim=16",
  "--config.model.dtype=float32",
  "--config.optimizer.warmup_steps=2",
  "--config.data.prefetch=0",
  # Every process reads the global batch and keeps its rows, so the batches do not depend on
  # the process count and the losses can be compared exactly.
  "--config.data_loading=replicated",
]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def command(workdir, *extra):
  return [
    sys.executable,
    "-m",
    "train.main",
    "--config=configs/lm_dense.py",
    f"--workdir={workdir}",
    *OVERRIDES,
    *extra,
  ]


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f)}


def test_two_processes_match_one_process(tmp_path):
  port = free_port()
  multi = tmp_path / "multi"
  procs = [
    subprocess.Popen(
      command(
        multi, f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"
      ),
      cwd=ROOT,
      env=environment(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  single = subprocess.Popen(
    command(tmp_path / "single"),
    cwd=ROOT,
    env=environment(4),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  outputs = []
  try:
    for p in procs + [single]:
      outputs.append(p.communicate(timeout=300)[0])
  finally:
    for p in procs + [single]:
      if p.poll() is None:
        p.kill()
  for name, p, out in zip(
    ("process 0", "process 1", "single"), procs + [single], outputs, strict=True
  ):
    lines = [l for l in out.splitlines() if not l.startswith(("I1", "W1", "[Gloo]"))]
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n" + "\n".join(lines[-60:])
  assert "2 process(es)" in outputs[0]
  assert "step 4/4" not in outputs[1]  # only process 0 prints progress
  got, want = read_metrics(multi), read_metrics(tmp_path / "single")
  assert sorted(got) == [1, 2, 3, 4]
  for step in want:
    assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-5), step
  for step in (2, 4):
    assert got[step]["eval_loss"] == pytest.approx(want[step]["eval_loss"], abs=1e-5)
  assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
