"""The LongCoT and Delethink environments against the algorithm written out here, on scripted streams.

The reference below follows the issue's wording with plain lists and no code from the
environments: the carry is the set of trace positions a mode keeps, each token once, in order.

  inference (the paper's Algorithm 1): the first h tokens of chunk 1 and the last m of the chunk
    just finished.
  train (the reference RL environment): of a = previous carry ⊕ the chunk just finished, the first
    h and the last m − h positions.

Chunk 1 may generate C tokens, later chunks C − m; a trace ends on EOS or after I chunks.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive.envs import Chunk, DelethinkEnv, LongCoTEnv, Observation

EOS_IDS = (0, 1)  # two EOS ids: a trace may stop on either


# -- the algorithm, written out ------------------------------------------------------------------


def kept(tokens, keep):
  """The tokens at the positions `keep(position, length)` accepts, in order."""
  return [t for p, t in enumerate(tokens) if keep(p, len(tokens))]


def reference_carry(mode, chunks, previous_carry, h, m):
  if mode == "inference":
    head = chunks[0][:h]
    if len(chunks) == 1:  # head and tail come from the same chunk: keep each position once
      return kept(chunks[0], lambda p, n: p < h or p >= n - m)
    return head + kept(chunks[-1], lambda p, n: p >= n - m)
  a = previous_carry + chunks[-1]
  return kept(a, lambda p, n: p < h or p >= n - (m - h))


def reference_run(mode, query, script, C, m, I, h):
  """Expected observations of one row after reset and after each step, and its final trace.

  Returns (states, trace): states[k] = (prompt, budget, done) after k steps, for k up to the
  number of chunks the row runs; trace = [(prompt, output)] of the chunks it ran.
  """
  states = [(list(query), C, False)]
  trace, carry = [], []
  for output in script:
    prompt, budget, _ = states[-1]
    assert len(output) <= budget, "a bad script"
    trace.append((prompt, list(output)))
    chunks = [out for _, out in trace]
    if (output and output[-1] in EOS_IDS) or len(trace) == I:
      states.append(([], 0, True))
      break
    carry = reference_carry(mode, chunks, carry, h, m)
    states.append((list(query) + carry, C - m, False))
  return states, trace


# -- scripted token streams ----------------------------------------------------------------------

_ids = itertools.count(2)  # distinct non-EOS ids, so a misplaced carry token shows


def fresh(n, eos=None):
  """n tokens; the last is `eos` when given."""
  tokens = [next(_ids) for _ in range(n)]
  if eos is not None and n:
    tokens[-1] = eos
  return tokens


def scripts(C, m, I):
  """Every row kind the acceptance names, as per-chunk outputs for budgets C and C − m."""
  later = C - m
  return {
    "eos_inside_chunk_1": [fresh(3, eos=0)],
    "eos_as_last_allowed_token_of_a_later_chunk": [fresh(C)]
    + [fresh(later) for _ in range(min(I, 3) - 2)]
    + [fresh(later, eos=1)],
    "never_eos_stops_at_max_chunks": [fresh(C)] + [fresh(later) for _ in range(I - 1)],
    "outputs_shorter_than_m": [fresh(m - 1), fresh(1), fresh(0)]
    + [fresh(min(m - 1, later)) for _ in range(I)],
    "eos_alone": [[1]],
  }


def drive(env, queries, row_scripts):
  """Runs the environment on the scripts; returns the observation after reset and every step."""
  observations = [env.reset(queries)]
  chunk_index = [0] * len(queries)
  while not observations[-1].done.all():
    obs = observations[-1]
    outputs = []
    for row, script in enumerate(row_scripts):
      if obs.done[row]:
        outputs.append([-7, 3.5])  # ignored: would be rejected if the environment read it
        continue
      outputs.append(script[chunk_index[row]])
      chunk_index[row] += 1
    observations.append(env.step(outputs))
  return observations


def check_against_reference(env, mode, queries, row_scripts, C, m, I, h):
  observations = drive(env, queries, row_scripts)
  for row, (query, script) in enumerate(zip(queries, row_scripts, strict=True)):
    states, trace = reference_run(mode, query, script, C, m, I, h)
    # After the row is done, later observations repeat the done state.
    states += [states[-1]] * (len(observations) - len(states))
    for step, (obs, (prompt, budget, done)) in enumerate(zip(observations, states, strict=True)):
      where = f"row {row}, step {step}"
      assert obs.prompts[row].dtype == np.int32, where
      assert obs.prompts[row].tolist() == prompt, where
      assert obs.max_new_tokens[row] == budget, where
      assert bool(obs.done[row]) == done, where
    chunks = env.traces[row]
    assert [(c.prompt.tolist(), c.output.tolist()) for c in chunks] == trace, f"row {row}"
    last_prompt, last_output = trace[-1]
    assert env.ended_on_eos[row] == (bool(last_output) and last_output[-1] in EOS_IDS)
    assert env.num_chunks[row] == len(trace)
    assert env.trace_lengths[row] == sum(len(out) for _, out in trace)
    assert env.longest_contexts[row] == max(len(p) + len(o) for p, o in trace)
    assert env.visible_windows[row].tolist() == last_prompt[len(query) :] + last_output
  for obs in observations:
    assert obs.max_new_tokens.dtype == np.int32 and obs.done.dtype == bool
  assert (env.trace_lengths <= env.thinking_budget).all()


CONFIGS = [  # (C, m, h): C − m > m, C − m < m, and h = 0
  (10, 4, 2),
  (10, 6, 2),
  (10, 4, 0),
  (10, 6, 0),
  (7, 3, 1),
]


@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize(("C", "m", "h"), CONFIGS)
@pytest.mark.parametrize("I", [1, 2, 4])
@pytest.mark.parametrize(
  "case",
  [
    "eos_inside_chunk_1",
    "eos_as_last_allowed_token_of_a_later_chunk",
    "never_eos_stops_at_max_chunks",
    "outputs_shorter_than_m",
    "eos_alone",
    "mixed_batch",
  ],
)
def test_delethink_matches_algorithm(mode, C, m, h, I, case):
  by_name = scripts(C, m, I)
  names = list(by_name) if case == "mixed_batch" else [case]
  queries = [fresh(1 + row) for row in range(len(names))]
  row_scripts = [by_name[name] for name in names]
  env = DelethinkEnv(C, m, I, EOS_IDS, keep_head=h, mode=mode)
  check_against_reference(env, mode, queries, row_scripts, C, m, I, h)


def test_the_paper_defaults_fit_the_carry_and_budgets():
  """C = 8192, m = C/2, I = 5, h = 100: budgets, thinking budget and prompt sizes at scale."""
  C, m, I, h = 8192, 4096, 5, 100
  env = DelethinkEnv(C, m, I, eos_ids=[151643], keep_head=h)
  assert env.mode == "train" and env.thinking_budget == C + (I - 1) * (C - m) == 24576
  query = list(range(2, 302))
  obs = env.reset([query])
  assert obs.max_new_tokens.tolist() == [C]
  chunk_1 = list(range(1000, 1000 + C))
  obs = env.step([chunk_1])
  assert obs.max_new_tokens.tolist() == [C - m]
  assert obs.prompts[0].tolist() == query + chunk_1[:h] + chunk_1[-(m - h) :]
  chunk_2 = list(range(20000, 20000 + C - m))
  obs = env.step([chunk_2])
  assert obs.prompts[0].tolist() == query + chunk_1[:h] + chunk_2[-(m - h) :]
  assert env.longest_contexts.tolist() == [len(query) + C]


def test_inference_mode_carries_the_head_and_the_last_m_tokens():
  """The paper's Algorithm 1 with the head folded into the query: q ⊕ y_1[:h] ⊕ y_prev[-m:]."""
  env = DelethinkEnv(8, 3, 3, [0], keep_head=2, mode="inference")
  env.reset([[50, 51]])
  obs = env.step([[2, 3, 4, 5, 6, 7, 8, 9]])
  assert obs.prompts[0].tolist() == [50, 51, 2, 3, 7, 8, 9]
  obs = env.step([[10, 11, 12, 13, 14]])
  assert obs.prompts[0].tolist() == [50, 51, 2, 3, 12, 13, 14]
  obs = env.step([[15, 16, 0]])
  assert obs.done.tolist() == [True] and env.ended_on_eos.tolist() == [True]
  assert env.visible_windows[0].tolist() == [2, 3, 12, 13, 14, 15, 16, 0]


def test_logprobs_are_kept_with_the_trace():
  env = DelethinkEnv(4, 2, 3, [0], keep_head=1)
  env.reset([[9], [8]])
  env.step([[2, 3, 4, 5], [6, 0]], logprobs=[[-0.5, -1.0, -1.5, -2.0], np.array([-0.1, -0.2])])
  env.step([[7, 0], None], logprobs=[[-3.0, -4.0], None])
  traces = env.traces
  assert [c.logprobs.tolist() for c in traces[0]] == [[-0.5, -1.0, -1.5, -2.0], [-3.0, -4.0]]
  assert traces[0][0].logprobs.dtype == np.float32
  assert np.allclose(traces[1][0].logprobs, [-0.1, -0.2])
  env.reset([[9]])
  env.step([[2, 3]])
  assert env.traces[0][0].logprobs is None


def test_a_trace_that_ends_in_chunk_1_is_the_longcot_trace():
  query, output = [5, 6, 7], [2, 3, 4, 1]
  delethink, longcot = DelethinkEnv(8, 4, 3, EOS_IDS, keep_head=2), LongCoTEnv(8, EOS_IDS)
  for env in (delethink, longcot):
    first = env.reset([query])
    assert first.prompts[0].tolist() == query and first.max_new_tokens.tolist() == [8]
    last = env.step([output])
    assert last.done.tolist() == [True] and last.max_new_tokens.tolist() == [0]
  assert [c.output.tolist() for c in delethink.traces[0]] == [output]
  assert [c.output.tolist() for c in longcot.traces[0]] == [output]
  assert delethink.visible_windows[0].tolist() == longcot.visible_windows[0].tolist() == output


@pytest.mark.parametrize("ends_on_eos", [True, False])
def test_longcot_is_one_chunk_of_up_to_budget_tokens(ends_on_eos):
  budget = 6
  output = fresh(budget, eos=0 if ends_on_eos else None)
  env = LongCoTEnv(budget, eos_ids=0)
  assert env.thinking_budget == budget and env.max_chunks == 1
  obs = env.reset([[3, 4], [5]])
  assert obs.max_new_tokens.tolist() == [budget, budget] and not obs.done.any()
  obs = env.step([output, [9, 9]])
  assert obs.done.all() and obs.max_new_tokens.tolist() == [0, 0]
  assert [p.tolist() for p in obs.prompts] == [[], []]
  assert env.ended_on_eos.tolist() == [ends_on_eos, False]
  assert env.trace_lengths.tolist() == [budget, 2]
  assert env.longest_contexts.tolist() == [2 + budget, 3]
  assert env.visible_windows[0].tolist() == output


def test_metrics_before_any_step_and_read_only_arrays():
  env = DelethinkEnv(6, 2, 2, [0], keep_head=1)
  obs = env.reset([[4, 5]])
  assert isinstance(obs, Observation)
  assert env.num_chunks.tolist() == [0] and env.trace_lengths.tolist() == [0]
  assert env.longest_contexts.tolist() == [0] and env.visible_windows[0].tolist() == []
  assert env.ended_on_eos.tolist() == [False] and env.traces == [()]
  env.step([[2, 3]])
  chunk = env.traces[0][0]
  assert isinstance(chunk, Chunk)
  with pytest.raises(ValueError):
    chunk.output[0] = 7  # traces are shared with callers: nobody may rewrite them


def test_step_after_every_row_is_done_changes_nothing():
  env = LongCoTEnv(3, [0])
  env.reset([[4]])
  env.step([[2, 0]])
  obs = env.step([None])
  assert obs.done.all() and len(env.traces[0]) == 1


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    (dict(chunk_size=8, carryover=8, max_chunks=2), "carryover"),
    (dict(chunk_size=8, carryover=9, max_chunks=2), "carryover"),
    (dict(chunk_size=8, carryover=0, max_chunks=2), "carryover"),
    (dict(chunk_size=8, carryover=4, max_chunks=2, keep_head=4), "keep_head"),
    (dict(chunk_size=8, carryover=4, max_chunks=2, keep_head=-1), "keep_head"),
    (dict(chunk_size=8, carryover=4, max_chunks=0), "max_chunks"),
    (dict(chunk_size=8, carryover=4, max_chunks=2.0), "max_chunks"),
    (dict(chunk_size=8.5, carryover=4, max_chunks=2), "chunk_size"),
    (dict(chunk_size=8, carryover=4, max_chunks=2, mode="eval"), "mode"),
    (dict(chunk_size=8, carryover=4, max_chunks=2, eos_ids=[-1]), "eos_ids"),
    (dict(chunk_size=8, carryover=4, max_chunks=2, eos_ids=None), "eos_ids"),
  ],
)
def test_bad_delethink_arguments_are_named(kwargs, name):
  kwargs = {"eos_ids": [0], "keep_head": 1, **kwargs}
  with pytest.raises(ValueError, match=name):
    DelethinkEnv(**kwargs)


@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
def test_bad_longcot_budget_is_named(budget):
  with pytest.raises(ValueError, match="budget"):
    LongCoTEnv(budget, [0])


@pytest.mark.parametrize(
  ("queries", "name"),
  [
    ([[3, 4], []], r"queries\[1\].*empty"),
    ([[3, -4]], r"queries\[0\].*negative"),
    ([[3, 4.5]], r"queries\[0\].*integer"),
    ([[3.0]], r"queries\[0\].*integer"),
    ([[True, False]], r"queries\[0\].*integer"),
    (["abc"], r"queries\[0\]"),
    ([[[3, 4]]], r"queries\[0\].*1-D"),
    ([[2**40]], r"queries\[0\].*int32"),
    (None, "queries"),
  ],
)
def test_bad_queries_are_named(queries, name):
  with pytest.raises(ValueError, match=name):
    DelethinkEnv(8, 4, 2, [0], keep_head=1).reset(queries)


def test_step_before_reset():
  with pytest.raises(ValueError, match="reset"):
    DelethinkEnv(8, 4, 2, [0], keep_head=1).step([[2]])


@pytest.mark.parametrize(
  ("outputs", "logprobs", "name"),
  [
    ([[2] * 9, [2]], None, r"outputs\[0\].*budget of 8"),
    ([[2], [2, 0, 3]], None, r"outputs\[1\].*after an EOS"),
    ([[2], [0, 0]], None, r"outputs\[1\].*after an EOS"),
    ([[2, -1], [2]], None, r"outputs\[0\].*negative"),
    ([[2, 1.5], [2]], None, r"outputs\[0\].*integer"),
    ([np.array([2.0]), [2]], None, r"outputs\[0\].*integer"),
    ([[2], None], None, r"outputs\[1\]"),
    ([[2]], None, "outputs.*batch size"),
    ([[2], [3], [4]], None, "outputs.*batch size"),
    ([[2], [3]], [[-1.0]], "logprobs.*batch size"),
    ([[2], [3, 4]], [[-1.0], [-1.0]], r"logprobs\[1\].*shape"),
    ([[2], [3]], [[-1.0], None], r"logprobs\[1\]"),
  ],
)
def test_bad_step_input_is_named_and_changes_nothing(outputs, logprobs, name):
  env = DelethinkEnv(8, 4, 2, [0], keep_head=1)
  before = env.reset([[5], [6]])
  with pytest.raises(ValueError, match=name):
    env.step(outputs, logprobs)
  assert env.traces == [(), ()]
  after = env.observation
  assert [p.tolist() for p in after.prompts] == [p.tolist() for p in before.prompts]
  assert after.max_new_tokens.tolist() == before.max_new_tokens.tolist()


def test_later_chunks_are_held_to_their_smaller_budget():
  env = DelethinkEnv(8, 4, 3, [0], keep_head=1)
  env.reset([[5]])
  env.step([[2] * 8])
  with pytest.raises(ValueError, match=r"outputs\[0\].*budget of 4"):
    env.step([[2] * 5])


def test_a_new_reset_may_change_the_batch_size():
  env = LongCoTEnv(4, [0])
  env.reset([[5], [6]])
  obs = env.reset([[7]])
  assert len(obs.prompts) == 1
  with pytest.raises(ValueError, match="outputs.*batch size"):
    env.step([[2], [3]])


# -- property: random configurations and streams ---------------------------------------------------


@st.composite
def delethink_runs(draw):
  C = draw(st.integers(2, 12))
  m = draw(st.integers(1, C - 1))
  h = draw(st.integers(0, m - 1))
  I = draw(st.integers(1, 4))
  mode = draw(st.sampled_from(["train", "inference"]))
  rows = draw(st.integers(1, 3))
  queries, row_scripts = [], []
  for _ in range(rows):
    queries.append(fresh(draw(st.integers(1, 3))))
    script = []
    for k in range(I):
      budget = C if k == 0 else C - m
      n = draw(st.integers(0, budget))
      script.append(fresh(n, eos=draw(st.sampled_from([None, *EOS_IDS]))))
    row_scripts.append(script)
  return mode, C, m, h, I, queries, row_scripts


@settings(max_examples=150, deadline=None)
@given(delethink_runs())
def test_random_runs_match_the_algorithm_and_stay_bounded(run):
  mode, C, m, h, I, queries, row_scripts = run
  env = DelethinkEnv(C, m, I, EOS_IDS, keep_head=h, mode=mode)
  check_against_reference(env, mode, queries, row_scripts, C, m, I, h)
  # Bounded context: the carry never exceeds m (train) or h + m (inference) tokens.
  carry_cap = m if mode == "train" else h + m
  for query, trace in zip(queries, env.traces, strict=True):
    first, *later = trace
    assert len(first.prompt) + len(first.output) <= len(query) + C
    for chunk in later:
      assert len(chunk.prompt) <= len(query) + carry_cap
      assert len(chunk.prompt) + len(chunk.output) <= len(query) + carry_cap + C - m


def test_environments_import_no_model_code():
  """`adaptive.envs` is plain Python/NumPy: it imports neither JAX nor `models` nor `train`."""
  code = (
    "import sys, adaptive.envs; "
    "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'models', 'train'}))"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.strip() == "[]"
