"""Data pipeline: packing, determinism, process sharding, exact resume, splits, sources, validation.

References are independent of train/data*.py: documents are tokenized here with Python's UTF-8
bytes (BOS=1, EOS=2, byte+3), the pieces a long document must be cut into are written out from
the spec (piece c = ids[c*S : c*S + S + 1]), and generated examples are read directly from
reasoning_gym.
"""

import json
import random
import string

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec

from train import data as data_lib

BOS, EOS, PAD = 1, 2, 0
FIELDS = {
  "tokens": np.int32,
  "targets": np.int32,
  "segment_ids": np.int32,
  "positions": np.int32,
  "loss_mask": np.float32,
}


def doc_ids(text):
  return (BOS, *(b + 3 for b in text.encode("utf-8")), EOS)


def expected_pieces(text, seq_len):
  ids = doc_ids(text)
  return [ids[start : start + seq_len + 1] for start in range(0, len(ids) - 1, seq_len)]


def row_pieces(batch):
  """Checks the packing invariants of every row; returns its pieces as id tuples.

  A piece is a segment's tokens followed by its last target: the ids it covers.
  """
  pieces = []
  for b in range(batch["tokens"].shape[0]):
    tokens, targets, seg, pos, mask = (
      batch[k][b] for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")
    )
    used = int(np.count_nonzero(seg))
    # Segments 1, 2, ... fill a prefix of the row; the rest is padding.
    assert np.all(seg[used:] == 0) and np.all(seg[:used] > 0)
    assert np.all(np.diff(seg[:used]) >= 0) and np.all(np.diff(seg[:used]) <= 1)
    if used:
      assert seg[0] == 1
    np.testing.assert_array_equal(mask, (seg > 0).astype(np.float32))
    assert np.all(tokens[used:] == PAD) and np.all(targets[used:] == PAD)
    assert np.all(pos[used:] == 0)
    for s in range(1, int(seg.max(initial=0)) + 1):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      # Targets are the next tokens of the same document.
      np.testing.assert_array_equal(targets[idx][:-1], tokens[idx][1:])
      pieces.append((*tokens[idx].tolist(), int(targets[idx][-1])))
  return pieces


def decode_doc(piece):
  assert piece[0] == BOS and piece[-1] == EOS, "expected a whole document in one piece"
  return bytes(i - 3 for i in piece[1:-1]).decode("utf-8")


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def random_docs(n, seed=0, max_len=100):
  rng = random.Random(seed)
  return [
    f"doc{i}:"
    + "".join(rng.choice(string.ascii_letters + " é") for _ in range(rng.randint(0, max_len)))
    for i in range(n)
  ]


def write_jsonl(path, docs, field="text"):
  path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
  return path


def config(**overrides):
  data = data_lib.default_data_config()
  data.num_examples = 64
  data.eval_examples = 16
  for k, v in overrides.items():
    data[k] = v
  return data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """40 random documents (0..100 chars, some longer than seq_len=32) in a jsonl file."""
  docs = random_docs(40)
  path = write_jsonl(tmp_path_factory.mktemp("jsonl") / "docs.jsonl", docs)
  return docs, config(source=f"jsonl:{path}", eval_examples=8)


# ----------------------------------------------------------------------------- batches


def test_shapes_and_dtypes_generated():
  it = data_lib.make_iterator(config(), seq_len=64, global_batch_size=4, seed=0)
  for batch in take(it, 3):
    assert set(batch) == set(FIELDS)
    for k, dtype in FIELDS.items():
      assert batch[k].shape == (4, 64) and batch[k].dtype == dtype, k
    row_pieces(batch)
  it.close()


def test_packing_matches_spec(corpus):
  """Every packed segment is a piece of a document cut exactly as specified; over the train and
  eval streams every piece of every document shows up, and train/eval documents are disjoint."""
  docs, data = corpus
  seq_len = 32
  piece_to_doc = {p: d for d, text in enumerate(docs) for p in expected_pieces(text, seq_len)}
  assert max(len(expected_pieces(t, seq_len)) for t in docs) >= 3  # long docs are cut
  seen = {}
  for split in ("train", "eval"):
    it = data_lib.make_iterator(data, seq_len=seq_len, global_batch_size=4, seed=3, split=split)
    pieces = [p for batch in take(it, 80) for p in row_pieces(batch)]
    assert set(pieces) <= set(piece_to_doc)
    seen[split] = {piece_to_doc[p] for p in pieces}
    # A document is either wholly present (all its pieces) or absent.
    for d in seen[split]:
      assert set(expected_pieces(docs[d], seq_len)) <= set(pieces)
    it.close()
  assert len(seen["eval"]) == 8 and len(seen["train"]) == 32
  assert not seen["train"] & seen["eval"]


def test_hf_tokenizer_and_pad_id(tmp_path, corpus):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(
    tokenizers.models.WordLevel(
      {"[UNK]": 0, "</s>": 1, "<s>": 2, "<pad>": 3, "a": 4, "b": 5}, unk_token="[UNK]"
    )
  )
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  write_jsonl(tmp_path / "ab.jsonl", ["a b a", "b", "a a a a b"] * 5)
  data = config(
    source=f"jsonl:{tmp_path}/ab.jsonl", tokenizer=str(tmp_path / "tokenizer.json"), eval_examples=3
  )
  batch = next(data_lib.make_iterator(data, seq_len=16, global_batch_size=2, seed=0))
  seg = batch["segment_ids"]
  assert np.all(batch["tokens"][seg == 0] == 3)  # padded with <pad>
  starts = batch["positions"] == 0
  assert np.all(batch["tokens"][starts & (seg > 0)] == 2)  # every document starts with <s>
  assert set(np.unique(batch["tokens"][seg > 0])) <= {1, 2, 4, 5}


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_different_seed_differs():
  def first(seed, split="train"):
    it = data_lib.make_iterator(config(), seq_len=64, global_batch_size=4, seed=seed, split=split)
    out = take(it, 3)
    it.close()
    return out

  assert_batches_equal(first(0), first(0))
  assert any(
    not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first(0), first(1), strict=True)
  )
  # The eval split is not shuffled: the seed does not change it.
  assert_batches_equal(first(0, "eval"), first(1, "eval"))


def test_shuffle_differs_per_epoch(corpus):
  """Shuffled train order of a 32-document split: each epoch is a different permutation."""
  docs, data = corpus
  data = config(source=data.source, eval_examples=8)
  it = data_lib.make_iterator(data, seq_len=256, global_batch_size=1, seed=0)
  order = [decode_doc(p) for batch in take(it, 96) for p in row_pieces(batch)]
  # Single-row batches and whole-document pieces: packing keeps the stream order.
  epochs = [order[i * 32 : (i + 1) * 32] for i in range(2)]
  assert set(epochs[0]) == set(epochs[1]) and len(set(epochs[0])) == 32
  assert epochs[0] != epochs[1]


# ----------------------------------------------------------------------------- processes


def test_process_shards_are_disjoint_and_cover_the_split(corpus):
  """Holds exactly: each of P processes reads a fixed, disjoint subset of the train documents,
  and together they read every train document. (Rows are packed per process, so the P local
  batches are not the rows of the 1-process global batch.)"""
  docs, data = corpus
  seq_len = 32
  piece_to_doc = {p: d for d, text in enumerate(docs) for p in expected_pieces(text, seq_len)}

  def docs_seen(process_index, process_count):
    it = data_lib.make_iterator(
      data,
      seq_len=seq_len,
      global_batch_size=4,
      seed=5,
      process_index=process_index,
      process_count=process_count,
    )
    batches = take(it, 80)
    it.close()
    assert all(b["tokens"].shape == (4 // process_count, seq_len) for b in batches)
    return {piece_to_doc[p] for b in batches for p in row_pieces(b)}

  single = docs_seen(0, 1)
  p0, p1 = docs_seen(0, 2), docs_seen(1, 2)
  assert len(single) == 32
  assert not p0 & p1
  assert p0 | p1 == single
  assert abs(len(p0) - len(p1)) <= 1


# ----------------------------------------------------------------------------- checkpointing


def _resume_matches(data, *, k, n, split="train", seq_len=32, global_batch_size=4):
  kwargs = dict(seq_len=seq_len, global_batch_size=global_batch_size, seed=7, split=split)
  it = data_lib.make_iterator(data, **kwargs)
  take(it, k)
  state = json.loads(json.dumps(it.get_state()))  # what orbax JsonSave would store
  expected = take(it, n)
  it.close()
  resumed = data_lib.make_iterator(data, **kwargs)
  take(resumed, 2)  # state is restored into an iterator that has already moved on
  resumed.set_state(state)
  assert_batches_equal(take(resumed, n), expected)
  resumed.close()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_is_exact_across_epochs(corpus, prefetch):
  _, data = corpus
  data = config(source=data.source, eval_examples=8, prefetch=prefetch)
  _resume_matches(data, k=13, n=20)  # ~10 batches per epoch: resumes mid-epoch and crosses one


def test_resume_is_exact_generated_and_eval():
  _resume_matches(config(prefetch=3), k=5, n=6, seq_len=64)
  _resume_matches(config(prefetch=2), k=3, n=4, split="eval", seq_len=64)


@pytest.mark.parametrize(
  "num_workers", [1, pytest.param(2, marks=pytest.mark.slow)]
)  # spawning a worker costs seconds
def test_resume_is_exact_with_worker_processes(corpus, num_workers):
  _, data = corpus
  data = config(source=data.source, eval_examples=8, num_workers=num_workers)
  _resume_matches(data, k=5, n=6)


def test_set_state_refuses_another_pipeline(corpus):
  _, data = corpus
  state = data_lib.make_iterator(data, seq_len=32, global_batch_size=4, seed=0).get_state()
  other = data_lib.make_iterator(data, seq_len=32, global_batch_size=4, seed=1)
  with pytest.raises(ValueError, match="different pipeline"):
    other.set_state(state)


# ----------------------------------------------------------------------------- sources/splits


def test_generated_splits_are_the_reasoning_gym_items():
  """Train = items [0, 32) and eval = items [32, 40) of each task's dataset (seed corpus_seed);
  each example is 'Question: q\\nAnswer: a\\n'."""
  import reasoning_gym

  tasks = ["basic_arithmetic", "chain_sum"]
  data = config(tasks=tasks, num_examples=64, eval_examples=16, corpus_seed=11)
  items = {t: reasoning_gym.create_dataset(t, seed=11, size=40) for t in tasks}

  def text(t, i):
    return f"Question: {items[t][i]['question']}\nAnswer: {items[t][i]['answer']}\n"

  expected = {
    "train": {text(t, i) for t in tasks for i in range(32)},
    "eval": {text(t, i) for t in tasks for i in range(32, 40)},
  }
  for split, n in (("train", 24), ("eval", 8)):
    it = data_lib.make_iterator(data, seq_len=256, global_batch_size=4, seed=0, split=split)
    seen = {decode_doc(p) for b in take(it, n) for p in row_pieces(b)}
    it.close()
    assert seen == expected[split]
  assert not expected["train"] & expected["eval"]


def test_text_source_splits_paragraphs(tmp_path):
  (tmp_path / "a.txt").write_text("first para\nline two\n\nsecond\n \t\n\n\nthird é\n")
  (tmp_path / "b.txt").write_text("\n\nfourth\n")
  data = config(source=f"text:{tmp_path}/*.txt", eval_examples=1)
  seen = {}
  for split in ("train", "eval"):
    it = data_lib.make_iterator(data, seq_len=64, global_batch_size=2, seed=0, split=split)
    seen[split] = {decode_doc(p) for b in take(it, 4) for p in row_pieces(b)}
    it.close()
  assert len(seen["eval"]) == 1 and len(seen["train"]) == 3
  assert seen["train"] | seen["eval"] == {"first para\nline two", "second", "third é", "fourth"}


class AdaptiveTinyText(tfds.core.GeneratorBasedBuilder):
  """A tiny local tfds dataset (train + test), prepared as ArrayRecord without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
    )

  def _split_generators(self, dl_manager):
    return {
      "train": self._generate_examples("train", 24),
      "test": self._generate_examples("test", 6),
    }

  def _generate_examples(self, prefix, n):
    for i in range(n):
      yield i, {"text": f"{prefix} record {i} " + "xy" * i}


class AdaptiveTinyTrainOnly(AdaptiveTinyText):
  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples("train", 10)}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for builder_cls in (AdaptiveTinyText, AdaptiveTinyTrainOnly):
    builder_cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def _tfds_texts(name, split, data_dir):
  return [r["text"].decode() for r in tfds.data_source(name, split=split, data_dir=data_dir)]


@pytest.mark.parametrize("name", ["adaptive_tiny_text", "adaptive_tiny_train_only"])
def test_tfds_source(tfds_dir, name):
  """Eval is the "test" split when there is one, else the last eval_examples train records."""
  data = config(source=f"tfds:{name}", tfds_data_dir=tfds_dir, eval_examples=3)
  train = _tfds_texts(name, "train", tfds_dir)
  if name == "adaptive_tiny_text":
    expected = {"train": set(train), "eval": set(_tfds_texts(name, "test", tfds_dir))}
    assert len(expected["train"]) == 24 and len(expected["eval"]) == 6
  else:
    expected = {"train": set(train[:-3]), "eval": set(train[-3:])}
  for split in ("train", "eval"):
    it = data_lib.make_iterator(data, seq_len=128, global_batch_size=2, seed=0, split=split)
    seen = {decode_doc(p) for b in take(it, 12) for p in row_pieces(b)}
    it.close()
    assert seen == expected[split]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "field,value",
  [
    ("source", "hf:wikitext"),
    ("source", "text:/nonexistent/*.txt"),
    ("source", "jsonl:"),
    ("source", "tfds:no_such_dataset_here"),
    ("tasks", ["basic_arithmetic", "no_such_task"]),
    ("tasks", []),
    ("num_examples", 0),
    ("eval_examples", -1),
    ("eval_examples", 1),  # fewer than process_count=2
    ("tokenizer", "/nonexistent/tokenizer.json"),
    ("shuffle", "yes"),
    ("prefetch", -1),
    ("num_workers", 1.5),
    ("corpus_seed", -3),
    ("tfds_data_dir", "/nonexistent/dir"),
    ("text_field", ""),
  ],
)
def test_validation_names_the_field(field, value, tmp_path):
  data = config().to_dict()
  if field in ("tfds_data_dir", "text_field"):
    data["source"] = "tfds:x" if field == "tfds_data_dir" else f"jsonl:{tmp_path}/*.jsonl"
    write_jsonl(tmp_path / "a.jsonl", ["x"] * 4)
  data[field] = value
  data = ml_collections.ConfigDict(data)  # a fresh ConfigDict: any type is accepted
  with pytest.raises(ValueError, match=rf"^data\.{field}="):
    data_lib.validate_data_config(data, seq_len=32, global_batch_size=4, process_count=2)


def test_validation_of_batch_arguments_and_missing_fields():
  with pytest.raises(ValueError, match=r"^global_batch_size=6: must be divisible by process_"):
    data_lib.validate_data_config(config(), seq_len=8, global_batch_size=6, process_count=4)
  with pytest.raises(ValueError, match=r"^seq_len=0"):
    data_lib.validate_data_config(config(), seq_len=0, global_batch_size=4, process_count=1)
  data = config()
  del data["prefetch"]
  with pytest.raises(ValueError, match=r"^data\.prefetch="):
    data_lib.validate_data_config(data, seq_len=8, global_batch_size=4, process_count=1)
  data_lib.validate_data_config(config(), seq_len=8, global_batch_size=8, process_count=4)


def test_jsonl_missing_text_field(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", ["x"] * 4, field="body")
  data = config(source=f"jsonl:{tmp_path}/a.jsonl", eval_examples=1)
  with pytest.raises(ValueError, match=r"^data\.text_field='text': .*a\.jsonl:1"):
    data_lib.make_iterator(data, seq_len=8, global_batch_size=2, seed=0)


# ----------------------------------------------------------------------------- device arrays


def test_global_batch_on_fake_mesh():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
  it = data_lib.make_iterator(config(), seq_len=16, global_batch_size=8, seed=0)
  local = next(it)
  it.close()
  arrays = data_lib.global_batch(local, sharding)
  assert set(arrays) == set(FIELDS)
  for k, x in arrays.items():
    assert isinstance(x, jax.Array) and x.shape == (8, 16) and x.dtype == FIELDS[k]
    assert x.sharding == sharding
    assert len(x.addressable_shards) == 8
    for shard in x.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), local[k][shard.index])
    np.testing.assert_array_equal(np.asarray(x), local[k])
