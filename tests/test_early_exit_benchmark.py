"""Smoke test: benchmarks/early_exit.py --quick trains, measures and writes its fields."""

import json
import math
import os
import re

import pytest
from cli_env import environment

from benchmarks import early_exit


def test_quick_early_exit_benchmark_writes_its_fields(tmp_path, monkeypatch):
  # The train.main subprocesses share the test suite's compilation cache.
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    monkeypatch.setenv(name, environment(1)[name])
  early_exit.main(["--quick", f"--workdir={tmp_path}"])
  result = json.loads((tmp_path / "early_exit.json").read_text())
  assert (tmp_path / "early_exit.png").exists() == (result["png"] is not None)

  # Speculative greedy decoding gave the plain greedy tokens on every prompt and batch size.
  assert result["identical_output"] is True
  for name in ("self_spec_speedup", "self_spec_speedup_batch8", "vs_transformers_early_exit"):
    assert math.isfinite(result[name]) and result[name] > 0, (name, result[name])
  assert 0 <= result["acceptance_rate"] <= 1
  assert result["targets"]["self_spec_speedup"]["target"] == 2.0
  for drafter in result["drafters"].values():
    assert drafter["batch1"]["batch"] == 1 and drafter["batch1"]["configs"]
    for row in drafter["batch1"]["configs"] + drafter["batch8"]["configs"]:
      assert row["drafted"] >= row["accepted"] >= 0
      assert row["layer_work_bound"] == early_exit.layer_work_bound(
        row["tokens_per_verify_pass"],
        result["settings"]["models"]["layerskip"]["num_layers"],
        row["draft_layers"],
        row["draft_tokens"],
      )
  # The peer ran on the exported weights; its greedy tokens are compared with ours.
  peer = result["peer"]
  assert peer["plain"]["tokens_per_s"] > 0 and isinstance(result["peer_identical_output"], bool)

  # CALM: threshold 0 leaves every token at the first exit; above any confidence, none exits
  # and the tokens are the dense model's.
  layers = result["settings"]["models"]["calm"]["num_layers"]
  points = [p for p in result["calm_points"] if p["recipe"] == "calm"]
  assert {p["measure"] for p in points} == {"softmax_diff", "classifier"}
  for p in points:
    assert 1 <= p["avg_exit_layer"] <= layers and 0 <= p["agreement_with_full"] <= 1
    if p["threshold"] == 0:
      assert p["avg_exit_layer"] == 1
    if p["threshold"] > 1:
      assert p["avg_exit_layer"] == layers and p["agreement_with_full"] == 1
      assert p["token_agreement_teacher_forced"] == 1
  for calibration in result["calibration"].values():
    assert 0 <= calibration["certified_bound"] <= 1 and 0 <= calibration["fresh_disagreement"] <= 1

  # Every recipe says how long it trained.
  for record in result["train"].values():
    assert record["steps"] == 3 and record["seconds"] > 0 and not record["reused"]
  assert os.path.isdir(tmp_path / "layerskip" / "checkpoints")


def test_bad_arguments_fail_before_any_training():
  """A bad --set or --sections is a ValueError naming it, raised while parsing the arguments."""
  args = early_exit.parse_args(
    ["--sections=speculative", "--recipes=layerskip", "--set=model.num_layers=6"]
  )
  assert args.overrides["model.num_layers"] == 6 and args.sections == ["speculative"]
  bad = (
    (["--set=model.no_such_field=1"], "model.no_such_field=1: not a settable field"),
    (["--set=model.num_layers"], "expected FIELD=VALUE"),
    (["--set=model.num_layers=deep"], "model.num_layers='deep'"),
    (["--sections=speculative,bogus"], "a non-empty subset of"),
    (["--recipes=layerskip"], "with calm and layerskip"),  # the CALM section needs calm
  )
  for argv, message in bad:
    with pytest.raises(ValueError, match=re.escape(message)):
      early_exit.parse_args(argv)
