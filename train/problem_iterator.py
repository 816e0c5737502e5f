"""A checkpointable stream of a task's problems: the RL loop's data iterator.

    problems = ProblemIterator(task, split="train", seed=0)
    batch = problems.take(4)            # [(problem id, Problem)] x 4, ids 0, 1, 2, 3
    state = problems.get_state()        # JSON: {"task", "split", "seed", "pool", "consumed"}
    problems.set_state(state)           # the next take() continues where `state` was taken

The stream is `task.iter_problems(split, seed)` (endless and deterministic), so a state is how
many problems were consumed; restoring regenerates and skips them (problems are cheap to draw
next to a rollout). A problem's id is its position in the stream: a stable id for the
rollout's key tree, so a problem's samples do not depend on the batch around it.

`pool=N` cycles through the stream's first N problems instead (problem id i is problem i mod N,
so a revisited problem draws fresh samples): the overfitting check of an RL setup, where the
policy sees the same problems again and again and its training reward should rise.
"""

from __future__ import annotations

import itertools

from adaptive.tasks import Problem, Task


class ProblemIterator:
  """Problems of `task`'s `split` for `seed`, in order, with their stream positions.

  pool: 0 for the endless stream; N >= 1 to cycle through its first N problems.
  """

  def __init__(self, task: Task, *, split: str = "train", seed: int = 0, pool: int = 0):
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 0:
      raise ValueError(f"pool={pool!r}: must be 0 (the endless stream) or a number of problems")
    self.task, self.split, self.seed, self.pool = task, split, int(seed), pool
    self._consumed = 0
    self._stream = task.iter_problems(split, self.seed)
    self._pool = list(itertools.islice(self._stream, pool))

  def take(self, count: int) -> list[tuple[int, Problem]]:
    """The next `count` problems as (id, problem)."""
    start = self._consumed
    if self.pool:
      problems = [self._pool[i % self.pool] for i in range(start, start + count)]
    else:
      problems = list(itertools.islice(self._stream, count))
    self._consumed += len(problems)
    return list(zip(range(start, self._consumed), problems, strict=True))

  def get_state(self) -> dict:
    return {
      "task": self.task.name,
      "split": self.split,
      "seed": self.seed,
      "pool": self.pool,
      "consumed": self._consumed,
    }

  def set_state(self, state: dict) -> None:
    mine = self.get_state()
    state = {"pool": 0, **state}  # states saved before pools existed are of the stream
    for key in ("task", "split", "seed", "pool"):
      if state.get(key) != mine[key]:
        raise ValueError(
          f"problem iterator state: {key}={state.get(key)!r} was saved, this run has "
          f"{mine[key]!r} (the checkpoint belongs to another task, seed or pool)"
        )
    consumed = int(state["consumed"])
    if not self.pool:
      self._stream = self.task.iter_problems(self.split, self.seed)
      for _ in itertools.islice(self._stream, consumed):
        pass
    self._consumed = consumed
