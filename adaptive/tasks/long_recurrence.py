"""`long_recurrence`: a two-term linear recurrence modulo M run for n steps (long-trace family).

The question gives a starting pair and a rule; each step maps the pair (a, b) to
(b, (p*a + q*b) mod M). The worked trace writes one line per step holding the new pair:

    1:7,0
    2:0,7

With p = q = 1 this is the Fibonacci sequence modulo M. Unlike `long_sum` and `long_fsm`, a step
reads nothing from a list in the question: the next line is a function of the last line and the
rule alone, so a small model learns it without an index lookup, and what is hard is doing it
without a slip n times in a row (an error in any line changes every later pair). Difficulty
knobs: `modulus` (the digit range; >= 2) and `max_coefficient` (p and q are drawn from
[1, max_coefficient], so 1 means Fibonacci for every problem). See `adaptive.tasks.long_trace`
for the shared knobs and properties.
"""

from __future__ import annotations

import re

import numpy as np

from adaptive.tasks.long_trace import LongTraceTask, digits, positive_int
from adaptive.tasks.problem import Problem

_INTEGER = re.compile(r"[+-]?\d{1,30}")


class LongRecurrenceTask(LongTraceTask):
  """Options: length, min_length (see long_trace), modulus (>= 2), max_coefficient (>= 1)."""

  def __init__(
    self,
    *,
    length: int = 64,
    min_length: int | None = None,
    modulus: int = 10,
    max_coefficient: int = 1,
  ):
    super().__init__("long_recurrence", length, min_length)
    self.modulus = positive_int(self.name, "modulus", modulus, 2)
    self.max_coefficient = positive_int(self.name, "max_coefficient", max_coefficient, 1)

  def draw(self, rng: np.random.Generator, steps: int) -> Problem:
    start = [int(x) for x in rng.integers(0, self.modulus, size=2)]
    p, q = (int(x) for x in rng.integers(1, self.max_coefficient + 1, size=2))
    return self.problem_from_rule(start, (p, q), steps)

  def problem_from_rule(self, start: list[int], coefficients: tuple[int, int], steps: int):
    """The problem for a starting pair [a, b], coefficients (p, q) and a number of steps."""
    p, q = coefficients
    a, b = start
    question = (
      f"Pair ({a},{b}); a step maps (a,b) to (b,{p}a+{q}b mod {self.modulus}). "
      f"After {steps} steps, what is b?\nPut your final answer within \\boxed{{}}."
    )
    lines = []
    for i in range(1, steps + 1):
      a, b = b, (p * a + q * b) % self.modulus
      lines.append(f"{i}:{a},{b}")
    return Problem(
      question=question,
      answer=str(b),
      solution="\n".join(lines),
      metadata={"start": list(start), "coefficients": [p, q], "modulus": self.modulus},
    )

  def check_answer(self, problem: Problem, answer: str) -> float:
    if not _INTEGER.fullmatch(answer):
      return 0.0
    return 1.0 if int(answer) == int(problem.answer) else 0.0

  def line_chars_without_index(self) -> tuple[int, int]:
    # ":" a "," b
    return 4, 2 + 2 * digits(self.modulus - 1)
