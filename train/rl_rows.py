"""An RL step's training rows: every chunk of every trace its own row (Delethink aggregation).

    rows = chunk_rows(traces, advantages_R, rows=256, seq_len=160, pad_id=0)
    for k in range(M): minibatch = take_minibatch(rows, k, M)

Row i is one chunk: its sequence is prompt ⊕ output (the chunk's whole context, positions from
0, as the rollout saw it), as next-token pairs tokens = seq[:-1], targets = seq[1:]; loss_mask
and rollout_logprobs are set on the targets that are the chunk's generated tokens. Every row
of trace r carries r's advantage and r's total generated length (all its chunks), which the
`delethink` aggregation divides by. Rows past the chunks are padding (segment_ids 0, loss_mask
0), so the shapes are static: [rows, seq_len].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def chunk_rows(
  traces: Sequence[Sequence], advantages_R, *, rows: int, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
  """The GRPO batch fields (see train/grpo.py) of `traces` (R traces of `adaptive.envs.Chunk`).

  Returns tokens, targets, positions, segment_ids int32 [rows, seq_len]; loss_mask,
  rollout_logprobs float32 [rows, seq_len]; advantages, trace_lengths float32 [rows]; and
  trace_index int32 [rows] (the row's trace, -1 for padding; not a batch field).
  """
  advantages_R = np.asarray(advantages_R, np.float32).reshape(-1)
  if len(advantages_R) != len(traces):
    raise ValueError(f"advantages: {len(advantages_R)} values for {len(traces)} traces")
  chunks = sum(len(t) for t in traces)
  if chunks > rows:
    raise ValueError(f"{chunks} chunks do not fit {rows} rows (batch_size x grpo.minibatches)")
  out = {
    "tokens": np.full((rows, seq_len), pad_id, np.int32),
    "targets": np.full((rows, seq_len), pad_id, np.int32),
    "positions": np.zeros((rows, seq_len), np.int32),
    "segment_ids": np.zeros((rows, seq_len), np.int32),
    "loss_mask": np.zeros((rows, seq_len), np.float32),
    "rollout_logprobs": np.zeros((rows, seq_len), np.float32),
    "advantages": np.zeros(rows, np.float32),
    "trace_lengths": np.zeros(rows, np.float32),
    "trace_index": np.full(rows, -1, np.int32),
  }
  i = 0
  for r, trace in enumerate(traces):
    total = sum(len(chunk.output) for chunk in trace)
    for chunk in trace:
      prompt, output = np.asarray(chunk.prompt), np.asarray(chunk.output)
      seq = np.concatenate([prompt, output]).astype(np.int32)
      n = len(seq) - 1
      if n > seq_len:
        raise ValueError(
          f"seq_len={seq_len}: trace {r} has a chunk of {len(prompt)} prompt + {len(output)} "
          f"generated tokens; rows need seq_len >= {n}"
        )
      out["tokens"][i, :n] = seq[:-1]
      out["targets"][i, :n] = seq[1:]
      out["positions"][i, :n] = np.arange(n)
      out["segment_ids"][i, :n] = 1
      # Target j predicts seq[j + 1]: the output's tokens are targets len(prompt) - 1 onwards.
      first = len(prompt) - 1
      out["loss_mask"][i, first : first + len(output)] = 1.0
      if chunk.logprobs is not None:
        out["rollout_logprobs"][i, first : first + len(output)] = chunk.logprobs
      out["advantages"][i] = advantages_R[r]
      out["trace_lengths"][i] = total
      out["trace_index"][i] = r
      i += 1
  return out


def take_minibatch(rows: dict[str, np.ndarray], k: int, minibatches: int) -> dict[str, np.ndarray]:
  """Minibatch k of M: rows k, k + M, k + 2M, ... (chunks come first, so each minibatch gets
  an equal share of them and of the padding)."""
  return {name: value[k::minibatches] for name, value in rows.items()}
