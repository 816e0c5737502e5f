"""SFT examples for the data pipeline: chat-formatted task problems with their worked traces.

    data = train.data.default_data_config()
    data.source = "sft:long_sum"                      # any adaptive.tasks name after "sft:"
    data.task_options = ml_collections.ConfigDict(dict(length=16, min_length=4))
    it = train.data.make_iterator(data, seq_len=S, global_batch_size=B, seed=0)

Example i of the train split is the task's i-th "train" problem for seed `corpus_seed`
(`Task.problems("train", n, corpus_seed)`); the eval split uses the task's "heldout" problems,
which never share a question with train (`adaptive.tasks.splits`). `num_examples` /
`eval_examples` set the split sizes; problems are generated on first access and cached.

One example is rendered as `ChatTemplate.sft_target(question, task.sft_completion(problem))`
-> (prompt, target) and tokenized as the rollout sees it, the prompt and the target separately:

    ids      = encode_prompt(prompt) ⊕ encode(target) ⊕ EOS   (encode_prompt: BOS ⊕ prompt for
                                                             the byte tokenizer; a Hugging Face
                                                             template writes its own BOS)
    response = 0 on the prompt ids, 1 on the target ids and the EOS

and the next-token pairs (tokens, targets) = (ids[:-1], ids[1:]) get loss_mask = response[1:]:
the loss covers exactly the target tokens and the EOS that ends them, never the prompt.

An example with more than seq_len pairs (`data.sft_too_long`):
  "drop" (default): skipped. A response cut off from its question teaches the model to
    continue a trace it cannot check; choose seq_len (or the task's length) so examples fit.
    Validation fails when none of the first examples of a split fits, and a run of
    MAX_DROPPED_IN_A_ROW skipped examples in a row stops the pipeline with a ValueError.
  "cut": cut into pieces of at most seq_len pairs, each its own segment, as pretraining
    documents are; pieces without a response token are skipped.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from adaptive import tasks as tasks_lib
from train.tokenizer import ByteTokenizer

SOURCE_PREFIX = "sft:"
TOO_LONG = ("drop", "cut")
MAX_DROPPED_IN_A_ROW = 1000


def default_fields() -> dict[str, Any]:
  """The data-section fields only SFT sources use (defaults)."""
  return {
    # make_task options of the task named in data.source (e.g. length=16 for long_sum).
    "task_options": ml_collections.ConfigDict(),
    # "auto": plain for the byte tokenizer, else the chat template of the tokenizer.json's
    # directory; "plain"; or a Hugging Face tokenizer directory.
    "chat_template": "auto",
    "sft_too_long": "drop",  # "drop" | "cut": examples longer than seq_len (module docstring)
  }


def is_sft_source(source) -> bool:
  return isinstance(source, str) and source.startswith(SOURCE_PREFIX)


def task_options(data) -> dict[str, Any]:
  options = data.task_options
  return dict(options.to_dict() if hasattr(options, "to_dict") else options)


def make_task(data) -> tasks_lib.Task:
  """The task of an "sft:TASK" source; ValueError naming data.source or data.task_options."""
  name = data.source[len(SOURCE_PREFIX) :]
  options = data.task_options
  if not hasattr(options, "keys"):
    raise ValueError(f"data.task_options={options!r}: expected a ConfigDict of task options")
  try:
    tasks_lib.make_task(name)
  except ValueError as e:
    raise ValueError(f"data.source={data.source!r}: {e}") from e
  try:
    return tasks_lib.make_task(name, **task_options(data))
  except ValueError as e:
    raise ValueError(f"data.task_options={task_options(data)!r}: {e}") from e


def chat_template(data) -> tasks_lib.ChatTemplate:
  """The chat template named by data.chat_template (see default_fields)."""
  spec = data.chat_template
  if spec == "plain" or (spec == "auto" and data.tokenizer == "byte"):
    return tasks_lib.ChatTemplate.plain()
  directory = os.path.dirname(os.path.abspath(data.tokenizer)) if spec == "auto" else spec
  if not isinstance(directory, str) or not os.path.isdir(directory):
    raise ValueError(
      f"data.chat_template={spec!r}: expected 'auto', 'plain' or a Hugging Face tokenizer directory"
    )
  try:
    return tasks_lib.ChatTemplate.from_tokenizer_dir(directory)
  except (ValueError, OSError) as e:
    raise ValueError(f"data.chat_template={spec!r}: {e}") from e


def validate(data, *, check_int, process_count: int) -> None:
  """Checks the SFT fields of a data section with source "sft:TASK" (ValueError names them)."""
  for field in default_fields():
    if field not in data:
      raise ValueError(
        f"data.{field}=None: missing field; start from train.data.default_data_config()"
      )
  if data.sft_too_long not in TOO_LONG:
    raise ValueError(f"data.sft_too_long={data.sft_too_long!r}: allowed {list(TOO_LONG)}")
  check_int(data, "num_examples", process_count)
  check_int(data, "eval_examples", process_count)
  check_int(data, "corpus_seed", 0)
  task = make_task(data)
  chat_template(data)
  try:
    problem = task.problems("train", 1, seed=int(data.corpus_seed))[0]
    task.sft_completion(problem)
  except ValueError as e:
    raise ValueError(f"data.source={data.source!r}: no SFT target: {e}") from e


class SftExamples(Sequence):
  """(prompt, target) text pairs of one split: problem i of the task's split, on first access."""

  def __init__(self, task, template, *, split: str, size: int, seed: int):
    self.task, self.template = task, template
    self.split, self.size, self.seed = split, int(size), int(seed)
    self._reset()

  def _reset(self):
    task_split = "train" if self.split == "train" else "heldout"
    self._stream = self.task.iter_problems(task_split, self.seed)
    self._problems: list = []
    self._lock = threading.Lock()

  def __getstate__(self):  # worker processes regenerate the problems
    return {k: getattr(self, k) for k in ("task", "template", "split", "size", "seed")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset()

  def __len__(self) -> int:
    return self.size

  def problem(self, index: int) -> tasks_lib.Problem:
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(index)
    with self._lock:
      while len(self._problems) <= index:
        self._problems.append(next(self._stream))
      return self._problems[index]

  def __getitem__(self, index: int) -> tuple[str, str]:
    problem = self.problem(index)
    return self.template.sft_target(problem.question, self.task.sft_completion(problem))


def split_examples(data, split: str) -> SftExamples:
  """The examples of `split` ("train" or "eval") for an "sft:TASK" data section."""
  size = data.num_examples if split == "train" else data.eval_examples
  return SftExamples(
    make_task(data), chat_template(data), split=split, size=size, seed=int(data.corpus_seed)
  )


def encode_prompt(tokenizer, prompt: str) -> np.ndarray:
  """int32 ids of a rendered prompt, as the RL loop builds its queries: BOS ⊕ encode(prompt)
  for the byte tokenizer (the plain template writes no BOS); encode(prompt) alone for a Hugging
  Face tokenizer, whose chat template writes its own BOS as text when the model has one."""
  body = np.asarray(tokenizer.encode_np(prompt), np.int32)
  if isinstance(tokenizer, ByteTokenizer):
    return np.concatenate([np.array([tokenizer.bos_id], np.int32), body])
  return body


@dataclasses.dataclass(frozen=True)
class TokenizeSft(grain.transforms.Map):
  """(prompt, target) -> {"ids": int32 [n+1], "response": float32 [n+1]} (module docstring)."""

  tokenizer: Any

  def map(self, example: tuple[str, str]) -> dict:
    prompt, target = example
    prompt_ids = encode_prompt(self.tokenizer, prompt)
    target_ids = np.asarray(self.tokenizer.encode_np(target), np.int32)
    ids = np.concatenate([prompt_ids, target_ids, np.array([self.tokenizer.eos_id], np.int32)])
    response = np.zeros(len(ids), np.float32)
    response[len(prompt_ids) :] = 1.0
    return {"ids": ids, "response": response}


class SftPieces(grain.experimental.FlatMapTransform):
  """{"ids", "response"} -> [{"tokens", "targets", "loss_mask"}] pieces of <= seq_len pairs."""

  max_fan_out = 2**31

  def __init__(self, seq_len: int, too_long: str):
    self.seq_len, self.too_long = seq_len, too_long
    self.dropped_in_a_row = 0

  def flat_map(self, example: dict):
    ids, response = example["ids"], example["response"]
    num_pairs = len(ids) - 1
    if num_pairs > self.seq_len and self.too_long == "drop":
      self.dropped_in_a_row += 1
      if self.dropped_in_a_row >= MAX_DROPPED_IN_A_ROW:
        raise ValueError(
          f"data.sft_too_long='drop': {self.dropped_in_a_row} examples in a row have more "
          f"than seq_len={self.seq_len} tokens (this one {num_pairs}); raise seq_len, shorten "
          "the task (data.task_options) or set data.sft_too_long='cut'"
        )
      return []
    self.dropped_in_a_row = 0
    pieces = []
    for start in range(0, num_pairs, self.seq_len):
      end = min(start + self.seq_len, num_pairs)
      loss_mask = response[start + 1 : end + 1]
      if loss_mask.any():
        pieces.append(
          {"tokens": ids[start:end], "targets": ids[start + 1 : end + 1], "loss_mask": loss_mask}
        )
    return pieces


def check_some_fit(examples: Sequence, tokenizer, *, seq_len: int, too_long: str) -> None:
  """ValueError unless one of `examples` (a split's first few) fits in seq_len ("drop")."""
  if too_long != "drop":
    return
  lengths = []
  for example in examples:
    lengths.append(len(TokenizeSft(tokenizer).map(example)["ids"]) - 1)
    if lengths[-1] <= seq_len:
      return
  raise ValueError(
    f"seq_len={seq_len}: none of the first {len(lengths)} SFT examples fits (they have "
    f"{min(lengths)} to {max(lengths)} tokens) and data.sft_too_long='drop' skips them; raise "
    "seq_len, shorten the task (data.task_options) or set data.sft_too_long='cut'"
  )


def fingerprint(data) -> dict[str, Any]:
  """What the iterator state depends on beyond the common fields."""
  return {
    "task_options": task_options(data),
    "chat_template": data.chat_template,
    "sft_too_long": data.sft_too_long,
  }
