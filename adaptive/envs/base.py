"""What every reasoning environment is: a batch of traces grown chunk by chunk over token ids.

An environment holds no model. `reset(queries)` starts one trace per query and says what each
row's first chunk is (its prompt and how many tokens it may generate); `step(outputs)` takes what
the generator wrote for every active row and says what the next chunk is, or that the row is
done. Every chunk is a fresh sequence: its prompt is the query followed by a *carry* (tokens of
earlier chunks the environment chooses to keep), positions restart at 0 and no KV cache crosses
a chunk boundary. Subclasses choose the budgets, the chunk cap and the carry.

Shapes: B rows (fixed by `reset`), P prompt tokens, T tokens generated in a chunk. Token ids are
int32; log-probabilities float32 (natural log).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import numpy as np

from adaptive.envs import validation


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One generation call of a trace.

  Attributes:
    prompt: int32 [P], the chunk's whole prompt (query ⊕ carry).
    output: int32 [T], what the generator wrote (ending with an EOS id if it stopped on one).
    logprobs: float32 [T], the generator's log-probability of each output token, or None if
      `step` was not given any.
  """

  prompt: np.ndarray
  output: np.ndarray
  logprobs: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Observation:
  """What the generator runs next.

  Attributes:
    prompts: B int32 arrays [P_i], row i's next prompt (empty for rows that are done).
    max_new_tokens: int32 [B], how many tokens row i's next chunk may generate (0 when done).
    done: bool [B], True once row i's trace has ended (on EOS or at the chunk cap).
  """

  prompts: list[np.ndarray]
  max_new_tokens: np.ndarray
  done: np.ndarray


_EMPTY = np.zeros(0, np.int32)
_EMPTY.flags.writeable = False


class ChunkedEnv(abc.ABC):
  """A batch of chunked traces; subclasses define budgets, the chunk cap and the carry.

  After `reset`, these describe the traces so far (rows with no chunk yet count zeros):
    traces[i]: row i's chunks in order, a tuple of `Chunk`.
    ended_on_eos: bool [B], the row's last chunk ended with an EOS id.
    num_chunks: int32 [B], chunks generated.
    trace_lengths: int32 [B], tokens generated over all chunks (the thinking length, and the
      normaliser of the Delethink loss).
    longest_contexts: int32 [B], the longest sequence any chunk used, prompt + output tokens.
    visible_windows: B int32 arrays, the last chunk's carry ⊕ its output: everything the model
      saw of its own reasoning when it wrote its last token, the text the reward is computed on.
  """

  def __init__(self, eos_ids: int | Sequence[int]):
    self.eos_ids = validation.as_eos_ids(eos_ids)
    self._queries: list[np.ndarray] | None = None

  # -- what a subclass defines -----------------------------------------------------------------

  @property
  @abc.abstractmethod
  def max_chunks(self) -> int:
    """The most chunks a trace may have; the trace stops after this many."""

  @property
  @abc.abstractmethod
  def thinking_budget(self) -> int:
    """The most tokens a trace may generate over all its chunks."""

  @abc.abstractmethod
  def _budget(self, chunk_index: int) -> int:
    """How many tokens chunk `chunk_index` (0 = the first) may generate."""

  @abc.abstractmethod
  def _next_carry(self, query: np.ndarray, trace: tuple[Chunk, ...]) -> np.ndarray:
    """int32 [K]: the tokens after the query in the next prompt of a trace that goes on."""

  # -- the episode -----------------------------------------------------------------------------

  def reset(self, queries: Sequence[Sequence[int]]) -> Observation:
    """Starts one trace per query; its first chunk's prompt is the query alone.

    Args:
      queries: B non-empty 1-D sequences of token ids (chat template already applied).
    Returns:
      The first chunk of every row: prompt = query, budget = the first chunk's budget.
    """
    if isinstance(queries, str | bytes) or not isinstance(queries, Sequence | np.ndarray):
      raise ValueError(
        f"queries: must be a sequence of token-id sequences, got {type(queries).__name__}"
      )
    checked = []
    for row, query in enumerate(queries):
      tokens = validation.as_tokens(query, f"queries[{row}]")
      if len(tokens) == 0:
        raise ValueError(f"queries[{row}]: empty query (a prompt needs at least one token)")
      checked.append(tokens)
    batch_size = len(checked)
    self._queries = checked
    self._traces: list[tuple[Chunk, ...]] = [()] * batch_size
    self._prompts = list(checked)
    self._max_new_tokens = np.full(batch_size, self._budget(0), np.int32)
    self._done = np.zeros(batch_size, bool)
    self._ended_on_eos = np.zeros(batch_size, bool)
    return self.observation

  def step(
    self,
    outputs: Sequence[Sequence[int] | None],
    logprobs: Sequence[Sequence[float] | None] | None = None,
  ) -> Observation:
    """Records every active row's chunk and says what each row runs next.

    Args:
      outputs: B token sequences; outputs[i] is what row i generated in this chunk, at most
        obs.max_new_tokens[i] tokens, an EOS id only as its last token. Entries of rows that are
        done are ignored (they may be None).
      logprobs: None, or B float sequences shaped like `outputs` (per-token log-probabilities,
        kept with the trace); entries of rows that are done are ignored.
    Returns:
      The next observation. A row is done when its chunk ended with an EOS id or it has
      `max_chunks` chunks.
    Raises:
      ValueError naming the argument or the row; the environment is left unchanged.
    """
    if self._queries is None:
      raise ValueError("step before reset: call env.reset(queries) first")
    batch_size = self.batch_size
    validation.check_batch(outputs, "outputs", batch_size)
    if logprobs is not None:
      validation.check_batch(logprobs, "logprobs", batch_size)
    active = np.flatnonzero(~self._done)
    # Check every row before changing any, so a bad batch leaves the environment as it was.
    checked = {}
    for row in active:
      output = validation.check_output(
        outputs[row], row, int(self._max_new_tokens[row]), self.eos_ids
      )
      row_logprobs = None
      if logprobs is not None:
        row_logprobs = validation.as_logprobs(logprobs[row], row, len(output))
      checked[row] = (output, row_logprobs)
    for row, (output, row_logprobs) in checked.items():
      self._record(row, output, row_logprobs)
    return self.observation

  def _record(self, row: int, output: np.ndarray, logprobs: np.ndarray | None) -> None:
    chunk = Chunk(prompt=self._prompts[row], output=output, logprobs=logprobs)
    trace = self._traces[row] = (*self._traces[row], chunk)
    ended_on_eos = len(output) > 0 and bool(np.isin(output[-1], self.eos_ids))
    self._ended_on_eos[row] = ended_on_eos
    if ended_on_eos or len(trace) >= self.max_chunks:
      self._done[row] = True
      self._prompts[row] = _EMPTY
      self._max_new_tokens[row] = 0
      return
    query = self._queries[row]
    prompt = np.concatenate([query, self._next_carry(query, trace)]).astype(np.int32)
    prompt.flags.writeable = False
    self._prompts[row] = prompt
    self._max_new_tokens[row] = self._budget(len(trace))

  # -- what the caller reads -------------------------------------------------------------------

  def _require_reset(self) -> None:
    if self._queries is None:
      raise ValueError("the environment has no traces before reset: call env.reset(queries)")

  @property
  def observation(self) -> Observation:
    """The current observation (what the last `reset` or `step` returned)."""
    self._require_reset()
    return Observation(
      prompts=list(self._prompts),
      max_new_tokens=self._max_new_tokens.copy(),
      done=self._done.copy(),
    )

  @property
  def batch_size(self) -> int:
    """B, the number of rows, fixed by `reset`."""
    self._require_reset()
    return len(self._queries)

  @property
  def queries(self) -> list[np.ndarray]:
    """B int32 arrays, the queries given to `reset`."""
    self._require_reset()
    return list(self._queries)

  @property
  def traces(self) -> list[tuple[Chunk, ...]]:
    """traces[i]: row i's chunks in order (a tuple; chunks and their arrays are read-only)."""
    self._require_reset()
    return list(self._traces)

  @property
  def done(self) -> np.ndarray:
    """bool [B], True once a row's trace has ended."""
    self._require_reset()
    return self._done.copy()

  @property
  def ended_on_eos(self) -> np.ndarray:
    """bool [B], True if the row's last chunk ended with an EOS id (False before any chunk)."""
    self._require_reset()
    return self._ended_on_eos.copy()

  @property
  def num_chunks(self) -> np.ndarray:
    """int32 [B], how many chunks each row has generated."""
    self._require_reset()
    return np.array([len(trace) for trace in self._traces], np.int32)

  @property
  def trace_lengths(self) -> np.ndarray:
    """int32 [B], tokens generated over all of a row's chunks (EOS included)."""
    self._require_reset()
    return np.array([sum(len(chunk.output) for chunk in trace) for trace in self._traces], np.int32)

  @property
  def longest_contexts(self) -> np.ndarray:
    """int32 [B], the longest prompt + output, in tokens, of any chunk of the row (0 if none)."""
    self._require_reset()
    return np.array(
      [max((len(c.prompt) + len(c.output) for c in trace), default=0) for trace in self._traces],
      np.int32,
    )

  @property
  def visible_windows(self) -> list[np.ndarray]:
    """B int32 arrays: the last chunk's prompt after the query ⊕ the last chunk's output.

    This is the reference's reward input (it decodes carry ⊕ last output); for a one-chunk trace
    it is the whole output. Empty for a row with no chunk yet.
    """
    self._require_reset()
    windows = []
    for query, trace in zip(self._queries, self._traces, strict=True):
      if not trace:
        windows.append(_EMPTY)
        continue
      last = trace[-1]
      window = np.concatenate([last.prompt[len(query) :], last.output]).astype(np.int32)
      window.flags.writeable = False
      windows.append(window)
    return windows
