"""Train / held-out splits that never share a problem, and the seeds of their random streams.

Two mechanisms, both needed:

- Disjoint seed streams: every split draws its candidates from its own random stream, derived
  from (task, split, seed); the streams of different splits never coincide (see each task).
- A dedup check that makes disjointness a property of the problem itself: a problem belongs to
  the held-out split iff a hash of its question text falls below `heldout_fraction`. Each split
  drops the candidates that belong to the other one, so even two different random draws that
  produce the same question (small problem spaces) can never land in both splits, whatever the
  seeds and counts.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "heldout")


def check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  return split


def split_of(question: str, heldout_fraction: float) -> str:
  """The split a question belongs to: "heldout" iff its hash falls below `heldout_fraction`."""
  digest = hashlib.blake2b(question.encode("utf-8", errors="replace"), digest_size=8).digest()
  position = int.from_bytes(digest, "big") / 2.0**64
  return "heldout" if position < heldout_fraction else "train"


def stream_seed(*parts: int | str) -> int:
  """A 64-bit seed derived from `parts` (ints and strings), stable across runs and platforms."""
  text = "\x1f".join(str(p) for p in parts)
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
