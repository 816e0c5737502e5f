"""Verifiable tasks for reasoning RL and SFT, on text (the caller tokenizes).

    task = make_task("long_sum", length=200)          # or "long_fsm", "rg:chain_sum", "math", ...
    problems = task.problems("train", 64, seed=0)     # "heldout" never shares a problem
    prompt = ChatTemplate.plain().render(problems[0].question)
    reward = task.score(problems[0], completion_text)  # in [0, 1], never raises
    target = task.sft_completion(problems[0])          # scores 1.0

Answer extraction and the completion format: `adaptive.tasks.answers`. Splits:
`adaptive.tasks.splits`. The long-trace family: `adaptive.tasks.long_trace` (long_sum, long_fsm).
"""

from adaptive.tasks.answers import extract_answer, format_completion
from adaptive.tasks.base import Task
from adaptive.tasks.chat import ChatTemplate
from adaptive.tasks.long_trace import length_for_solution_chars
from adaptive.tasks.problem import Problem
from adaptive.tasks.registry import TASK_NAMES, make_task
from adaptive.tasks.splits import SPLITS
from adaptive.tasks.window import reward_on_window

__all__ = [
  "SPLITS",
  "TASK_NAMES",
  "ChatTemplate",
  "Problem",
  "Task",
  "extract_answer",
  "format_completion",
  "length_for_solution_chars",
  "make_task",
  "reward_on_window",
]
