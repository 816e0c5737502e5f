"""train.problem_iterator: the RL loop's problem stream, its pool mode and its checkpoint state."""

import itertools

import pytest

from adaptive.tasks import make_task
from train.problem_iterator import ProblemIterator


@pytest.fixture(scope="module")
def task():
  return make_task("long_sum", length=3, min_length=2)


def questions(drawn):
  return [problem.question for _, problem in drawn]


def test_stream_gives_the_tasks_problems_with_their_positions(task):
  first_five = [p.question for p in itertools.islice(task.iter_problems("train", 7), 5)]
  problems = ProblemIterator(task, seed=7)
  drawn = problems.take(2) + problems.take(3)
  assert [i for i, _ in drawn] == [0, 1, 2, 3, 4]
  assert questions(drawn) == first_five


def test_pool_cycles_through_the_streams_first_problems(task):
  first_three = [p.question for p in itertools.islice(task.iter_problems("train", 7), 3)]
  problems = ProblemIterator(task, seed=7, pool=3)
  drawn = problems.take(4) + problems.take(4)
  assert [i for i, _ in drawn] == list(range(8))  # ids keep counting: fresh sampling keys
  assert questions(drawn) == [first_three[i % 3] for i in range(8)]


@pytest.mark.parametrize("pool", [0, 3])
def test_restored_state_continues_where_it_was_taken(task, pool):
  problems = ProblemIterator(task, seed=7, pool=pool)
  problems.take(5)
  state = problems.get_state()
  assert state == {"task": task.name, "split": "train", "seed": 7, "pool": pool, "consumed": 5}
  expected = problems.take(4)
  restored = ProblemIterator(task, seed=7, pool=pool)
  restored.set_state(state)
  assert restored.take(4) == expected


def test_state_saved_before_pools_is_the_stream(task):
  problems = ProblemIterator(task, seed=7)
  problems.take(2)
  expected = problems.take(2)
  restored = ProblemIterator(task, seed=7)
  restored.set_state({"task": task.name, "split": "train", "seed": 7, "consumed": 2})
  assert restored.take(2) == expected


def test_state_of_another_pool_is_refused(task):
  state = ProblemIterator(task, seed=7, pool=3).get_state()
  with pytest.raises(ValueError, match=r"pool=3 was saved, this run has 0"):
    ProblemIterator(task, seed=7).set_state(state)


@pytest.mark.parametrize("pool", [-1, 2.0, True])
def test_bad_pool_names_the_argument(task, pool):
  with pytest.raises(ValueError, match=r"pool="):
    ProblemIterator(task, pool=pool)
