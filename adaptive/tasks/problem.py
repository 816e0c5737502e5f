"""One verifiable problem: the text a model is asked, and what a checker needs to score it."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Problem:
  """A problem of a task.

  question: the whole user message (instructions on the answer format included); the caller
    renders it through a chat template and tokenizes it.
  answer: the reference answer, as text (what belongs inside `\\boxed{}`); "" when the task has
    none and verifies answers otherwise (e.g. reasoning-gym's rush_hour simulates the moves).
  solution: a worked trace for SFT (the thinking text, without `<think>` tags), or None.
  metadata: what the task's checker needs besides the answer (JSON-like values); not hashed.
  """

  question: str
  answer: str
  solution: str | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
