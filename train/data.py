"""The training data pipeline: documents -> tokens -> packed rows -> per-process batches (grain).

    data = default_data_config()
    validate_data_config(data, seq_len=S, global_batch_size=B, process_count=P)
    it = make_iterator(data, seq_len=S, global_batch_size=B, seed=0,
                       process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)             # dict of numpy arrays [B // P, S]
    state = it.get_state()       # JSON-serialisable; it.set_state(state) resumes exactly
    arrays = global_batch(batch, NamedSharding(mesh, P(("data", "fsdp"), None)))

Pipeline (grain):
  documents of this process (`docs[process_index::process_count]`, see `train/data_sources.py`)
  -> train: shuffled per epoch (seeded by `seed`, a different order each epoch), repeated forever;
     eval: in order, repeated forever
  -> tokenized as BOS + encode(text) + EOS, i.e. ids x_0 .. x_n
  -> (tokens, targets) = (x_0..x_{n-1}, x_1..x_n); a document longer than seq_len is cut into
     pieces of at most seq_len pairs, each piece its own segment
  -> first-fit packing into `global_batch_size // process_count` rows of seq_len
  -> batched, then prefetched (`prefetch` batches in a thread, or `num_workers` processes).

Each batch holds, per row of length S:
  tokens      int32  input ids (pad_id after the last segment)
  targets     int32  next token of the same document (pad_id in padding)
  segment_ids int32  1, 2, ... per packed document piece in the row; 0 = padding
  positions   int32  0, 1, ... restarting at every segment; 0 in padding
  loss_mask   float32 1 where targets is a real next token of the same document (segment_ids > 0);
                      for SFT only where targets is a response token

SFT (`data.source = "sft:TASK"`, see `train/sft_data.py`): documents are chat-formatted task
problems with worked traces; each is tokenized as prompt ⊕ response ⊕ EOS and loss_mask is 1 only
where the target is a response token or its EOS (0 on the prompt); `data.sft_too_long` says
whether an example longer than seq_len is dropped (default) or cut. Packing is the same.

Processes read disjoint documents: process p only ever sees documents with index = p (mod P) of
its split, and packs them itself, so P processes together read every document exactly once per
epoch, but their rows are not the rows a single process would pack.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Any

import grain
import ml_collections
import numpy as np

from train import data_sources, sft_data
from train.tokenizer import load_tokenizer

SPLITS = ("train", "eval")


def default_data_config() -> ml_collections.ConfigDict:
  """The default data config: reasoning-gym text generated on the fly, byte tokens."""
  data = ml_collections.ConfigDict()
  # "generated" (reasoning-gym) | "tfds:NAME" | "text:GLOB" | "jsonl:GLOB" | "sft:TASK"
  data.source = "generated"
  data.tokenizer = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
  data.tasks = data_sources.DEFAULT_TASKS  # reasoning-gym task names (source="generated")
  data.num_examples = 100_000  # size of the generated train corpus (examples)
  data.eval_examples = 1_000  # held-out documents (generated, text, jsonl; tfds w/o eval split)
  data.text_field = "text"  # record field holding the document (jsonl, tfds)
  data.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # None: tfds default dir
  data.corpus_seed = 0  # seeds the generated corpus and the text/jsonl held-out sample
  data.shuffle = True  # shuffle train documents (per epoch)
  data.prefetch = 2  # batches prefetched in a background thread (0: none)
  data.num_workers = 0  # >0: that many prefetch processes (grain mp_prefetch)
  # source="sft:TASK" only: task_options, chat_template, sft_too_long (train/sft_data.py).
  for field, value in sft_data.default_fields().items():
    data[field] = value
  return data


def _fail(field: str, value: Any, allowed: str):
  raise ValueError(f"data.{field}={value!r}: {allowed}")


def _check_int(data, field: str, minimum: int):
  value = data[field]
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    _fail(field, value, f"must be an integer >= {minimum}")


def validate_data_config(data, *, seq_len: int, global_batch_size: int, process_count: int) -> None:
  """Raises ValueError naming the first bad field ("data.FIELD=VALUE: what is allowed").

  Cheap: reads no data and compiles nothing (it lists files, checks that a prepared tfds
  directory exists and imports reasoning_gym to check task names).
  """
  sft_fields = sft_data.default_fields()
  missing = [f for f in default_data_config() if f not in data and f not in sft_fields]
  if missing:
    _fail(missing[0], None, "missing field; start from train.data.default_data_config()")
  for name, value, minimum in (
    ("seq_len", seq_len, 1),
    ("global_batch_size", global_batch_size, 1),
    ("process_count", process_count, 1),
  ):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
      raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size}: must be divisible by "
      f"process_count={process_count} (each process loads an equal share)"
    )

  source = data.source
  if not isinstance(source, str):
    _fail("source", source, f"expected one of {data_sources.SOURCE_KINDS}")
  kind, sep, arg = source.partition(":")
  if source == "generated":
    tasks = data.tasks
    if isinstance(tasks, str) or not tasks:
      _fail("tasks", tasks, "expected a non-empty list of reasoning-gym task names")
    from reasoning_gym.factory import DATASETS  # import registers every task

    for task in tasks:
      if task not in DATASETS:
        _fail(
          "tasks",
          tasks,
          f"unknown reasoning-gym task {task!r}; known tasks: {', '.join(sorted(DATASETS))}",
        )
    _check_int(data, "num_examples", process_count)
    _check_int(data, "eval_examples", process_count)
  elif kind == "tfds" and sep and arg:
    data_dir = data.tfds_data_dir
    if data_dir is not None and not os.path.isdir(data_dir):
      _fail("tfds_data_dir", data_dir, "no such directory (None: the tfds default)")
    dataset_dir = data_sources.tfds_dataset_dir(arg, data_dir)
    if not os.path.isdir(dataset_dir):
      _fail(
        "source",
        source,
        f"no prepared tfds dataset at {dataset_dir}; prepare it with "
        "`tfds build` (ArrayRecord format) or set data.tfds_data_dir",
      )
    _check_int(data, "eval_examples", process_count)
  elif sft_data.is_sft_source(source):
    sft_data.validate(data, check_int=_check_int, process_count=process_count)
  elif kind in ("text", "jsonl") and sep and arg:
    if not data_sources.matching_files(arg):
      _fail("source", source, f"no file matches the glob {arg!r}")
    _check_int(data, "eval_examples", process_count)
  else:
    _fail(
      "source", source, "expected 'generated', 'tfds:NAME', 'text:GLOB', 'jsonl:GLOB' or 'sft:TASK'"
    )

  if kind in ("tfds", "jsonl") and (not isinstance(data.text_field, str) or not data.text_field):
    _fail("text_field", data.text_field, "expected the name of the record's text field")
  if data.tokenizer != "byte" and (
    not isinstance(data.tokenizer, str) or not os.path.isfile(data.tokenizer)
  ):
    _fail("tokenizer", data.tokenizer, "expected 'byte' or a path to a tokenizer.json")
  if not isinstance(data.shuffle, bool):
    _fail("shuffle", data.shuffle, "expected True or False")
  _check_int(data, "corpus_seed", 0)
  _check_int(data, "prefetch", 0)
  _check_int(data, "num_workers", 0)


# ----------------------------------------------------------------------------- pipeline stages


@dataclasses.dataclass(frozen=True)
class _Tokenize(grain.transforms.Map):
  """text -> int32 ids [BOS, *encode(text), EOS]."""

  tokenizer: Any

  def map(self, text: str) -> np.ndarray:
    body = self.tokenizer.encode_np(text)
    ids = np.empty(len(body) + 2, dtype=np.int32)
    ids[0], ids[1:-1], ids[-1] = self.tokenizer.bos_id, body, self.tokenizer.eos_id
    return ids


class _NextTokenPieces(grain.experimental.FlatMapTransform):
  """ids x_0..x_n -> [{"tokens": x_i.., "targets": x_{i+1}..}] pieces of <= seq_len pairs."""

  max_fan_out = 2**31  # only used by MapDataset.flat_map; the IterDataset version is unbounded

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, ids: np.ndarray):
    num_pairs = len(ids) - 1
    pieces = []
    for start in range(0, num_pairs, self.seq_len):
      end = min(start + self.seq_len, num_pairs)
      pieces.append({"tokens": ids[start:end], "targets": ids[start + 1 : end + 1]})
    return pieces


def _to_batch(packed: dict) -> dict:
  segment_ids = packed["tokens_segment_ids"].astype(np.int32)
  loss_mask = (segment_ids > 0).astype(np.float32)
  if "loss_mask" in packed:  # SFT: response tokens only
    loss_mask *= packed["loss_mask"].astype(np.float32)
  return {
    "tokens": packed["tokens"].astype(np.int32),
    "targets": packed["targets"].astype(np.int32),
    "segment_ids": segment_ids,
    "positions": packed["tokens_positions"].astype(np.int32),
    "loss_mask": loss_mask,
  }


def _derived_seed(seed: int, purpose: int) -> int:
  """A 32-bit seed for one random stage, from the run seed (any int) and a stage constant."""
  return int(np.random.SeedSequence([seed % 2**64, purpose]).generate_state(1)[0])


def _mark_absl_flags_parsed():
  """grain 0.2.18 mp_prefetch reads an absl flag and fails if flags were never parsed (a script
  without absl.app); google/grain#1355, fixed upstream by #1362. Defaults are then used."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _close_and_release(holder: list) -> None:
  iterator = holder.pop() if holder else None
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


class DataIterator:
  """Iterator of local batches with an exact, JSON-serialisable checkpoint state.

  `get_state()` -> {"pipeline": {...what was built...}, "grain": grain iterator state}.
  `set_state(state)` refuses a state saved by a differently built pipeline (another source,
  seq_len, batch size, seed, split or process layout), since it would not mean the same batches.
  """

  def __init__(self, grain_iterator, fingerprint: dict):
    self._holder = [grain_iterator]
    self._fingerprint = fingerprint
    # Stops prefetch threads / worker processes on close(), when this object is collected, or
    # at interpreter exit, and then drops the grain iterator while modules are still alive
    # (grain's own __del__ fails noisily if it first runs during interpreter teardown).
    self._finalizer = weakref.finalize(self, _close_and_release, self._holder)

  @property
  def _iterator(self):
    if not self._holder:
      raise ValueError("the data iterator is closed")
    return self._holder[0]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def get_state(self) -> dict:
    return {"pipeline": dict(self._fingerprint), "grain": self._iterator.get_state()}

  def set_state(self, state: dict) -> None:
    saved = state.get("pipeline")
    if saved != self._fingerprint:
      raise ValueError(
        f"data iterator state was saved by a different pipeline: saved {saved}, "
        f"this iterator {self._fingerprint}"
      )
    self._iterator.set_state(state["grain"])

  def close(self) -> None:
    self._finalizer()


def make_iterator(
  data,
  *,
  seq_len: int,
  global_batch_size: int,
  seed: int,
  split: str = "train",
  process_index: int = 0,
  process_count: int = 1,
) -> DataIterator:
  """This process's share of every global batch: dict of numpy [global_batch_size // P, seq_len].

  split="train": this process's documents, shuffled per epoch with `seed` (if data.shuffle),
  repeated forever. split="eval": the held-out documents, in order, repeated forever.
  See the module docstring for the fields and their meaning.
  """
  validate_data_config(
    data, seq_len=seq_len, global_batch_size=global_batch_size, process_count=process_count
  )
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}: must be in [0, {process_count})")
  local_batch_size = global_batch_size // process_count
  tokenizer = load_tokenizer(data.tokenizer)

  sft = sft_data.is_sft_source(data.source)
  if sft:
    documents = sft_data.split_examples(data, split)
    sft_data.check_some_fit(
      [documents[i] for i in range(process_index, len(documents), process_count)[:8]],
      tokenizer,
      seq_len=seq_len,
      too_long=data.sft_too_long,
    )
    tokenize, to_pieces = (
      sft_data.TokenizeSft(tokenizer),
      sft_data.SftPieces(seq_len, data.sft_too_long),
    )
    lengths = {"tokens": seq_len, "targets": seq_len, "loss_mask": seq_len}
    padding = {"tokens": tokenizer.pad_id, "targets": tokenizer.pad_id, "loss_mask": 0.0}
  else:
    documents = data_sources.split_documents(data, split)
    tokenize, to_pieces = _Tokenize(tokenizer), _NextTokenPieces(seq_len)
    lengths = {"tokens": seq_len, "targets": seq_len}
    padding = {"tokens": tokenizer.pad_id, "targets": tokenizer.pad_id}
  dataset = grain.MapDataset.source(documents)[process_index::process_count]
  if len(dataset) == 0:
    raise ValueError(
      f"data.source={data.source!r}: the {split} split has {len(documents)} documents, "
      f"fewer than process_count={process_count}"
    )
  if split == "train" and data.shuffle:
    dataset = dataset.shuffle(seed=_derived_seed(seed, 1))
  dataset = dataset.repeat(None).map(tokenize)
  # Documents are read / generated / tokenized by a small thread pool ahead of packing.
  read_threads = 2 if data.prefetch or data.num_workers else 0
  pieces = grain.experimental.FlatMapIterDataset(
    dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64)),
    to_pieces,
  )
  packed = grain.experimental.FirstFitPackIterDataset(
    pieces,
    length_struct=lengths,
    num_packing_bins=local_batch_size,
    shuffle_bins=False,
    padding_struct=padding,
  )
  batches = packed.batch(local_batch_size, drop_remainder=True).map(_to_batch)
  if data.num_workers > 0:
    _mark_absl_flags_parsed()
    batches = batches.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=max(1, data.prefetch)
      )
    )
  elif data.prefetch > 0:
    batches = grain.experimental.ThreadPrefetchIterDataset(
      batches, prefetch_buffer_size=data.prefetch
    )

  fingerprint = {
    "source": data.source,
    "tokenizer": data.tokenizer,
    "split": split,
    "tasks": list(data.tasks) if data.source == "generated" else None,
    "num_examples": int(data.num_examples),
    "eval_examples": int(data.eval_examples),
    "corpus_seed": int(data.corpus_seed),
    "shuffle": bool(data.shuffle),
    "seq_len": int(seq_len),
    "global_batch_size": int(global_batch_size),
    "seed": int(seed),
    "process_index": int(process_index),
    "process_count": int(process_count),
    "num_workers": int(data.num_workers),
  }
  if sft:
    fingerprint.update(sft_data.fingerprint(data))
  return DataIterator(iter(batches), fingerprint)


def global_batch(local_batch: dict, sharding) -> dict:
  """Assembles each process's local batch into global jax.Arrays laid out by `sharding`.

  `sharding`: a NamedSharding over [batch, seq] whose batch axis spans the processes in process
  order (so the global batch is the processes' local batches concatenated).
  """
  import jax

  return {
    name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for name, value in local_batch.items()
  }
