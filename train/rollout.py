"""Rollouts: a reasoning environment driven by `models.decoding.generate`, one batch per step.

    env = DelethinkEnv(chunk_size=8192, carryover=4096, max_chunks=5, eos_ids=[eos])
    result = rollout(model, env, queries, num_samples=8, sampling=Sampling(temperature=0.6),
                     rng=jax.random.key(step), progress=True)
    result.traces[r]            # row r = problem r // 8, sample r % 8: its chunks in order,
                                # each with .prompt, .output and .logprobs (float32, per token)
    result.ended_on_eos, result.stats.tokens_per_second, result.stats.compiles

Every step of the environment is one `generate` call over all of its active rows. The call's
shape is bucketed so that a whole RL run compiles a small, bounded set of programs:
  prompts are right-padded to the smallest of `prompt_buckets` that holds the longest active
    prompt (default: powers of two from 16);
  the rows are padded to the smallest of `batch_buckets` that holds the active rows (default:
    powers of two, and the whole batch); padding rows have budget 0 and generate nothing;
  max_new_tokens is the largest budget of an active row, and each row stops at its own budget
    (`generate`'s max_new_tokens_B), so no row writes past its budget and no EOS past it counts.
Each distinct (rows, prompt bucket, max_new_tokens) compiles at most 1 + decoding.MAX_PHASES
programs, once; `RolloutStats.compiles` counts every program XLA built during the rollout, and
`RolloutStats.shapes` lists the call shapes used.

Randomness is explicit and independent of how rows are batched: row (problem p, sample g)
draws its chunk c with key fold_in(fold_in(fold_in(rng, problem_ids[p]), g), c), and
`generate` draws token i of that chunk with fold_in(that key, i) from that row's logits alone.
A row's trace therefore depends on the model, its query, its problem id and sample index, and
(through float rounding only) on the batch around it.

Token ids are checked on the host before anything compiles: a query or a prompt id outside
[0, vocab_size) is a ValueError naming the row (problem, sample) and the id.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from models import decoding


@dataclasses.dataclass(frozen=True)
class RolloutStats:
  """What a rollout cost.

  Attributes:
    seconds: wall time of the whole rollout (compiles included).
    generated_tokens: tokens written over every chunk of every row (EOS included).
    tokens_per_second: generated_tokens / seconds.
    steps: generate calls (environment steps).
    compiles: programs XLA built (compiled or read from the persistent cache) during the
      rollout, by anything in this process.
    decoding_compiles: of those, `models.decoding`'s programs, per jitted function.
    shapes: the distinct (rows, prompt bucket, max_new_tokens) of the generate calls, in order
      of first use.
  """

  seconds: float
  generated_tokens: int
  tokens_per_second: float
  steps: int
  compiles: int
  decoding_compiles: dict[str, int]
  shapes: tuple[tuple[int, int, int], ...]

  def summary(self) -> str:
    """One line for a progress log."""
    return (
      f"rollout {self.seconds:.1f}s, {self.generated_tokens} tokens, "
      f"{self.tokens_per_second:.1f} tok/s, {self.steps} steps, {self.compiles} compiles over "
      f"{len(self.shapes)} shapes"
    )


@dataclasses.dataclass(frozen=True)
class Rollout:
  """A finished rollout; rows are problem-major (row = problem * num_samples + sample).

  Attributes:
    traces: per row, its chunks in order (`adaptive.envs.Chunk`: prompt, output, logprobs).
    ended_on_eos: bool [R], the row's last chunk ended with an EOS id.
    problem_index: int32 [R], index into `queries` of each row.
    sample_index: int32 [R], the row's sample number within its problem, in [0, G).
    stats: `RolloutStats`.
  """

  traces: list
  ended_on_eos: np.ndarray
  problem_index: np.ndarray
  sample_index: np.ndarray
  stats: RolloutStats


# -- shapes ----------------------------------------------------------------------------------


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def bucket_length(length: int, buckets: Sequence[int] | None, *, minimum: int = 16) -> int:
  """The padded prompt length for a prompt of `length` tokens.

  buckets: increasing lengths; the smallest >= length. None: the next power of two, at least
  `minimum`. A prompt longer than every bucket is a ValueError.
  """
  if buckets is None:
    return max(minimum, _next_power_of_two(length))
  for bucket in buckets:
    if bucket >= length:
      return int(bucket)
  raise ValueError(
    f"prompt_buckets={tuple(buckets)}: a prompt of {length} tokens fits no bucket; add a "
    f"bucket >= {length}"
  )


def bucket_rows(active: int, total: int, buckets: Sequence[int] | None) -> int:
  """Rows of the generate call for `active` rows out of `total`.

  buckets: increasing row counts; the smallest >= active. None: the next power of two, capped
  at `total` (so at most log2(total) + 2 sizes).
  """
  if buckets is None:
    return min(total, _next_power_of_two(active))
  for bucket in buckets:
    if bucket >= active:
      return int(bucket)
  return total


def _check_buckets(name: str, buckets) -> tuple[int, ...] | None:
  if buckets is None:
    return None
  values = tuple(buckets)
  if not values or any(
    isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in values
  ):
    raise ValueError(f"{name}={buckets!r}: must be positive integers, or None")
  if list(values) != sorted(set(values)):
    raise ValueError(f"{name}={buckets!r}: must be strictly increasing")
  return tuple(int(v) for v in values)


# -- keys and compile counting ---------------------------------------------------------------


@jax.jit
def _row_keys(rng, problem_ids_R, sample_ids_R, chunk_ids_R):
  """Typed keys [R]: fold_in(fold_in(fold_in(rng, problem), sample), chunk) per row."""

  def one(problem, sample, chunk):
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, problem), sample), chunk)

  return jax.vmap(one)(problem_ids_R, sample_ids_R, chunk_ids_R)


class _Compiles:
  """Counts XLA program builds through jax.monitoring (registered on first use)."""

  count = 0
  _registered = False

  @classmethod
  def total(cls) -> int:
    if not cls._registered:
      from jax._src import dispatch  # the event name: no public constant exists

      event_name = dispatch.BACKEND_COMPILE_EVENT

      def listener(event, secs, **kwargs):
        if event == event_name:
          cls.count += 1

      jax.monitoring.register_event_duration_secs_listener(listener)
      cls._registered = True
    return cls.count


# -- the driver ------------------------------------------------------------------------------

GREEDY = decoding.Sampling()


class _Batch(NamedTuple):
  """One generate call: active rows first, then padding rows (budget 0, one pad token)."""

  tokens_BS: np.ndarray  # int32 [B, S], right-padded prompts
  lengths_B: np.ndarray  # int32 [B]
  budgets_B: np.ndarray  # int32 [B], 0 for padding rows
  rows_B: np.ndarray  # int32 [B], the env row of each batch row (0 for padding rows)
  shape: tuple[int, int, int]  # (B, S, N = the largest budget)


def _pack(obs, active, total: int, prompt_buckets, batch_buckets, pad_id: int) -> _Batch:
  """The bucketed batch of the active rows' prompts."""
  lengths = np.array([len(obs.prompts[r]) for r in active], np.int32)
  if lengths.min() < 1:
    raise ValueError(f"obs.prompts[{active[np.argmin(lengths)]}]: an active row's prompt is empty")
  s = bucket_length(int(lengths.max()), prompt_buckets)
  b = max(bucket_rows(len(active), total, batch_buckets), len(active))
  tokens_BS = np.full((b, s), pad_id, np.int32)
  for j, r in enumerate(active):
    tokens_BS[j, : lengths[j]] = obs.prompts[r]
  lengths_B, budgets_B, rows_B = np.ones(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
  lengths_B[: len(active)] = lengths
  budgets_B[: len(active)] = obs.max_new_tokens[active]
  rows_B[: len(active)] = active
  return _Batch(tokens_BS, lengths_B, budgets_B, rows_B, (b, s, int(budgets_B.max())))


def _as_key(rng, sampling: decoding.Sampling):
  if rng is None:
    if not sampling.greedy:
      raise ValueError(
        f"rng: a PRNG key is required when sampling.temperature={sampling.temperature} > 0"
      )
    return None
  if isinstance(rng, jax.Array) and jax.numpy.issubdtype(rng.dtype, jax.dtypes.prng_key):
    if rng.shape == ():
      return rng
  elif isinstance(rng, jax.Array) and rng.dtype == np.uint32 and rng.shape == (2,):
    return jax.random.wrap_key_data(rng)
  raise ValueError(f"rng={rng!r}: must be one jax.random.key (or a legacy uint32[2] key)")


def _check_ids(tokens: np.ndarray, vocab: int, what: str) -> None:
  bad = np.flatnonzero((tokens < 0) | (tokens >= vocab))
  if bad.size:
    position = int(bad[0])
    raise ValueError(
      f"{what} holds token id {int(tokens[position])} at position {position}, outside "
      f"[0, vocab_size={vocab})"
    )


def rollout(
  model,
  env,
  queries: Sequence[Sequence[int]],
  *,
  num_samples: int = 1,
  sampling: decoding.Sampling = GREEDY,
  rng: jax.Array | None = None,
  problem_ids: Sequence[int] | None = None,
  prompt_buckets: Sequence[int] | None = None,
  batch_buckets: Sequence[int] | None = None,
  pad_id: int = 0,
  cache_dtype=None,
  cache_growth: float | None = 1.25,
  progress: bool = False,
) -> Rollout:
  """Runs `env` to the end on `num_samples` copies of every query.

  Args:
    model: any model `models.decoding.generate` decodes (every kind of `models.registry`).
    env: an `adaptive.envs` environment (`reset`, `step`, `traces`, `ended_on_eos`,
      `eos_ids`, `max_chunks`); it is reset here and holds the traces afterwards.
    queries: P non-empty 1-D token-id sequences (chat template applied).
    num_samples: G >= 1 traces per query; rows are problem-major.
    sampling: see `decoding.Sampling`; greedy by default.
    rng: one PRNG key; required unless greedy. See the module docstring for the key tree.
    problem_ids: P integers naming the problems for the key tree (default 0..P-1); give
      stable ids (e.g. dataset indices) to make a problem's samples independent of which
      batch it is in.
    prompt_buckets, batch_buckets: see `bucket_length` / `bucket_rows`.
    pad_id: prompt padding and the token after a row stops (any id in the vocabulary).
    cache_dtype, cache_growth: passed to `generate`.
    progress: show a tqdm bar over environment steps (tokens/s, active rows).

  Returns:
    `Rollout`; per-token log-probabilities are the model's raw log_softmax of each sampled
    token (what importance ratios need), in `traces[r][c].logprobs`.
  """
  # Validate everything before anything compiles.
  vocab = model.config.vocab_size
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
    raise ValueError(f"num_samples={num_samples!r}: must be an integer >= 1")
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r}: must be an integer >= 1")
  if not isinstance(sampling, decoding.Sampling):
    raise ValueError(f"sampling={sampling!r}: must be a decoding.Sampling")
  key = _as_key(rng, sampling)
  prompt_buckets = _check_buckets("prompt_buckets", prompt_buckets)
  batch_buckets = _check_buckets("batch_buckets", batch_buckets)
  if (
    isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < vocab
  ):
    raise ValueError(f"pad_id={pad_id!r}: must be a token id in [0, vocab_size={vocab})")
  queries = list(queries)
  num_problems = len(queries)
  if problem_ids is None:
    problem_ids = range(num_problems)
  problem_ids = np.asarray(list(problem_ids))
  if problem_ids.shape != (num_problems,) or (
    num_problems
    and (
      not np.issubdtype(problem_ids.dtype, np.integer)
      or problem_ids.min() < 0
      or problem_ids.max() > np.iinfo(np.int32).max
    )
  ):
    raise ValueError(
      f"problem_ids: must be {num_problems} integers in [0, 2**31) (one per query), got "
      f"{problem_ids!r}"
    )
  problem_ids = problem_ids.astype(np.int32)
  for p, query in enumerate(queries):
    array = np.asarray(query)
    if array.ndim == 1 and array.size and np.issubdtype(array.dtype, np.integer):
      _check_ids(array, vocab, f"queries[{p}]")
  eos_ids = np.asarray(env.eos_ids, np.int64).reshape(-1)
  if eos_ids.size:
    _check_ids(eos_ids, vocab, "env.eos_ids")

  problem_R = np.repeat(np.arange(num_problems), num_samples).astype(np.int32)
  sample_R = np.tile(np.arange(num_samples), num_problems).astype(np.int32)
  obs = env.reset([queries[p] for p in problem_R])  # the env validates the queries
  total = len(problem_R)
  compiles_before, decoding_before = _Compiles.total(), decoding.compile_counts()
  start = time.perf_counter()
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=env.max_chunks, desc="rollout", unit="chunk")
  shapes: dict[tuple[int, int, int], None] = {}
  generated, steps = 0, 0
  try:
    while not obs.done.all():
      active = np.flatnonzero(~obs.done)
      batch = _pack(obs, active, total, prompt_buckets, batch_buckets, pad_id)
      for r in active:
        _check_ids(
          obs.prompts[r], vocab, f"obs.prompts[{r}] (problem {problem_R[r]}, sample {sample_R[r]})"
        )
      shapes.setdefault(batch.shape, None)
      row_rng = None
      if key is not None and not sampling.greedy:
        chunk_B = env.num_chunks[batch.rows_B].astype(np.int32)
        row_rng = _row_keys(
          key,
          jax.device_put(problem_ids[problem_R[batch.rows_B]]),
          jax.device_put(sample_R[batch.rows_B]),
          jax.device_put(chunk_B),
        )
      out = decoding.generate(
        model,
        batch.tokens_BS,
        batch.lengths_B,
        max_new_tokens=batch.shape[2],
        max_new_tokens_B=batch.budgets_B,
        sampling=sampling,
        eos_ids=tuple(int(e) for e in eos_ids),
        rng=row_rng,
        pad_id=pad_id,
        cache_dtype=cache_dtype,
        cache_growth=cache_growth,
      )
      out_tokens, out_logprobs = np.asarray(out.tokens_BN), np.asarray(out.logprobs_BN)
      out_lengths = np.asarray(out.lengths_B)
      outputs: list = [None] * total
      logprobs: list = [None] * total
      for j, r in enumerate(active):
        # generate stops each row at its budget; the cut is the env contract made explicit.
        length = min(int(out_lengths[j]), int(batch.budgets_B[j]))
        outputs[r] = out_tokens[j, :length]
        logprobs[r] = out_logprobs[j, :length]
        generated += length
      obs = env.step(outputs, logprobs)
      steps += 1
      if bar is not None:
        seconds = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(active=int((~obs.done).sum()), tok_s=f"{generated / seconds:.0f}")
  finally:
    if bar is not None:
      bar.close()
  seconds = time.perf_counter() - start
  decoding_after = decoding.compile_counts()
  stats = RolloutStats(
    seconds=seconds,
    generated_tokens=generated,
    tokens_per_second=generated / seconds if seconds > 0 else 0.0,
    steps=steps,
    compiles=_Compiles.total() - compiles_before,
    decoding_compiles={k: decoding_after[k] - decoding_before[k] for k in decoding_after},
    shapes=tuple(shapes),
  )
  return Rollout(
    traces=env.traces,
    ended_on_eos=env.ended_on_eos,
    problem_index=problem_R,
    sample_index=sample_R,
    stats=stats,
  )
