"""train.rollout against running each problem alone, the LongCoT environment, and teacher forcing.

Tiny model and chunks (C = 8, m = 4) so every test compiles a handful of small programs, and
the tests share shapes so the in-process jit cache serves most of them.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from adaptive.envs import DelethinkEnv, LongCoTEnv
from models import decoding, registry
from train import rollout as rollout_lib

TINY = dict(
  vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
KIND_FIELDS = {
  "dense": {},
  "mod": dict(capacity=0.5),
  "duo": dict(small_mlp_dim=16),
  "first": dict(router_init_bias=0.0),
}
CHUNK, CARRY, MAX_CHUNKS, HEAD = 8, 4, 3, 2
EOS = 36  # With this model, some traces stop on it inside chunk 1, some later, some never.
SAMPLING = decoding.Sampling(temperature=1.0)
# One prompt bucket where buckets are not what a test is about: fewer shapes to compile.
ONE_BUCKET = dict(prompt_buckets=(64,))


def build(kind="dense"):
  model = registry.build(
    kind, registry.make_config(kind, dict(TINY, **KIND_FIELDS[kind])), rngs=nnx.Rngs(0)
  )
  if kind == "first":  # Prompt-dependent layer decisions that differ between rows.
    model.skip_router_w[...] = jax.random.normal(jax.random.key(0), (2, 32)) * 2.0
  return model


def delethink(eos_ids=(EOS,), max_chunks=MAX_CHUNKS):
  return DelethinkEnv(CHUNK, CARRY, max_chunks, list(eos_ids), keep_head=HEAD, mode="train")


@pytest.fixture(scope="module")
def model():
  return build()


@pytest.fixture(scope="module")
def queries():
  rs = np.random.RandomState(0)
  return [rs.randint(1, 64, n).astype(np.int32) for n in (3, 9, 17, 30)]


def assert_traces_equal(got, want, atol=1e-5):
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g.prompt, w.prompt)
    np.testing.assert_array_equal(g.output, w.output)
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=atol, rtol=0)


def test_greedy_batched_delethink_equals_each_problem_alone(model, queries):
  batched = rollout_lib.rollout(model, delethink(), queries, **ONE_BUCKET)
  chunks = [len(t) for t in batched.traces]
  # The batch mixes traces that end on EOS in chunk 1, later, and at the chunk cap.
  assert batched.ended_on_eos.tolist() == [False, True, False, True]
  assert chunks == [3, 1, 3, 2]
  for p, query in enumerate(queries):
    alone = rollout_lib.rollout(model, delethink(), [query], **ONE_BUCKET)
    assert alone.ended_on_eos[0] == batched.ended_on_eos[p]
    assert_traces_equal(batched.traces[p], alone.traces[0])


def test_sampled_problem_is_independent_of_its_batch(model, queries):
  """G samples of problem 1 in a batch of 2 problems equal problem 1's samples alone (same
  problem id): keys are per problem, sample and chunk, and tokens drawn per row."""
  kwargs = dict(num_samples=2, sampling=SAMPLING, rng=jax.random.key(5), **ONE_BUCKET)
  batched = rollout_lib.rollout(model, delethink(), queries[1:3], problem_ids=[7, 2], **kwargs)
  alone = rollout_lib.rollout(model, delethink(), [queries[2]], problem_ids=[2], **kwargs)
  np.testing.assert_array_equal(batched.problem_index, [0, 0, 1, 1])
  np.testing.assert_array_equal(batched.sample_index, [0, 1, 0, 1])
  for g in range(2):
    assert_traces_equal(batched.traces[2 + g], alone.traces[g])
  outputs = [np.concatenate([c.output for c in t]) for t in batched.traces]
  assert not np.array_equal(outputs[2], outputs[3])  # The samples of a problem differ.


def test_delethink_ending_in_chunk_one_equals_longcot(model, queries):
  dele = rollout_lib.rollout(model, delethink(), queries, **ONE_BUCKET)
  long = rollout_lib.rollout(model, LongCoTEnv(CHUNK, [EOS]), queries, **ONE_BUCKET)
  ended_in_one = [len(t) == 1 for t in dele.traces]
  assert any(ended_in_one) and not all(ended_in_one)
  for p in range(len(queries)):
    # Chunk 1 of every Delethink trace is the LongCoT trace with budget C ...
    assert_traces_equal(dele.traces[p][:1], long.traces[p])
    if ended_in_one[p]:  # ... and a trace that ends there is the whole LongCoT rollout.
      assert_traces_equal(dele.traces[p], long.traces[p])
      assert dele.ended_on_eos[p] and long.ended_on_eos[p]


def test_compiles_are_bounded_by_the_buckets_and_reported(model):
  """Two RL steps of new problems with prompt lengths across buckets and rows stopping at
  different chunks: at most 1 + MAX_PHASES programs per call shape (rows, prompt bucket,
  max_new_tokens) plus one key derivation per row count; a repeated shape compiles nothing."""
  rs = np.random.RandomState(1)
  eos_ids = list(range(30, 38))  # likely enough that traces end at different chunks
  shapes, compiles, decoding_compiles = set(), 0, 0
  for step in range(2):
    queries = [rs.randint(1, 64, n) for n in rs.randint(2, 41, size=3)]
    env = DelethinkEnv(CHUNK, CARRY, MAX_CHUNKS, eos_ids, keep_head=HEAD)
    result = rollout_lib.rollout(
      model, env, queries, num_samples=2, sampling=SAMPLING, rng=jax.random.key(step)
    )
    stats = result.stats
    print(f"step {step}: {stats.summary()}; shapes {stats.shapes}; {stats.decoding_compiles}")
    assert stats.generated_tokens == sum(len(c.output) for t in result.traces for c in t)
    assert stats.steps == max(len(t) for t in result.traces)
    assert stats.tokens_per_second > 0 and stats.seconds > 0
    new_shapes = set(stats.shapes) - shapes
    bound = len(new_shapes) * (1 + decoding.MAX_PHASES) + len({b for b, _, _ in new_shapes})
    assert stats.compiles <= bound, (step, stats.compiles, bound)
    shapes |= new_shapes
    compiles += stats.compiles
    decoding_compiles += sum(stats.decoding_compiles.values())
  row_counts, buckets = {b for b, _, _ in shapes}, {s for _, s, _ in shapes}
  print(f"2 steps: {compiles} compiles ({decoding_compiles} decoding) over {len(shapes)} shapes")
  assert len(row_counts) > 1 and len(buckets) > 1  # The run did vary in both.
  assert compiles <= len(shapes) * (1 + decoding.MAX_PHASES) + len(row_counts)
  # Other problems, keys and lengths in the same bucket: nothing new to compile.
  env = LongCoTEnv(CHUNK, [EOS])
  kwargs = dict(num_samples=2, sampling=SAMPLING)
  rollout_lib.rollout(
    model, env, [rs.randint(1, 64, n) for n in (20, 3, 9)], rng=jax.random.key(1), **kwargs
  )
  again = rollout_lib.rollout(
    model, env, [rs.randint(1, 64, n) for n in (30, 17, 4)], rng=jax.random.key(2), **kwargs
  )
  assert again.stats.compiles == 0, again.stats


@pytest.mark.parametrize("bad", [64, -1])
def test_out_of_vocab_query_ids_raise_naming_row_and_id_before_compiling(model, queries, bad):
  broken = [q.copy() for q in queries]
  broken[1][2] = bad
  before = rollout_lib._Compiles.total(), decoding.compile_counts()
  with pytest.raises(ValueError, match=rf"queries\[1\] holds token id {bad} at position 2"):
    rollout_lib.rollout(model, delethink(), broken)
  assert (rollout_lib._Compiles.total(), decoding.compile_counts()) == before


def test_out_of_vocab_prompt_from_the_env_raises_naming_row_and_id(model, queries):
  class BadCarry(DelethinkEnv):
    def _next_carry(self, query, trace):
      return np.array([64], np.int32)

  env = BadCarry(CHUNK, CARRY, MAX_CHUNKS, [EOS], keep_head=HEAD)
  with pytest.raises(
    ValueError, match=r"obs.prompts\[0\] \(problem 0, sample 0\) holds token id 64"
  ):
    rollout_lib.rollout(model, env, queries, **ONE_BUCKET)


def test_bad_arguments_raise():
  model = build()
  for kwargs, message in [
    (dict(num_samples=0), "num_samples"),
    (dict(sampling=SAMPLING), "rng"),
    (dict(rng=3), "rng"),
    (dict(prompt_buckets=(32, 16)), "prompt_buckets"),
    (dict(pad_id=64), "pad_id"),
    (dict(problem_ids=[0]), "problem_ids"),
  ]:
    with pytest.raises(ValueError, match=message):
      rollout_lib.rollout(model, delethink(), [[1, 2], [3]], **kwargs)
  with pytest.raises(ValueError, match="fits no bucket"):
    rollout_lib.rollout(model, delethink(), [[1] * 20], prompt_buckets=(16,))


def _teacher_forced_logprobs(model, kind, chunks):
  """log_softmax of each chunk's output tokens under one forward pass over prompt ⊕ output,
  positions from 0 (every chunk a fresh sequence); sequences right-padded to 64 (causal)."""
  length = 64
  seq = np.zeros((len(chunks), length), np.int32)
  for i, c in enumerate(chunks):
    full = np.concatenate([c.prompt, c.output])
    seq[i, : len(full)] = full
  prompt_lengths = np.array([len(c.prompt) for c in chunks], np.int32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, seq, prompt_lengths):
    m = nnx.merge(graphdef, state)
    if kind == "mod":  # The decode rule (threshold routing), causal.
      return m(seq, routing="threshold")[0]
    if kind == "first":  # Layers decided from the prompt, then every token through them.
      return m.prefill(seq, prompt_lengths, m.init_cache(seq.shape[0], seq.shape[1]))[0]
    return m(seq)[0]

  logp = np.asarray(jax.nn.log_softmax(forward(state, seq, prompt_lengths), -1), np.float32)
  out = []
  for i, c in enumerate(chunks):
    rows = len(c.prompt) - 1 + np.arange(len(c.output))
    out.append(logp[i, rows, c.output])
  return out


@pytest.mark.parametrize("kind", list(KIND_FIELDS))
def test_rollout_logprobs_equal_teacher_forcing_per_chunk(kind, queries):
  """Every model kind that decodes: a sampled Delethink rollout's per-token log-probs are the
  teacher-forced log_softmax of the chosen tokens for each chunk's fresh sequence."""
  model = build(kind)
  result = rollout_lib.rollout(
    model,
    delethink(eos_ids=(), max_chunks=2),
    queries[:2],
    num_samples=2,
    sampling=SAMPLING,
    rng=jax.random.key(3),
    **ONE_BUCKET,
  )
  chunks = [c for t in result.traces for c in t]
  assert len(chunks) == 8 and all(c.logprobs.dtype == np.float32 for c in chunks)
  assert any(
    c.prompt[: len(q)].tolist() == q.tolist() and len(c.prompt) > len(q)
    for c in chunks
    for q in queries[:2]
  )  # later chunks: query ⊕ carry
  for c, want in zip(chunks, _teacher_forced_logprobs(model, kind, chunks), strict=True):
    np.testing.assert_allclose(c.logprobs, want, atol=1e-5, rtol=0)


def test_progress_bar_runs(model, queries, capsys):
  result = rollout_lib.rollout(
    model, LongCoTEnv(CHUNK, [EOS]), queries, progress=True, **ONE_BUCKET
  )
  assert result.stats.steps == 1
  assert "rollout" in capsys.readouterr().err
