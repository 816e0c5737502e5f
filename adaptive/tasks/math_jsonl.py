"""`math_jsonl:GLOB`: math problems read from JSON-lines files, answers checked by math-verify.

Each non-empty line is a record with a question and a reference answer (default fields `problem`
and `answer`; a reference written as `\\boxed{x}` counts as `x`) and, optionally, a worked
solution for SFT. Records are deduplicated by question. Splits: a record is held out iff its
question hash falls below `heldout_fraction` (default 0.1), so the file's held-out set is fixed
whatever the seed; a split's problems are its records in a seeded random order, reshuffled each
time they are used up.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterator

import numpy as np

from adaptive.tasks.answers import last_boxed
from adaptive.tasks.base import Task
from adaptive.tasks.gym import BOXED_INSTRUCTION
from adaptive.tasks.math_check import math_equal
from adaptive.tasks.problem import Problem
from adaptive.tasks.splits import split_of, stream_seed


class MathJsonlTask(Task):
  def __init__(
    self,
    pattern: str,
    *,
    question_field: str = "problem",
    answer_field: str = "answer",
    solution_field: str | None = None,
    heldout_fraction: float = 0.1,
    instruction: str = BOXED_INSTRUCTION,
  ):
    self.name = f"math_jsonl:{pattern}"
    if not 0.0 < heldout_fraction < 1.0:
      raise ValueError(f"task {self.name!r} heldout_fraction={heldout_fraction}: expected (0, 1)")
    self.heldout_fraction = float(heldout_fraction)
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not paths:
      raise ValueError(f"task {self.name!r}: no file matches {pattern!r}")
    self._problems: list[Problem] = []
    seen = set()
    for path in paths:
      for line, fields in _records(path):
        for field in (question_field, answer_field):
          if field not in fields:
            raise ValueError(f"task {self.name!r}: {path}:{line} has no field {field!r}")
        question = str(fields[question_field]) + instruction
        if question in seen:
          continue
        seen.add(question)
        answer = str(fields[answer_field])
        solution = fields.get(solution_field) if solution_field else None
        self._problems.append(
          Problem(
            question=question,
            answer=last_boxed(answer) or answer.strip(),
            solution=None if solution is None else str(solution),
            metadata={"source": f"{path}:{line}"},
          )
        )

  def candidates(self, split: str, seed: int) -> Iterator[Problem]:
    members = [p for p in self._problems if split_of(p.question, self.heldout_fraction) == split]
    if not members:
      raise ValueError(
        f"task {self.name!r}: none of its {len(self._problems)} problems falls in split "
        f"{split!r} (heldout_fraction={self.heldout_fraction})"
      )
    for epoch in itertools.count():
      rng = np.random.default_rng(stream_seed("math_jsonl", split, seed, epoch))
      for index in rng.permutation(len(members)):
        yield members[index]

  def check_answer(self, problem: Problem, answer: str) -> float:
    return 1.0 if math_equal(problem.answer, answer) else 0.0


def _records(path: str) -> Iterator[tuple[int, dict]]:
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not JSON ({e})") from e
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_number}: expected a JSON object")
      yield line_number, record
