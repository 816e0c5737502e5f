"""`make_task(name, **options)`: every task by name."""

from __future__ import annotations

import inspect

from adaptive.tasks.base import Task

TASK_NAMES = (
  "rg:<reasoning_gym_dataset>",
  "math",
  "math:<reasoning_gym_dataset>",
  "math_jsonl:<glob>",
  "long_sum",
  "long_fsm",
  "long_recurrence",
)


def make_task(name: str, **options) -> Task:
  """The task called `name`, configured by `options`.

  rg:NAME         a reasoning-gym dataset (options: its config fields, `binary`, `instruction`),
                  scored with the dataset's own `score_answer`.
  math            a mixture of reasoning-gym arithmetic datasets, answers checked by math-verify.
  math:NAME       one reasoning-gym dataset, answers checked by math-verify.
  math_jsonl:GLOB problems from JSON-lines files (options: question_field, answer_field,
                  solution_field, heldout_fraction), answers checked by math-verify.
  long_sum        long-trace family: a running computation modulo M (options: length,
                  min_length, ops, modulus, max_operand; see `adaptive.tasks.long_sum`).
  long_fsm        long-trace family: a state machine over a long input list (options: length,
                  min_length, states, symbols; see `adaptive.tasks.long_fsm`).
  long_recurrence long-trace family: a two-term recurrence modulo M, e.g. Fibonacci (options:
                  length, min_length, modulus, max_coefficient; see
                  `adaptive.tasks.long_recurrence`).
  """
  if not isinstance(name, str):
    raise ValueError(f"task name {name!r}: expected one of {TASK_NAMES}")
  kind, colon, argument = name.partition(":")
  if kind == "rg" and colon and argument:
    from adaptive.tasks.gym import ReasoningGymTask

    return ReasoningGymTask(argument, **options)
  if kind == "math" and colon and argument:
    from adaptive.tasks.gym import MathGymTask

    return MathGymTask(argument, **options)
  if name == "math":
    from adaptive.tasks.gym import MathMixtureTask

    if options:
      raise ValueError(f"task 'math' takes no options (got {sorted(options)}); use 'math:NAME'")
    return MathMixtureTask()
  if kind == "math_jsonl" and colon and argument:
    from adaptive.tasks.math_jsonl import MathJsonlTask

    return MathJsonlTask(argument, **options)
  if name in ("long_sum", "long_fsm", "long_recurrence"):
    from adaptive.tasks.long_fsm import LongFsmTask
    from adaptive.tasks.long_recurrence import LongRecurrenceTask
    from adaptive.tasks.long_sum import LongSumTask

    task_cls = {
      "long_sum": LongSumTask,
      "long_fsm": LongFsmTask,
      "long_recurrence": LongRecurrenceTask,
    }[name]
    allowed = sorted(inspect.signature(task_cls).parameters)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
      raise ValueError(f"task {name!r}: unknown options {unknown}; it takes {allowed}")
    return task_cls(**options)
  raise ValueError(f"task name {name!r}: expected one of {TASK_NAMES}")
