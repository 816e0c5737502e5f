"""The task interface: problems by split and seed, a reward in [0, 1], and the SFT target text."""

from __future__ import annotations

import abc
import itertools
import logging
import math
import numbers
from collections.abc import Iterator

from adaptive.tasks.answers import extract_answer, format_completion
from adaptive.tasks.problem import Problem
from adaptive.tasks.splits import check_split, split_of

log = logging.getLogger(__name__)

# A split gives up after this many candidates in a row that belong to the other split: the
# problem space is then too small (or too lopsided under the question hash) to split.
MAX_CONSECUTIVE_REJECTS = 1000


class Task(abc.ABC):
  """A family of verifiable problems.

  Subclasses provide `candidates` (an endless stream of problems drawn from one split's seed
  stream) and `check_answer` (the verifier of an extracted answer). This class adds the split
  filter, answer extraction and the never-raising reward.
  """

  name: str = "task"
  # Share of the problem space (by question hash) that belongs to the held-out split.
  heldout_fraction: float = 0.5

  @abc.abstractmethod
  def candidates(self, split: str, seed: int) -> Iterator[Problem]:
    """An endless, deterministic stream of problems from the seed stream of (split, seed)."""

  @abc.abstractmethod
  def check_answer(self, problem: Problem, answer: str) -> float:
    """The score of an extracted answer (the content of `\\boxed{}`, stripped); may raise."""

  def iter_problems(self, split: str, seed: int) -> Iterator[Problem]:
    """The problems of `split` for `seed`, endless; `problems(split, n, seed)` is its prefix."""
    check_split(split)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
      raise ValueError(f"seed={seed!r}: expected an integer")
    return self._filtered(split, int(seed))

  def _filtered(self, split: str, seed: int) -> Iterator[Problem]:
    rejected = 0
    for problem in self.candidates(split, seed):
      if split_of(problem.question, self.heldout_fraction) != split:
        rejected += 1
        if rejected >= MAX_CONSECUTIVE_REJECTS:
          raise ValueError(
            f"task {self.name!r}: {rejected} candidates in a row belong to the other split; "
            "the problem space is too small to give disjoint train and heldout splits"
          )
        continue
      rejected = 0
      yield problem

  def problems(self, split: str, count: int, seed: int) -> list[Problem]:
    """`count` problems of `split` ("train" or "heldout"), deterministic for (split, seed).

    A longer list for the same (split, seed) starts with the shorter one. Train and heldout
    never share a question (see `adaptive.tasks.splits`); a split may repeat a problem when its
    problem space is small.
    """
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
      raise ValueError(f"count={count!r}: expected a non-negative integer")
    return list(itertools.islice(self.iter_problems(split, seed), int(count)))

  def score(self, problem: Problem, completion_text: str, *, require_think: bool = True) -> float:
    """The reward of a completion in [0, 1]; 0 for anything unparsable. Never raises.

    `completion_text` is the decoded text (bytes are decoded as UTF-8 with replacement). The
    answer is extracted as `adaptive.tasks.answers` describes and checked by `check_answer`.
    """
    try:
      if isinstance(completion_text, bytes | bytearray):
        completion_text = bytes(completion_text).decode("utf-8", errors="replace")
      if not isinstance(completion_text, str):
        return 0.0
      answer = extract_answer(completion_text, require_think=require_think)
      if not answer:
        return 0.0
      value = float(self.check_answer(problem, answer))
    except Exception:  # a verifier's failure on garbage is a wrong answer, not a crash
      log.debug("task %s: checker failed", self.name, exc_info=True)
      return 0.0
    if not math.isfinite(value):
      return 0.0
    return min(1.0, max(0.0, value))

  def sft_completion(self, problem: Problem) -> str:
    """The SFT target: `<think>\\n{solution}\\n</think>\\nThe answer is \\boxed{answer}.`

    A problem without a solution gets an empty thinking block. `score` gives this text 1.0.
    A problem without a reference answer (a few reasoning-gym datasets verify by simulation)
    has no SFT target: ValueError.
    """
    if not problem.answer:
      raise ValueError(f"task {self.name!r}: the problem has no reference answer to train on")
    return format_completion(problem.solution, problem.answer)

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r})"
