"""Corrupt and hostile safetensors files and checkpoint directories get a ValueError naming the
file and the tensor (or a FileNotFoundError naming the directory), never another exception, a
hang, or an allocation larger than the file.

The independent reference is Hugging Face's `safetensors` library (Rust): on every mutated file
our reader must agree with it, loading the same tensors when it loads and refusing when it refuses.
"""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import time
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import hf
from models.safetensors_file import SafetensorsFile
from models.transformer import Config, Transformer

safetensors_numpy = pytest.importorskip("safetensors.numpy")

CONFIG = Config(vocab_size=32, dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
# A parse of a header and copies of the tensors, never anything sized by what a header claims.
ALLOCATION_SLACK_BYTES = 256 * 1024


def random_model(config: Config) -> Transformer:
  """A model with every parameter drawn here (cheaper than compiling the initialisers)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  rng = np.random.RandomState(0)
  for _, v in nnx.to_flat_state(state):
    v.set_value(jnp.asarray(rng.randn(*v.shape).astype(np.float32)))
  return nnx.merge(graphdef, state)


def flat_params(model) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(directory written by hf.save, the parameters it was written from)."""
  path = tmp_path_factory.mktemp("hf")
  model = random_model(CONFIG)
  hf.save(model, CONFIG, str(path))
  return path, flat_params(model)


@pytest.fixture
def copy(saved, tmp_path):
  """A fresh copy of the saved directory for a test to damage."""
  shutil.copytree(saved[0], tmp_path / "model")
  return tmp_path / "model"


@contextlib.contextmanager
def largest_allocation_at_most(limit_bytes: int):
  tracemalloc.start()
  try:
    yield
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak <= limit_bytes, f"allocated {peak} bytes at peak; the bound is {limit_bytes}"


@contextlib.contextmanager
def deadline(seconds: float):
  """A TimeoutError in this thread if the block runs longer than `seconds` (a hang guard)."""

  def expire(signum, frame):
    raise TimeoutError(f"still running after {seconds} s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_untouched_directory_loads_the_saved_parameters(saved):
  path, params = saved
  model, config = hf.load(str(path))
  assert config == CONFIG
  loaded = flat_params(model)
  assert loaded.keys() == params.keys()
  for key in params:
    np.testing.assert_array_equal(loaded[key], params[key], err_msg=str(key))


# -- the four cases of the issue --------------------------------------------------------------


def test_truncated_file_names_the_file_and_the_tensor(copy):
  weights = copy / "model.safetensors"
  size = os.path.getsize(weights)
  with open(weights, "r+b") as f:
    f.truncate(size - 100)
  # hf.save writes in layer-major order, so the last tensor is the LM head.
  with pytest.raises(ValueError, match=rf"{weights}: tensor 'lm_head.weight': .* truncated"):
    hf.load(str(copy))


def test_100_bytes_of_0xff_is_refused_before_reading_a_header(copy):
  weights = copy / "model.safetensors"
  weights.write_bytes(b"\xff" * 100)
  with pytest.raises(
    ValueError, match=rf"{weights}: the header length field says {2**64 - 1} bytes but only 92"
  ):
    hf.load(str(copy))


def test_header_length_2_to_62_is_refused_without_allocating_it(copy):
  weights = copy / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes((2**62).to_bytes(8, "little") + data[8:])
  with largest_allocation_at_most(len(data) + ALLOCATION_SLACK_BYTES):
    with pytest.raises(ValueError, match=rf"{weights}: the header length field says {2**62}"):
      hf.load(str(copy))


def test_missing_config_json_names_the_directory_and_its_contents(copy):
  os.remove(copy / "config.json")
  with pytest.raises(
    FileNotFoundError, match=rf"{copy}: no config.json; a Hugging Face checkpoint directory holds"
  ):
    hf.load(str(copy))


# -- the directory ----------------------------------------------------------------------------


def test_missing_weights_and_a_missing_directory_name_what_is_needed(copy, tmp_path):
  os.remove(copy / "model.safetensors")
  with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors.index"):
    hf.load(str(copy))
  with pytest.raises(FileNotFoundError, match=r"no such directory; a Hugging Face checkpoint"):
    hf.load(str(tmp_path / "nowhere"))


def test_config_json_that_is_not_json_names_the_file(copy):
  (copy / "config.json").write_bytes(b'{"model_type": "llama",')
  with pytest.raises(ValueError, match=rf"{copy / 'config.json'}: not valid UTF-8 JSON"):
    hf.load(str(copy))


def write_index(directory, weight_map):
  with open(directory / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_index_with_a_missing_shard_or_a_path_outside_the_directory(copy):
  names = list(SafetensorsFile(copy / "model.safetensors").entries)
  os.rename(copy / "model.safetensors", copy / "model-00001-of-00002.safetensors")
  index = {name: "model-00001-of-00002.safetensors" for name in names}
  write_index(copy, {**index, "model.ghost": "model-00001-of-00002.safetensors"})
  with pytest.raises(ValueError, match=r"lists tensor 'model.ghost' in .* which does not"):
    hf.load(str(copy))
  write_index(copy, {names[0]: "model-00002-of-00002.safetensors"})
  with pytest.raises(FileNotFoundError, match=rf"'{names[0]}' is in shard 'model-00002-of"):
    hf.load(str(copy))
  write_index(copy, {names[0]: "../../etc/passwd"})
  with pytest.raises(ValueError, match=r"mapped to '../../etc/passwd', which is not a file name"):
    hf.load(str(copy))


# -- crafted headers --------------------------------------------------------------------------


def file_bytes(header, data: bytes) -> bytes:
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  return len(raw).to_bytes(8, "little") + raw + data


def entry(dtype, shape, begin, end):
  return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


CRAFTED = {
  "unknown_dtype": ({"w": entry("F12", [2], 0, 8)}, "tensor 'w': unknown dtype 'F12'"),
  "size_not_shape_times_dtype": (
    {"w": entry("F32", [3], 0, 8)},
    r"tensor 'w': data_offsets \[0, 8\) hold 8 bytes but shape \[3\] of F32 needs 12",
  ),
  "overlap": (
    {"a": entry("F32", [2], 0, 8), "b": entry("U8", [4], 4, 8)},
    "tensor 'b': data_offsets .* overlap tensor 'a'",
  ),
  "hole": (
    {"a": entry("U8", [4], 0, 4), "b": entry("U8", [2], 6, 8)},
    r"tensor 'b': bytes \[4, 6\) before it belong to no tensor",
  ),
  "past_the_end": ({"w": entry("F64", [2], 0, 16)}, "tensor 'w': .* run past .* 8 bytes"),
  "trailing_bytes": ({"w": entry("U8", [4], 0, 4)}, "data section is 8 bytes but its tensors end"),
  "end_before_begin": ({"w": entry("U8", [0], 8, 0)}, "tensor 'w': data_offsets"),
  "negative_dimension": ({"w": entry("U8", [-8], 0, 8)}, "tensor 'w': shape .* non-negative"),
  "boolean_dimension": ({"w": entry("U8", [True], 0, 1)}, "tensor 'w': shape .* non-negative"),
  "empty_but_enormous": (
    {"e": entry("F32", [0, 2**62], 0, 0), "w": entry("U8", [8], 0, 8)},
    r"tensor 'e': shape \[0, 4611686018427387904\] spans more than 2\^62 bytes",
  ),
  "not_an_object": ([1, 2], "the header is a JSON list, not an object"),
  "entry_not_an_object": ({"w": [0, 8]}, "tensor 'w': the entry must be an object"),
  "not_utf8": (b'{"\xff":1}', "not UTF-8 JSON"),
  "deeply_nested": (b"[" * 100_000 + b"]" * 100_000, "not UTF-8 JSON"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_header_is_refused_by_us_and_by_the_reference(case, tmp_path):
  header, message = CRAFTED[case]
  data = file_bytes(header, bytes(range(8)))
  path = tmp_path / "crafted.safetensors"
  path.write_bytes(data)
  with pytest.raises(Exception):  # noqa: B017 (the reference raises its own types)
    safetensors_numpy.load(data)
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*{message}"):
    SafetensorsFile(path)


def test_a_name_given_twice_is_refused_where_the_reference_keeps_the_last(tmp_path):
  """Stricter than the reference on purpose: two readers could pick different entries."""
  header = b'{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
  header += b'"w":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}'
  data = file_bytes(header, bytes(range(8)))
  assert safetensors_numpy.load(data)["w"].shape == (8,)
  path = tmp_path / "twice.safetensors"
  path.write_bytes(data)
  with pytest.raises(ValueError, match=r"key 'w' appears twice"):
    SafetensorsFile(path)


# -- fuzz -------------------------------------------------------------------------------------

FUZZ_CASES = 400
FUZZ_SECONDS = 30.0
CASE_SECONDS = 2.0


def fuzz_source() -> tuple[bytes, dict[str, np.ndarray]]:
  """A small file written by the reference library: several dtypes, a scalar, an empty tensor."""
  rng = np.random.default_rng(0)
  tensors = {
    "embed.weight": rng.standard_normal((16, 8)).astype(np.float32),
    "norm.weight": rng.standard_normal((8,)).astype(np.float16),
    "counts": np.arange(5, dtype=np.int64),
    "flags": np.array([1, 0, 255], np.uint8),
    "scalar": np.array(3.5, np.float64),
    "empty": np.zeros((0, 3), np.float32),
  }
  return safetensors_numpy.save(tensors, metadata={"format": "pt"}), tensors


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
  """One seeded corruption: a bit flip, a byte in or near the header, a cut, a length field."""
  out = bytearray(data)
  header_end = 8 + int.from_bytes(data[:8], "little")
  kind = rng.choice(["bit", "header_byte", "truncate", "length_field", "append", "delete"])
  if kind == "bit":
    out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
  elif kind == "header_byte":
    out[rng.randrange(header_end + 8)] = rng.randrange(256)
  elif kind == "truncate":
    del out[rng.randrange(len(out)) :]
  elif kind == "length_field":
    length = rng.choice([0, 1, 2**62, 2**64 - 1, len(out), header_end - 9, rng.randrange(2**64)])
    out[:8] = length.to_bytes(8, "little")
  elif kind == "append":
    out += bytes(rng.randrange(1, 9))
  else:
    del out[rng.randrange(len(out))]
  return kind, bytes(out)


def test_fuzzed_files_load_what_the_reference_loads_or_raise_value_error(tmp_path):
  data, tensors = fuzz_source()
  # The reference and our reader agree on the untouched file, and it holds what was written.
  path = tmp_path / "fuzz.safetensors"
  path.write_bytes(data)
  untouched = SafetensorsFile(path)
  for name, array in tensors.items():
    np.testing.assert_array_equal(untouched.array(name), array)
    assert untouched.array(name).dtype == array.dtype

  rng = random.Random(15)
  outcomes: dict[tuple[str, str], int] = {}
  started = time.perf_counter()
  for case in range(FUZZ_CASES):
    kind, mutated = mutate(data, rng)
    try:
      expected = safetensors_numpy.load(mutated)
    except Exception:  # noqa: BLE001 (any refusal of the reference)
      expected = None
    path.write_bytes(mutated)
    context = f"case {case} ({kind})"
    with deadline(CASE_SECONDS), largest_allocation_at_most(len(mutated) + ALLOCATION_SLACK_BYTES):
      try:
        file = SafetensorsFile(path)
        loaded = {name: np.array(file.array(name)) for name in file.names()}
      except ValueError as e:
        assert str(path) in str(e), (context, e)
        loaded = None
    assert (loaded is None) == (expected is None), (context, "ours", loaded, "reference", expected)
    if loaded is not None:
      assert loaded.keys() == expected.keys(), context
      for name in expected:
        assert loaded[name].dtype == expected[name].dtype, (context, name)
        assert loaded[name].shape == expected[name].shape, (context, name)
        assert loaded[name].tobytes() == expected[name].tobytes(), (context, name)
    outcome = (kind, "loaded" if loaded is not None else "refused")
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
  elapsed = time.perf_counter() - started
  assert elapsed < FUZZ_SECONDS, elapsed
  # The mutations reach both outcomes (a fuzz that only ever refuses tests little).
  assert sum(n for (_, o), n in outcomes.items() if o == "loaded") >= 10, outcomes
  assert sum(n for (_, o), n in outcomes.items() if o == "refused") >= 200, outcomes
