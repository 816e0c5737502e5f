"""Training metrics: DIR/metrics.jsonl, TensorBoard event files and a progress line on stdout.

    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    writer.write(step, {"loss": 2.1, ...})      # one JSON object per logged step
    print(progress_line(step, total_steps, record, eta_s))

Throughput and MFU come from `adaptive.flops`: dense-equivalent FLOPs (every layer
on every token) and executed FLOPs (what an adaptive model actually ran, from its
routing statistics). MFU divides FLOP/s by the chips' peak bf16 FLOP/s; on CPU
there is no meaningful peak, so only FLOP/s is reported.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from adaptive import flops as flops_lib

# Peak dense bf16 TFLOP/s per chip, matched against `device.device_kind` (lower case).
PEAK_BF16_TFLOPS = (
  ("v6 lite", 918.0),
  ("v6e", 918.0),
  ("v5 lite", 197.0),
  ("v5e", 197.0),
  ("v5p", 459.0),
  ("v5", 459.0),
  ("v4", 275.0),
  ("h200", 989.0),
  ("h100", 989.0),
  ("a100", 312.0),
)


def peak_flops_per_device(device) -> float | None:
  """Peak bf16 FLOP/s of one device, or None when unknown (CPU)."""
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  for key, tflops in PEAK_BF16_TFLOPS:
    if key in kind:
      return tflops * 1e12
  return None


class StepTimer:
  """Wall time per step between log lines, leaving out evaluation and checkpoint time."""

  def __init__(self, step: int):
    self.last_time = time.perf_counter()
    self.last_step = step
    self.excluded = 0.0

  def exclude(self, seconds: float) -> None:
    """Time spent on something other than training steps (eval, saves)."""
    self.excluded += seconds

  def interval(self, step: int) -> tuple[float, int]:
    """(training seconds, steps) since the previous call; resets the interval."""
    now = time.perf_counter()
    seconds = max(now - self.last_time - self.excluded, 0.0)
    steps = step - self.last_step
    self.last_time, self.last_step, self.excluded = now, step, 0.0
    return seconds, steps


def throughput(
  model_config: Any,
  *,
  batch: int,
  seq_len: int,
  seconds_per_step: float,
  aux_metrics: Mapping[str, float],
  peak_flops: float | None,
) -> dict[str, float]:
  """tokens/s, dense and executed FLOP/s and (with a peak) MFU of one step."""
  dense = flops_lib.dense_train_flops(model_config, batch, seq_len)
  executed = flops_lib.executed_train_flops(model_config, batch, seq_len, dict(aux_metrics))
  out = {
    "seconds_per_step": seconds_per_step,
    "tokens_per_second": batch * seq_len / seconds_per_step,
    "dense_flops_per_second": dense / seconds_per_step,
    "executed_flops_per_second": executed / seconds_per_step,
  }
  if peak_flops:
    out["dense_mfu"] = out["dense_flops_per_second"] / peak_flops
    out["executed_mfu"] = out["executed_flops_per_second"] / peak_flops
  return out


def _si(value: float) -> str:
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(value) >= scale:
      return f"{value / scale:.2f}{unit}"
  return f"{value:.2f}"


def progress_line(step: int, total_steps: int, record: Mapping[str, Any], eta_s: float) -> str:
  """One human-readable line with the logged figures and an ETA."""
  parts = [f"step {step}/{total_steps}", f"loss {record['loss']:.4f}"]
  if "eval_loss" in record:
    parts.append(f"eval {record['eval_loss']:.4f}")
  parts += [
    f"lr {record['learning_rate']:.2e}",
    f"gnorm {record['grad_norm']:.3f}",
    f"{_si(record['tokens_per_second'])} tok/s",
    f"{_si(record['executed_flops_per_second'])}FLOP/s",
  ]
  if "executed_mfu" in record:
    parts.append(
      f"MFU {100 * record['dense_mfu']:.1f}% dense {100 * record['executed_mfu']:.1f}% exec"
    )
  parts += [
    f"{record['seconds_per_step']:.3f} s/step",
    f"skipped {record['nonfinite_steps']}",
    f"ETA {datetime.timedelta(seconds=round(max(eta_s, 0.0)))}",
  ]
  return " | ".join(parts)


class MetricsWriter:
  """metrics.jsonl + TensorBoard events in `workdir`; a no-op when not `enabled`."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops records of steps > `step` (they are redone after a resume)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError):
        pass  # a line cut short by a crash
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {"step": int(step)}
    for k, v in record.items():
      if not isinstance(v, (int, str)) and hasattr(v, "__float__"):
        v = float(v)
      clean[k] = v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
    with open(self.path, "a") as f:
      f.write(json.dumps(clean) + "\n")
      f.flush()
    for k, v in clean.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
