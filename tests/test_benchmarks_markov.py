"""Smoke test: benchmarks/markov_scaling.py --quick runs end to end and writes its fields."""

import json
import math

from benchmarks import markov_scaling


def test_quick_markov_scaling_writes_finite_fields(tmp_path):
  out, png = tmp_path / "markov.json", tmp_path / "markov.png"
  markov_scaling.main(["--quick", f"--out={out}", f"--png={png}"])
  result = json.loads(out.read_text())
  for name in ("delethink_exponent", "longcot_exponent", "delethink_kv_growth", "flop_model_error"):
    assert math.isfinite(result[name]), (name, result[name])
  for name in ("measured_time_ratio", "flop_model_ratio", "executed_flop_ratio"):
    assert math.isfinite(result["diagnostics"][name]) and result["diagnostics"][name] > 0, name
  assert set(result["targets"]) == {"delethink_exponent", "delethink_kv_growth", "flop_model_error"}
  for kind in ("longcot", "delethink"):
    series = result[kind]
    assert len(series["time_s"]) == len(result["thinking_tokens"])
    assert all(t > 0 for t in series["time_s"])
    # The cache buffers generate allocated are what the model says a chunk caches.
    assert series["peak_kv_bytes"] == series["peak_kv_bytes_model"]
  # Delethink's cache is bounded by its chunk; LongCoT's grows with the thinking.
  assert result["delethink_kv_growth"] == 1.0
  kv = result["longcot"]["peak_kv_bytes"]
  assert kv == sorted(kv) and kv[-1] > 1.5 * kv[0]
  assert result["environment"]["jax"] and result["environment"]["load_average_start"]
  assert png.exists() == (result["png"] is not None)
