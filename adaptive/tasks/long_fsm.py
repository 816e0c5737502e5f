"""`long_fsm`: a finite-state machine run over a long input list (long-trace family).

The question gives a transition table (`A0>C` reads "in state A, input 0 goes to C") and n inputs
(`1:0 2:1 ...`); the machine starts in state A. The worked trace writes one line per input that
repeats the table entry it used, so the last line holds the current state:

    1:A0>C
    2:C1>B

Every input acts as a permutation of the states, so no state is absorbing and the final state
depends on every step. Difficulty knobs: `states` (2..26, letters A..) and `symbols` (2..10,
digits 0..). See `adaptive.tasks.long_trace` for the shared knobs and properties.
"""

from __future__ import annotations

import string

import numpy as np

from adaptive.tasks.long_trace import LongTraceTask, positive_int
from adaptive.tasks.problem import Problem

STATE_NAMES = string.ascii_uppercase


class LongFsmTask(LongTraceTask):
  """Options: length, min_length (see long_trace), states (2..26), symbols (2..10)."""

  def __init__(
    self, *, length: int = 64, min_length: int | None = None, states: int = 4, symbols: int = 2
  ):
    super().__init__("long_fsm", length, min_length)
    self.states = positive_int(self.name, "states", states, 2)
    self.symbols = positive_int(self.name, "symbols", symbols, 2)
    if self.states > len(STATE_NAMES) or self.symbols > 10:
      raise ValueError(f"long_fsm states={states}, symbols={symbols}: at most 26 and 10")

  def draw(self, rng: np.random.Generator, steps: int) -> Problem:
    # table[s][k]: the next state from state s on input k; column k is a permutation.
    columns = [rng.permutation(self.states) for _ in range(self.symbols)]
    table = [[int(columns[k][s]) for k in range(self.symbols)] for s in range(self.states)]
    inputs = [int(k) for k in rng.integers(0, self.symbols, size=steps)]
    return self.problem_from_machine(table, inputs)

  def problem_from_machine(self, table: list[list[int]], inputs: list[int]) -> Problem:
    """The problem for a transition table (table[state][input] -> state) and an input list."""
    entries = " ".join(
      f"{STATE_NAMES[s]}{k}>{STATE_NAMES[table[s][k]]}"
      for s in range(len(table))
      for k in range(len(table[s]))
    )
    listed = " ".join(f"{i}:{k}" for i, k in enumerate(inputs, 1))
    question = (
      f"A machine starts in state A. Transitions (state, input > next state): {entries}\n"
      f"Feed it the {len(inputs)} inputs below in order. Which state does it end in?\n"
      f"Inputs: {listed}\nPut your final answer within \\boxed{{}}."
    )
    state, lines = 0, []
    for i, k in enumerate(inputs, 1):
      following = table[state][k]
      lines.append(f"{i}:{STATE_NAMES[state]}{k}>{STATE_NAMES[following]}")
      state = following
    return Problem(
      question=question,
      answer=STATE_NAMES[state],
      solution="\n".join(lines),
      metadata={"table": table, "inputs": inputs},
    )

  def check_answer(self, problem: Problem, answer: str) -> float:
    return 1.0 if answer.upper() == problem.answer else 0.0

  def line_chars_without_index(self) -> tuple[int, int]:
    return 5, 5  # ":" state input ">" state
