"""Checks on what an environment is given, with errors that name the argument or the row.

Token ids leave these checks as read-only 1-D int32 NumPy arrays, so an environment can hand
the same array to its caller and keep it in its traces without copying it again.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max


def check_int(value: object, name: str, minimum: int) -> int:
  """`value` as a Python int, or a ValueError naming `name` if it is not an integer >= minimum."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
  if value < minimum:
    raise ValueError(f"{name}={value!r}: must be >= {minimum}")
  return int(value)


def as_tokens(tokens: object, name: str) -> np.ndarray:
  """`tokens` as a read-only int32 array [T] (T may be 0), or a ValueError naming `name`.

  Accepted: any 1-D sequence of non-negative integers that fit in int32 (lists, tuples, NumPy
  integer arrays). Rejected: floats (even 3.0), booleans, strings, None, nested sequences.
  """
  if isinstance(tokens, str | bytes) or tokens is None:
    raise ValueError(
      f"{name}: must be a 1-D sequence of integer token ids, got {type(tokens).__name__}"
    )
  try:
    array = np.asarray(tokens)
  except (TypeError, ValueError, OverflowError) as e:
    raise ValueError(f"{name}: must be a 1-D sequence of integer token ids ({e})") from e
  if array.ndim != 1:
    raise ValueError(f"{name}: must be 1-D token ids, got shape {array.shape}")
  if array.size == 0:
    # np.asarray([]) is float64; an empty sequence is still valid (zero tokens).
    array = np.zeros(0, np.int32)
  elif array.dtype.kind not in "iu":
    raise ValueError(f"{name}: token ids must be integers, got dtype {array.dtype}")
  if array.size and array.min() < 0:
    position = int(np.argmin(array))
    raise ValueError(f"{name}: token {array[position]} at position {position} is negative")
  if array.size and array.max() > _INT32_MAX:
    position = int(np.argmax(array))
    raise ValueError(
      f"{name}: token {array[position]} at position {position} does not fit in int32"
    )
  result = array.astype(np.int32)
  result.flags.writeable = False
  return result


def as_eos_ids(eos_ids: object) -> np.ndarray:
  """The EOS token ids as an int32 array [E]; one int is accepted for a single id.

  E = 0 is allowed: no token ends a trace, so every trace runs to its chunk cap (generation forced
  to full length, as benchmarks do).
  """
  if isinstance(eos_ids, numbers.Integral) and not isinstance(eos_ids, bool):
    eos_ids = [eos_ids]
  if not isinstance(eos_ids, Iterable):
    raise ValueError(f"eos_ids={eos_ids!r}: must be an int or a sequence of ints")
  return as_tokens(list(eos_ids), "eos_ids")


def check_batch(values: object, name: str, batch_size: int) -> Sequence:
  """`values` if it is a sequence of `batch_size` entries (one per row), else a ValueError."""
  if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
    raise ValueError(
      f"{name}: must be a sequence with one entry per row, got {type(values).__name__}"
    )
  if len(values) != batch_size:
    raise ValueError(
      f"{name}: {len(values)} rows, but the batch has {batch_size} (set by reset); the batch size "
      "cannot change between calls"
    )
  return values


def check_output(tokens: object, row: int, budget: int, eos_ids: np.ndarray) -> np.ndarray:
  """Row `row`'s chunk output as a read-only int32 array [T], checked against its budget.

  The output may hold at most `budget` tokens and may hold an EOS id only as its last token
  (the generator stops on EOS, so nothing can follow one).
  """
  name = f"outputs[{row}]"
  output = as_tokens(tokens, name)
  if len(output) > budget:
    raise ValueError(
      f"{name}: {len(output)} tokens, more than the row's budget of {budget} (obs.max_new_tokens[{row}])"
    )
  eos_positions = np.flatnonzero(np.isin(output[:-1], eos_ids))
  if eos_positions.size:
    position = int(eos_positions[0])
    raise ValueError(
      f"{name}: tokens after an EOS (EOS id {output[position]} at position {position} of "
      f"{len(output)}); a chunk ends at its first EOS"
    )
  return output


def as_logprobs(values: object, row: int, length: int) -> np.ndarray:
  """Row `row`'s per-token log-probabilities as a read-only float32 array [length]."""
  name = f"logprobs[{row}]"
  try:
    array = np.asarray(values, dtype=np.float32)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name}: must be a 1-D sequence of floats ({e})") from e
  if array.shape != (length,):
    raise ValueError(
      f"{name}: shape {array.shape} does not match outputs[{row}], which has {length} tokens"
    )
  array = array.copy()
  array.flags.writeable = False
  return array
