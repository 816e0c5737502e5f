"""Tokenizers for the data pipeline: a byte-level default and Hugging Face `tokenizer.json` files.

Both expose the same small surface the pipeline and the trainer use:

    vocab_size: int                    ids are in [0, vocab_size)
    pad_id, bos_id, eos_id: int        special ids
    encode(text) -> list[int]          no special tokens added (the pipeline adds BOS ... EOS)
    decode(ids) -> str                 special ids (pad/bos/eos) are dropped

`load_tokenizer("byte")` gives `ByteTokenizer()`; `load_tokenizer(path)` loads a `tokenizer.json`
with the `tokenizers` library (no network access).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as tokens: pad=0, bos=1, eos=2, byte b -> id b + 3; vocab_size = 259."""

  pad_id = 0
  bos_id = 1
  eos_id = 2
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode("utf-8")]

  def encode_np(self, text: str) -> np.ndarray:
    """`encode` as an int32 array (fast path used by the pipeline)."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return raw.astype(np.int32) + self.offset

  def decode(self, ids) -> str:
    """Bytes of ids in [3, 259) decoded as UTF-8 (invalid sequences -> U+FFFD); others dropped."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= self.offset) & (ids < self.vocab_size)]
    return (ids - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


# Names tried, in order, when tokenizer_config.json does not say which tokens are special.
_BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|endoftext|>")
_EOS_CANDIDATES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


def _token_content(entry) -> str | None:
  if isinstance(entry, str):
    return entry
  if isinstance(entry, dict):
    return entry.get("content")
  return None


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` loaded from a tokenizer.json file.

  Special ids come from a `tokenizer_config.json` next to the file (bos_token, eos_token,
  pad_token) when there is one, otherwise from well-known token strings (`<s>`, `</s>`,
  `<|endoftext|>`, `<pad>`, ...). EOS is required; BOS falls back to EOS (GPT-2 style) and PAD to
  EOS (padding is always masked out of the loss, so its id only has to be valid).
  """

  def __init__(self, path: str):
    import tokenizers  # local import: only needed for this tokenizer

    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    named = {}
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    if os.path.exists(config_path):
      with open(config_path) as f:
        cfg = json.load(f)
      for key in ("bos", "eos", "pad"):
        content = _token_content(cfg.get(f"{key}_token"))
        if content is not None and self._tok.token_to_id(content) is not None:
          named[key] = self._tok.token_to_id(content)

    def first_known(candidates):
      for token in candidates:
        token_id = self._tok.token_to_id(token)
        if token_id is not None:
          return int(token_id)
      return None

    eos = named.get("eos", first_known(_EOS_CANDIDATES))
    if eos is None:
      raise ValueError(
        f"data.tokenizer={path!r}: cannot find an end-of-sequence token; add a "
        f"tokenizer_config.json with eos_token next to it, or use one of {_EOS_CANDIDATES}"
      )
    bos = named.get("bos", first_known(_BOS_CANDIDATES))
    pad = named.get("pad", first_known(_PAD_CANDIDATES))
    self.eos_id = int(eos)
    self.bos_id = int(eos if bos is None else bos)
    self.pad_id = int(eos if pad is None else pad)
    self._special = {self.pad_id, self.bos_id, self.eos_id}

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_np(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    ids = [i for i in ids if i not in self._special and 0 <= i < self.vocab_size]
    return self._tok.decode(ids, skip_special_tokens=False)

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r})"


def load_tokenizer(spec: str):
  """`"byte"` -> ByteTokenizer(); otherwise a path to a Hugging Face tokenizer.json."""
  if spec == "byte":
    return ByteTokenizer()
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"data.tokenizer={spec!r}: expected 'byte' or a path to a tokenizer.json")
  if not os.path.isfile(spec):
    raise ValueError(
      f"data.tokenizer={spec!r}: no such file; expected 'byte' or a path to a Hugging Face "
      "tokenizer.json"
    )
  try:
    return HFTokenizer(spec)
  except ValueError:
    raise
  except Exception as e:  # tokenizers raises its own Exception type for malformed files
    raise ValueError(
      f"data.tokenizer={spec!r}: cannot load it as a Hugging Face tokenizer.json ({e})"
    ) from e
