"""Smoke test: the routed-vs-dense step benchmarks run end to end at a tiny shape."""

import json
import sys
from unittest import mock

import pytest

from benchmarks import duo_step, mod_step

TINY = [
  "--dim=32",
  "--layers=2",
  "--heads=2",
  "--kv_heads=2",
  "--head_dim=16",
  "--mlp_dim=64",
  "--batch=8",
  "--seq=32",
  "--steps=1",
  "--rounds=1",
]


@pytest.mark.parametrize(
  "bench,extra",
  [
    (mod_step, ["--predictor_hidden=8", "--capacity=0.25", "--no-breakdown"]),
    (duo_step, ["--small_mlp_dim=16"]),
  ],
)
def test_step_benchmark_writes_its_ratios(bench, extra, tmp_path):
  out = tmp_path / "result.json"
  with mock.patch.object(sys, "argv", ["bench", *TINY, *extra, f"--out={out}"]):
    bench.main()
  result = json.loads(out.read_text())
  assert 0 < result["flop_ratio"] < 1  # The routed model executes fewer FLOPs than dense.
  assert result["time_ratio"] > 0 and result["overhead"] == pytest.approx(
    result["time_ratio"] / result["flop_ratio"]
  )
  if bench is duo_step:
    # Both options at capacity 1 execute more than dense; XLA agrees dispatch executes less.
    assert result["flop_ratio_vs_dense"]["duo_full"] > 1
    assert result["xla_flop_ratio"] < 1
