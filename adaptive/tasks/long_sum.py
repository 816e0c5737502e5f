"""`long_sum`: a long running computation whose state is small and always in the recent text.

The question lists n steps (`1:+3 2:*7 3:-2 ...`); starting from 0, each step applies its operation
modulo M. The worked trace writes one short line per step that repeats the state:

    1:+3=3
    2:*7=1
    3:-2=9

so the solution is about 7n characters while everything needed to continue (the step index and
the current value) is in its last line: any window of the last `markov_window_chars()` characters
holds a complete line (Markov property), and the query holds the steps still to come. Knobs:
trace length `length` (n; with `min_length`, n is uniform in [min_length, length]) and
difficulty `ops` (a subset of "+-*") and `modulus`/`max_operand`. With the byte tokenizer the
text is ASCII, one token per character, so the chunk and carryover sizes compare directly.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import numpy as np

from adaptive.tasks.base import Task
from adaptive.tasks.problem import Problem
from adaptive.tasks.splits import stream_seed

OPERATIONS = "+-*"
_INTEGER = re.compile(r"[+-]?\d{1,30}")


def apply_step(value: int, op: str, operand: int, modulus: int) -> int:
  if op == "+":
    return (value + operand) % modulus
  if op == "-":
    return (value - operand) % modulus
  return (value * operand) % modulus


def _digits(number: int) -> int:
  return len(str(number))


class LongSumTask(Task):
  """The long running-sum task (module docstring). Options:

  length: number of steps n (the trace-length knob), >= 1.
  min_length: if given, n is drawn uniformly from [min_length, length].
  ops: the operations steps draw from, a subset of "+-*" ("+": running sum; "+-*": harder).
  modulus: M >= 2, the state is in [0, M).
  max_operand: operands are drawn from [1, max_operand].
  """

  def __init__(
    self,
    *,
    length: int = 64,
    min_length: int | None = None,
    ops: str = "+",
    modulus: int = 10,
    max_operand: int = 9,
  ):
    self.name = "long_sum"
    self.length = _positive_int("length", length, 1)
    self.min_length = (
      self.length if min_length is None else _positive_int("min_length", min_length, 1)
    )
    if self.min_length > self.length:
      raise ValueError(f"long_sum min_length={min_length}: must be <= length={length}")
    if not ops or not set(ops) <= set(OPERATIONS) or len(set(ops)) != len(ops):
      raise ValueError(f"long_sum ops={ops!r}: expected distinct characters of {OPERATIONS!r}")
    self.ops = ops
    self.modulus = _positive_int("modulus", modulus, 2)
    self.max_operand = _positive_int("max_operand", max_operand, 1)

  def candidates(self, split: str, seed: int) -> Iterator[Problem]:
    for index in itertools.count():
      rng = np.random.default_rng(stream_seed("long_sum", split, seed, index))
      yield self.problem_from_steps(self._draw_steps(rng))

  def _draw_steps(self, rng: np.random.Generator) -> list[tuple[str, int]]:
    count = int(rng.integers(self.min_length, self.length + 1))
    ops = rng.integers(0, len(self.ops), size=count)
    operands = rng.integers(1, self.max_operand + 1, size=count)
    return [(self.ops[o], int(x)) for o, x in zip(ops, operands, strict=True)]

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

  def max_line_chars(self) -> int:
    """The longest trace line, its newline included."""
    return _digits(self.length) + 3 + _digits(self.max_operand) + _digits(self.modulus - 1) + 1

  def markov_window_chars(self) -> int:
    """K: the last K characters of any prefix of a trace hold its last complete line.

    A complete line needs the newline before it (or the trace start), so K = 2 * longest line.
    """
    return 2 * self.max_line_chars()

  def solution_chars_range(self) -> tuple[int, int]:
    """Exact (min, max) length in characters of a worked trace under these options."""
    operand_digits = (1, _digits(self.max_operand))
    value_digits = (1, _digits(self.modulus - 1))

    def chars(steps: int, bound: int) -> int:
      per_line = 3 + operand_digits[bound] + value_digits[bound]  # ":" op "=" + digits
      index_digits = sum(_digits(i) for i in range(1, steps + 1))
      return index_digits + steps * per_line + (steps - 1)  # newlines between lines

    return chars(self.min_length, 0), chars(self.length, 1)


def length_for_solution_chars(target_chars: int, **options) -> int:
  """The smallest `length` whose every worked trace has at least `target_chars` characters.

  E.g. `length_for_solution_chars(4 * chunk_size, ops="+-*")` for traces >= 4 chunks (byte
  tokenizer: characters = tokens). `options` are the other LongSumTask options.
  """
  options.pop("min_length", None)
  length = 1
  while LongSumTask(length=length, **options).solution_chars_range()[0] < target_chars:
    length *= 2
  low, high = length // 2 + 1, length
  while low < high:
    middle = (low + high) // 2
    if LongSumTask(length=middle, **options).solution_chars_range()[0] >= target_chars:
      high = middle
    else:
      low = middle + 1
  return max(1, high)


def _positive_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
    raise ValueError(f"long_sum {name}={value!r}: expected an integer >= {minimum}")
  return int(value)
