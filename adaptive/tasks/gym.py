"""reasoning-gym datasets as tasks: `rg:NAME` (the dataset's own `score_answer`) and math
(`math:NAME` and the `math` mixture: the same generators, answers checked with math-verify).

Seed streams: reasoning-gym derives item i of a dataset with seed S from `Random(S + i)` (almost
every dataset; a few use other generators). Both splits use one even S per (dataset, seed) and
draw item indices of opposite parity (train even, held-out odd), so every train item comes from an
even `Random` seed and every held-out item from an odd one, for any seeds and counts. The
question-hash check of `adaptive.tasks.splits` then removes the rare identical question.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import itertools
import re
from collections.abc import Iterator

from adaptive.tasks.base import Task
from adaptive.tasks.math_check import math_equal, strip_dollars
from adaptive.tasks.problem import Problem
from adaptive.tasks.splits import stream_seed

BOXED_INSTRUCTION = "\n\nPut your final answer within \\boxed{}."

# reasoning-gym datasets whose reference answers math-verify parses as numbers or expressions.
DEFAULT_MATH_DATASETS = (
  "basic_arithmetic",
  "chain_sum",
  "products",
  "fraction_simplification",
  "simple_equations",
  "gcd",
  "lcm",
)


def _registry() -> dict:
  from reasoning_gym.factory import DATASETS  # slow import (~2 s): only when a gym task is made

  return DATASETS


def check_dataset_name(name: str, task_prefix: str) -> str:
  datasets = _registry()
  if name not in datasets:
    close = difflib.get_close_matches(name, list(datasets), n=3)
    hint = f"; did you mean {close}?" if close else ""
    raise ValueError(
      f"task {task_prefix}{name!r}: reasoning-gym has no dataset {name!r}{hint} "
      f"(it has {len(datasets)}: {', '.join(sorted(datasets))})"
    )
  return name


# A score_answer that hands the model's answer to eval / exec / sympy's parse_expr or sympify
# (itself eval-based) runs model output as Python code.
_EVALUATES_ANSWER = re.compile(r"(?:\beval|\bexec|parse_expr|sympify)\(\s*answer\b")


def evaluates_answer(dataset: str) -> bool:
  """Whether reasoning-gym's `score_answer` of `dataset` executes the answer text as code."""
  try:
    source = inspect.getsource(_registry()[dataset][0].score_answer)
  except (OSError, TypeError):
    return False
  return bool(_EVALUATES_ANSWER.search(source))


class ReasoningGymTask(Task):
  """One reasoning-gym dataset; options are its config fields (e.g. `min_terms=2`).

  `binary=True` turns the dataset's score into 1.0 (a full score) or 0.0: several datasets give
  partial credit to wrong answers (e.g. 0.8 for "-1291" against "-129"). `instruction` is
  appended to every question. A few datasets score by running the answer through `eval` or
  sympy's `parse_expr` (countdown, puzzle24, n_queens, ...), which executes model output as
  Python; they need `allow_eval=True`, a choice to make only where that is acceptable.
  """

  prefix = "rg:"
  scores_with_dataset = True

  def __init__(
    self,
    dataset: str,
    *,
    binary: bool = False,
    instruction: str = BOXED_INSTRUCTION,
    allow_eval: bool = False,
    **config,
  ):
    self.dataset = check_dataset_name(dataset, self.prefix)
    self.name = f"{self.prefix}{dataset}"
    if self.scores_with_dataset and not allow_eval and evaluates_answer(dataset):
      raise ValueError(
        f"task {self.name!r}: reasoning-gym's score_answer for {dataset!r} runs the answer "
        "through eval/parse_expr, i.e. executes model output as Python; pass allow_eval=True "
        "to accept that"
      )
    self.binary = bool(binary)
    self.instruction = instruction
    self.config = dict(config)
    self._scorer = self._make_dataset(seed=0, size=1)

  def _make_dataset(self, *, seed: int, size: int):
    dataset_cls, config_cls = _registry()[self.dataset]
    try:
      config = config_cls(seed=seed, size=size, **self.config)
      return dataset_cls(config=config)
    except (TypeError, ValueError, AssertionError) as e:
      fields = sorted(f for f in config_cls.__dataclass_fields__ if f not in ("seed", "size"))
      raise ValueError(
        f"task {self.name!r} options {self.config}: {e} (the dataset's options: {fields})"
      ) from e

  def candidates(self, split: str, seed: int) -> Iterator[Problem]:
    dataset_seed = 2 * (stream_seed("reasoning-gym", self.dataset, seed) % 2**29)
    parity = 0 if split == "train" else 1
    dataset, size = None, 0
    for k in itertools.count():
      index = 2 * k + parity
      if index >= size:  # grow geometrically: a few datasets build `size` items up front
        size = max(64, 2 * size)
        dataset = self._make_dataset(seed=dataset_seed, size=size)
      yield self._problem(dataset[index])

  def _problem(self, item: dict) -> Problem:
    # The entry goes back to score_answer as the dataset made it (answer None: no single
    # reference, e.g. rush_hour; the scorer simulates the answer instead).
    entry = {
      "question": item["question"],
      "answer": item["answer"],
      "metadata": item.get("metadata", {}),
    }
    return Problem(
      question=str(item["question"]) + self.instruction,
      answer="" if item["answer"] is None else str(item["answer"]),
      solution=None,
      metadata={"dataset": self.dataset, "entry": entry},
    )

  def check_answer(self, problem: Problem, answer: str) -> float:
    score = float(self._scorer.score_answer(answer, problem.metadata["entry"]))
    if self.binary:
      return 1.0 if score >= 1.0 else 0.0
    return score


class MathGymTask(ReasoningGymTask):
  """A reasoning-gym dataset whose answers are math, checked with math-verify (binary)."""

  prefix = "math:"
  scores_with_dataset = False

  def _problem(self, item: dict) -> Problem:
    problem = super()._problem(item)
    return dataclasses.replace(problem, answer=strip_dollars(problem.answer))

  def check_answer(self, problem: Problem, answer: str) -> float:
    return 1.0 if math_equal(problem.answer, answer) else 0.0


class MathMixtureTask(Task):
  """The `math` task: candidate i comes from dataset i % T of `datasets`, checked by math-verify."""

  def __init__(self, datasets: tuple[str, ...] = DEFAULT_MATH_DATASETS):
    self.name = "math"
    self.parts = [MathGymTask(d) for d in datasets]

  def candidates(self, split: str, seed: int) -> Iterator[Problem]:
    streams = [part.candidates(split, seed) for part in self.parts]
    for stream in itertools.cycle(streams):
      yield next(stream)

  def check_answer(self, problem: Problem, answer: str) -> float:
    return 1.0 if math_equal(problem.answer, answer) else 0.0
