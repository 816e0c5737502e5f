"""`long_sum`: a running computation modulo M over a long list of steps (long-trace family).

The question lists n steps (`1:+3 2:*7 3:-2 ...`); starting from 0, each step applies its operation
modulo M. The worked trace writes one line per step that repeats the state:

    1:+3=3
    2:*7=1
    3:-2=9

Difficulty knobs: `ops` (a subset of "+-*"; "+" alone is a running digit sum), `modulus` and
`max_operand` (operands are drawn from [1, max_operand]). With "*" a prime modulus keeps the
state from collapsing to 0. See `adaptive.tasks.long_trace` for the shared knobs and properties.
"""

from __future__ import annotations

import re

import numpy as np

from adaptive.tasks.long_trace import LongTraceTask, digits, positive_int
from adaptive.tasks.problem import Problem

OPERATIONS = "+-*"
_INTEGER = re.compile(r"[+-]?\d{1,30}")


def apply_step(value: int, op: str, operand: int, modulus: int) -> int:
  if op == "+":
    return (value + operand) % modulus
  if op == "-":
    return (value - operand) % modulus
  return (value * operand) % modulus


class LongSumTask(LongTraceTask):
  """Options: length, min_length (see long_trace), ops, modulus (>= 2), max_operand (>= 1)."""

  def __init__(
    self,
    *,
    length: int = 64,
    min_length: int | None = None,
    ops: str = "+",
    modulus: int = 10,
    max_operand: int = 9,
  ):
    super().__init__("long_sum", length, min_length)
    if (
      not isinstance(ops, str)
      or not ops
      or not set(ops) <= set(OPERATIONS)
      or len(set(ops)) != len(ops)
    ):
      raise ValueError(f"long_sum ops={ops!r}: expected distinct characters of {OPERATIONS!r}")
    self.ops = ops
    self.modulus = positive_int(self.name, "modulus", modulus, 2)
    self.max_operand = positive_int(self.name, "max_operand", max_operand, 1)

  def draw(self, rng: np.random.Generator, steps: int) -> Problem:
    ops = rng.integers(0, len(self.ops), size=steps)
    operands = rng.integers(1, self.max_operand + 1, size=steps)
    return self.problem_from_steps(
      [(self.ops[o], int(x)) for o, x in zip(ops, operands, strict=True)]
    )

  def problem_from_steps(self, steps: list[tuple[str, int]]) -> Problem:
    """The problem (question, answer, worked trace) for a given list of (op, operand) steps."""
    listed = " ".join(f"{i}:{op}{x}" for i, (op, x) in enumerate(steps, 1))
    question = (
      f"Start at 0 and apply the {len(steps)} steps below in order, modulo {self.modulus}. "
      f"What is the final value?\nSteps: {listed}\nPut your final answer within \\boxed{{}}."
    )
    value, lines = 0, []
    for i, (op, x) in enumerate(steps, 1):
      value = apply_step(value, op, x, self.modulus)
      lines.append(f"{i}:{op}{x}={value}")
    return Problem(
      question=question,
      answer=str(value),
      solution="\n".join(lines),
      metadata={"steps": [[op, x] for op, x in steps], "modulus": self.modulus},
    )

  def check_answer(self, problem: Problem, answer: str) -> float:
    if not _INTEGER.fullmatch(answer):
      return 0.0
    return 1.0 if int(answer) == int(problem.answer) else 0.0

  def line_chars_without_index(self) -> tuple[int, int]:
    # ":" op operand "=" value
    return 5, 3 + digits(self.max_operand) + digits(self.modulus - 1)
