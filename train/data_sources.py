"""Document sources for `train/data.py`: random-access sequences of text documents per split.

Every source returns, for a split ("train" or "eval"), an object with `__len__` and
`__getitem__(i) -> str` (one document), suitable for `grain.MapDataset.source`. Train and eval are
disjoint by construction:

- generated (reasoning-gym): example i of the mixture is task `tasks[i % T]`, that task's index
  `i // T`. Train uses task-indices [0, n_train_k) and eval [n_train_k, n_train_k + n_eval_k) of
  one dataset per task (seed `corpus_seed`); reasoning-gym derives each item from
  `Random(seed + index)`, so the two splits use disjoint random streams. Items are generated
  lazily, on access.
- text:GLOB: every matching file (sorted) is split into documents at blank lines (one or more empty
  or whitespace-only lines); surrounding whitespace is stripped, empty documents are dropped.
- jsonl:GLOB: one document per non-empty line, `record[text_field]`.
  For text and jsonl, a fixed random sample (seeded by `corpus_seed`) of `eval_examples`
  documents is held out as the eval split; the rest, in file order, is the train split.
- tfds:NAME: `tfds.data_source(NAME, split, data_dir)` (prepared ArrayRecord files, no
  TensorFlow). Train is the "train" split; eval is "validation" if the dataset has one, else
  "test", else the last `eval_examples` records of "train" (train is then "train[:-eval_examples]").
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence

import numpy as np

SOURCE_KINDS = ("generated", "tfds:NAME", "text:GLOB", "jsonl:GLOB")

DEFAULT_TASKS = (
  "basic_arithmetic",
  "chain_sum",
  "leg_counting",
  "letter_counting",
  "count_bits",
  "gcd",
  "products",
  "spell_backward",
)


def format_example(question: str, answer: str) -> str:
  """The text of one reasoning-gym example."""
  return f"Question: {question}\nAnswer: {answer}\n"


class GeneratedTexts(Sequence):
  """`size` reasoning-gym examples of one split, generated on access (see module docstring)."""

  def __init__(
    self, tasks: Sequence[str], *, corpus_seed: int, num_train: int, num_eval: int, split: str
  ):
    import reasoning_gym  # slow import (~4 s): only when this source is used

    self.tasks = tuple(tasks)
    num_tasks = len(self.tasks)
    # Number of train / eval items of task k: |{i in [0, n) : i % T == k}|.
    train_k = [len(range(k, num_train, num_tasks)) for k in range(num_tasks)]
    eval_k = [len(range(k, num_eval, num_tasks)) for k in range(num_tasks)]
    self._datasets = [
      reasoning_gym.create_dataset(name, seed=corpus_seed, size=max(1, train_k[k] + eval_k[k]))
      for k, name in enumerate(self.tasks)
    ]
    self._offsets = [0] * num_tasks if split == "train" else train_k
    self._size = num_train if split == "train" else num_eval

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> str:
    index = int(index)
    if not 0 <= index < self._size:
      raise IndexError(index)
    task, local = index % len(self.tasks), index // len(self.tasks)
    item = self._datasets[task][self._offsets[task] + local]
    return format_example(str(item["question"]), str(item["answer"]))


class TfdsTexts(Sequence):
  """The `text_field` of each record of a tfds ArrayRecord data source, as str."""

  def __init__(self, name: str, split: str, data_dir: str | None, text_field: str):
    import tensorflow_datasets as tfds

    self._source = tfds.data_source(name, split=split, data_dir=data_dir)
    self._text_field = text_field
    if len(self._source) and text_field not in self._source[0]:
      raise ValueError(
        f"data.text_field={text_field!r}: tfds dataset {name!r} has features "
        f"{sorted(self._source[0])}"
      )

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    value = self._source[int(index)][self._text_field]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tfds_split_names(name: str, data_dir: str | None, eval_examples: int) -> dict[str, str]:
  """{"train": split, "eval": split} for a prepared tfds dataset (see module docstring)."""
  import tensorflow_datasets as tfds

  splits = set(tfds.builder(name, data_dir=data_dir).info.splits.keys())
  if "train" not in splits:
    raise ValueError(f"data.source='tfds:{name}': the dataset has no 'train' split ({splits})")
  for eval_split in ("validation", "test"):
    if eval_split in splits:
      return {"train": "train", "eval": eval_split}
  return {"train": f"train[:-{eval_examples}]", "eval": f"train[-{eval_examples}:]"}


def tfds_dataset_dir(name: str, data_dir: str | None) -> str:
  """The directory a prepared tfds dataset NAME[/CONFIG][:VERSION] lives in."""
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
  return os.path.join(data_dir, name.split(":")[0].split("/")[0])


def matching_files(pattern: str) -> list[str]:
  return sorted(
    p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
  )


_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def read_text_documents(pattern: str) -> list[str]:
  docs = []
  for path in matching_files(pattern):
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read().replace("\r\n", "\n")
    docs.extend(d.strip() for d in _BLANK_LINES.split(text))
  return [d for d in docs if d]


def read_jsonl_documents(pattern: str, text_field: str) -> list[str]:
  docs = []
  for path in matching_files(pattern):
    with open(path, encoding="utf-8") as f:
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"data.source='jsonl:{pattern}': {path}:{line_number}: {e}") from e
        if not isinstance(record, dict) or text_field not in record:
          raise ValueError(
            f"data.text_field={text_field!r}: {path}:{line_number} has no field {text_field!r}"
          )
        docs.append(str(record[text_field]))
  return docs


def hold_out(docs: list[str], eval_examples: int, corpus_seed: int, split: str) -> list[str]:
  """A fixed random sample of `eval_examples` docs (eval) or the rest in order (train)."""
  if eval_examples >= len(docs):
    raise ValueError(
      f"data.eval_examples={eval_examples}: must be smaller than the number of documents "
      f"({len(docs)}) so that the train split is not empty"
    )
  rng = np.random.default_rng(np.random.SeedSequence([corpus_seed % 2**64, 0xE7A1]))
  is_eval = np.zeros(len(docs), dtype=bool)
  is_eval[rng.permutation(len(docs))[:eval_examples]] = True
  chosen = is_eval if split == "eval" else ~is_eval
  return [d for d, keep in zip(docs, chosen, strict=True) if keep]


def split_documents(data, split: str):
  """The documents of `split` for the data config `data` (a Sequence of str)."""
  source = data.source
  if source == "generated":
    return GeneratedTexts(
      list(data.tasks),
      corpus_seed=int(data.corpus_seed),
      num_train=int(data.num_examples),
      num_eval=int(data.eval_examples),
      split=split,
    )
  kind, _, arg = source.partition(":")
  if kind == "tfds":
    names = tfds_split_names(arg, data.tfds_data_dir, int(data.eval_examples))
    return TfdsTexts(arg, names[split], data.tfds_data_dir, data.text_field)
  if kind == "text":
    docs = read_text_documents(arg)
  elif kind == "jsonl":
    docs = read_jsonl_documents(arg, data.text_field)
  else:
    raise ValueError(f"data.source={source!r}: expected one of {SOURCE_KINDS}")
  return hold_out(docs, int(data.eval_examples), int(data.corpus_seed), split)
