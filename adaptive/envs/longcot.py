"""LongCoT: the standard thinking environment, one chunk whose context grows with the thinking.

The model sees the query and generates up to `budget` tokens in one sequence; the trace ends on
EOS or at the budget. Its per-token cost and KV cache grow with the thinking length (quadratic
total compute), which is what Delethink bounds. A Delethink trace that ends inside chunk 1 is the
same trace as a LongCoT one with budget = chunk_size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adaptive.envs import validation
from adaptive.envs.base import Chunk, ChunkedEnv


class LongCoTEnv(ChunkedEnv):
  """One chunk of up to `budget` tokens per trace.

  Args:
    budget: tokens a trace may generate (>= 1).
    eos_ids: the token id(s) that end a trace.

  The visible window is the whole output (the model sees all of its reasoning).
  """

  def __init__(self, budget: int, eos_ids: int | Sequence[int]):
    self.budget = validation.check_int(budget, "budget", 1)
    super().__init__(eos_ids)

  @property
  def max_chunks(self) -> int:
    """1: the whole trace is one chunk."""
    return 1

  @property
  def thinking_budget(self) -> int:
    """`budget`, the most tokens a trace may generate."""
    return self.budget

  def _budget(self, chunk_index: int) -> int:
    return self.budget

  def _next_carry(self, query: np.ndarray, trace: tuple[Chunk, ...]) -> np.ndarray:
    raise AssertionError("a LongCoT trace has one chunk; there is no next prompt")
