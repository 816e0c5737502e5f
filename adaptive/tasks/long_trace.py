"""The long-trace family: worked solutions many chunks long, with a small state in the last line.

Every member lists n steps in the question (`1:... 2:... 3:...`) and writes a worked trace of one
short line per step, `{i}:{what step i does}{state after it}`. The line repeats the step index and
the new state, so whatever a model needs to continue is (a) the step list, which stays in the
query of every chunk, and (b) the last complete line, which any window of the last
`markov_window_chars()` characters of the trace holds. A Delethink carryover of that many tokens
(after the `keep_head` tokens in train mode) is therefore enough: the task is Markovian in the
trace by construction, while the trace itself grows linearly with n.

Knobs shared by the family: `length` (n; with `min_length`, n is uniform in [min_length, length]).
Each member adds its difficulty knobs. Traces are ASCII: with the byte tokenizer one character is
one token, so character counts compare directly with chunk sizes.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Iterator

import numpy as np

from adaptive.tasks.base import Task
from adaptive.tasks.problem import Problem
from adaptive.tasks.splits import stream_seed


def positive_int(task: str, name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
    raise ValueError(f"{task} {name}={value!r}: expected an integer >= {minimum}")
  return int(value)


def digits(number: int) -> int:
  return len(str(number))


class LongTraceTask(Task):
  """Shared machinery: lengths, seed streams, trace-size bounds and the Markov window."""

  def __init__(self, name: str, length: int, min_length: int | None):
    self.name = name
    self.length = positive_int(name, "length", length, 1)
    self.min_length = (
      self.length if min_length is None else positive_int(name, "min_length", min_length, 1)
    )
    if self.min_length > self.length:
      raise ValueError(f"{name} min_length={min_length}: must be <= length={length}")

  @abc.abstractmethod
  def draw(self, rng: np.random.Generator, steps: int) -> Problem:
    """A random problem of `steps` steps."""

  @abc.abstractmethod
  def line_chars_without_index(self) -> tuple[int, int]:
    """(min, max) characters of a trace line, not counting its step index and newline."""

  def candidates(self, split: str, seed: int) -> Iterator[Problem]:
    for index in itertools.count():
      rng = np.random.default_rng(stream_seed(self.name, split, seed, index))
      steps = int(rng.integers(self.min_length, self.length + 1))
      yield self.draw(rng, steps)

  def max_line_chars(self) -> int:
    """The longest trace line, its newline included."""
    return digits(self.length) + self.line_chars_without_index()[1] + 1

  def markov_window_chars(self) -> int:
    """K: the last K characters of any prefix of a trace hold its last complete line.

    A complete line needs the newline before it (or the start of the trace) and its own, and the
    prefix may end in an unfinished line: K = 2 * the longest line. With Delethink's train-mode
    carry (first `keep_head` tokens ⊕ last m − keep_head), m − keep_head >= K suffices.
    """
    return 2 * self.max_line_chars()

  def solution_chars_range(self) -> tuple[int, int]:
    """Exact (min, max) characters of a worked trace (`Problem.solution`) under these options.

    The SFT completion adds `<think>\\n`, `\\n</think>\\n` and `The answer is \\boxed{...}.`.
    """
    low, high = self.line_chars_without_index()

    def chars(steps: int, per_line: int) -> int:
      index_chars = sum(digits(i) for i in range(1, steps + 1))
      return index_chars + steps * per_line + (steps - 1)  # newlines between lines

    return chars(self.min_length, low), chars(self.length, high)

  def approx_solution_chars(self) -> int:
    """The middle of `solution_chars_range()`: a typical trace size, for picking sizes."""
    low, high = self.solution_chars_range()
    return (low + high) // 2


def length_for_solution_chars(target_chars: int, name: str = "long_sum", **options) -> int:
  """The smallest `length` for which every worked trace of task `name` has >= `target_chars`.

  E.g. `length_for_solution_chars(4 * chunk_size, ops="+-*")`: traces of at least 4 chunks with
  the byte tokenizer. `options` are the task's other options (`min_length` is ignored).
  """
  from adaptive.tasks.registry import make_task

  options.pop("min_length", None)
  shortest = lambda length: make_task(name, length=length, **options).solution_chars_range()[0]
  high = 1
  while shortest(high) < target_chars:
    high *= 2
  low = high // 2 + 1 if high > 1 else 1
  while low < high:
    middle = (low + high) // 2
    if shortest(middle) >= target_chars:
      high = middle
    else:
      low = middle + 1
  return high
