"""One .safetensors file, validated in full before anything is mapped or allocated.

    file = SafetensorsFile("/ckpt/model.safetensors")   # reads and checks the header only
    file.names(), file.shape(name), file.dtype_name(name)
    view = file.array(name)                              # zero-copy, read-only memory map

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
{name: {"dtype": "F32", "shape": [d0, ...], "data_offsets": [begin, end]},
"__metadata__": {str: str}}, then the data section; offsets count bytes from the
start of the data section.

A checkpoint comes from the internet, so every claim in the header is checked
against the file's real size before it is used: N fits in the file (and under
the reference implementation's 100 MB cap), the header is a JSON object, every
dtype is a known one, every shape a list of non-negative integers, every
tensor's [begin, end) inside the data section and exactly shape x itemsize
bytes long, and the tensors tile the data section without overlaps, holes or
trailing bytes (as the reference `safetensors` library requires). Nothing is
allocated from a size the header claims: the header read is bounded by the
file's size, and tensors are views into a memory map of the file. Each failure
is a ValueError naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np

# The reference implementation refuses headers above this size (bytes).
MAX_HEADER_BYTES = 100_000_000
HEADER_LENGTH_BYTES = 8
# numpy refuses shapes whose non-zero dimensions span more bytes than this, even when empty.
MAX_DESCRIBABLE_BYTES = 2**62

# Every byte-sized dtype of the format; sub-byte ones (F4, F6_*) are not readable as numpy views.
DTYPES = {
  "BOOL": np.dtype(np.bool_),
  "U8": np.dtype("u1"),
  "I8": np.dtype("i1"),
  "U16": np.dtype("<u2"),
  "I16": np.dtype("<i2"),
  "U32": np.dtype("<u4"),
  "I32": np.dtype("<i4"),
  "U64": np.dtype("<u8"),
  "I64": np.dtype("<i8"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F32": np.dtype("<f4"),
  "F64": np.dtype("<f8"),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
METADATA_KEY = "__metadata__"


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    duplicate = next(k for k in keys if keys.count(k) > 1)
    raise ValueError(f"key {duplicate!r} appears twice")
  return dict(pairs)


def _is_count(x) -> bool:
  """A JSON non-negative integer (JSON true/false are Python bools, which are ints)."""
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsFile:
  """The validated header of one safetensors file and read-only views of its tensors.

  Attributes:
    path: the file.
    data_start: byte offset of the data section in the file (8 + header length).
    entries: {tensor name: {"dtype", "shape", "data_offsets"}} as validated.
    metadata: the header's `__metadata__` dict ({} when absent).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    with open(self.path, "rb") as f:
      file_bytes = os.fstat(f.fileno()).st_size
      header_bytes = self._read_header_bytes(f, file_bytes)
    self.data_start = HEADER_LENGTH_BYTES + len(header_bytes)
    header = self._parse_header(header_bytes)
    self.metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(self.metadata, dict):
      raise self._error(f"{METADATA_KEY} is {type(self.metadata).__name__}, not an object")
    self.entries = {name: self._checked_entry(name, entry) for name, entry in header.items()}
    self._check_tiling(file_bytes - self.data_start)
    self._mmap = None

  def _error(self, message: str, tensor: str | None = None) -> ValueError:
    where = f"tensor {tensor!r}: " if tensor is not None else ""
    return ValueError(f"{self.path}: {where}{message} (not a valid safetensors file)")

  def _read_header_bytes(self, f, file_bytes: int) -> bytes:
    if file_bytes < HEADER_LENGTH_BYTES:
      raise self._error(
        f"the file is {file_bytes} bytes; it must start with an 8-byte header length"
      )
    header_length = int.from_bytes(f.read(HEADER_LENGTH_BYTES), "little")
    room = file_bytes - HEADER_LENGTH_BYTES
    if header_length > room:
      raise self._error(
        f"the header length field says {header_length} bytes but only {room} bytes follow it"
      )
    if header_length > MAX_HEADER_BYTES:
      raise self._error(f"the header is {header_length} bytes; at most {MAX_HEADER_BYTES} allowed")
    header_bytes = f.read(header_length)
    if len(header_bytes) != header_length:  # the file shrank while we read it
      raise self._error(f"the header ends after {len(header_bytes)} of {header_length} bytes")
    return header_bytes

  def _parse_header(self, header_bytes: bytes) -> dict:
    try:
      header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
      raise self._error(f"the header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
      raise self._error(f"the header is a JSON {type(header).__name__}, not an object")
    return header

  def _checked_entry(self, name: str, entry) -> dict:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
      raise self._error("the entry must be an object with dtype, shape and data_offsets", name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
      raise self._error(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}", name)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
      raise self._error(f"shape {shape!r} is not a list of non-negative integers", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
      raise self._error(f"data_offsets {offsets!r} is not [begin, end] in bytes", name)
    if math.prod(d for d in shape if d) * DTYPES[dtype].itemsize > MAX_DESCRIBABLE_BYTES:
      # Even an empty tensor (a zero dimension) cannot have a shape numpy cannot describe.
      raise self._error(f"shape {shape} spans more than 2^62 bytes", name)
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
      raise self._error(
        f"data_offsets [{begin}, {end}) hold {end - begin} bytes but shape {shape} of "
        f"{dtype} needs {expected}",
        name,
      )
    return {"dtype": dtype, "shape": tuple(shape), "data_offsets": (begin, end)}

  def _check_tiling(self, data_bytes: int) -> None:
    """Tensors cover [0, data_bytes) exactly, in offset order, without overlaps or holes."""
    position, previous = 0, None
    for name, entry in sorted(self.entries.items(), key=lambda kv: kv[1]["data_offsets"]):
      begin, end = entry["data_offsets"]
      if end > data_bytes:
        raise self._error(
          f"data_offsets [{begin}, {end}) run past the data section's {data_bytes} bytes "
          f"(the file is truncated or the header is wrong)",
          name,
        )
      if begin < position:
        raise self._error(f"data_offsets [{begin}, {end}) overlap tensor {previous!r}", name)
      if begin > position:
        raise self._error(f"bytes [{position}, {begin}) before it belong to no tensor", name)
      position, previous = end, name
    if position != data_bytes:
      raise self._error(
        f"the data section is {data_bytes} bytes but its tensors end at byte {position}"
      )

  def names(self) -> list[str]:
    return list(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.entries[name]["shape"]

  def dtype_name(self, name: str) -> str:
    return self.entries[name]["dtype"]

  def array(self, name: str) -> np.ndarray:
    """Read-only memory-mapped view of `name`; nothing is read until it is sliced or copied."""
    entry = self.entries[name]
    begin, end = entry["data_offsets"]
    if begin == end:  # an empty tensor needs no bytes (and an empty file cannot be mapped)
      return np.empty(entry["shape"], DTYPES[entry["dtype"]])
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    raw = self._mmap[self.data_start + begin : self.data_start + end]
    return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
