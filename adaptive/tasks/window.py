"""The Delethink reward: scored on the last chunk's visible window, not on the whole trace."""

from __future__ import annotations

from adaptive.tasks.base import Task
from adaptive.tasks.problem import Problem


def reward_on_window(
  task: Task, problem: Problem, window_text: str, *, require_think: bool = True
) -> float:
  """The reward of a trace from the text its last chunk could see.

  `window_text` is decode(carryover ⊕ last chunk's output), as the reference computes it: the
  answer must follow the first `</think>` inside that window, so a trace cut at the chunk cap
  still scores if its final window holds the answer, and a `</think>` that scrolled out of the
  window no longer counts. Never raises; in [0, 1].
  """
  return task.score(problem, window_text, require_think=require_think)
