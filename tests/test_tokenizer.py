"""Tokenizers: byte-level ids against Python's own UTF-8 bytes; Hugging Face tokenizer.json loading."""

import json

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import tokenizers

from train.tokenizer import ByteTokenizer, load_tokenizer


def test_byte_tokenizer_constants():
  tok = load_tokenizer("byte")
  assert isinstance(tok, ByteTokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)


@hypothesis.given(st.text(max_size=200))
@hypothesis.settings(max_examples=200, deadline=None)
def test_byte_tokenizer_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert ids == [b + 3 for b in text.encode("utf-8")]  # the reference: Python's UTF-8 bytes
  assert all(3 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids, dtype=np.int32)) == text
  np.testing.assert_array_equal(tok.encode_np(text), np.asarray(ids, dtype=np.int32))


def test_byte_tokenizer_decode_drops_specials():
  tok = ByteTokenizer()
  ids = [tok.bos_id] + tok.encode("héllo") + [tok.eos_id, tok.pad_id, tok.pad_id]
  assert tok.decode(ids) == "héllo"


def _write_bpe(tmp_path, specials=("<pad>", "<s>", "</s>")):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=list(specials),
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(
    ["Question: 1 + 2\nAnswer: 3\n"] * 20 + ["héllo wörld"] * 5, trainer=trainer
  )
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  return path, tok


def test_hf_tokenizer_round_trip_and_specials(tmp_path):
  path, reference = _write_bpe(tmp_path)
  tok = load_tokenizer(str(path))
  assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
  assert tok.pad_id == reference.token_to_id("<pad>")
  assert tok.bos_id == reference.token_to_id("<s>")
  assert tok.eos_id == reference.token_to_id("</s>")
  for text in ["Question: 12 + 7\nAnswer: 19\n", "héllo wörld ✓", ""]:
    ids = tok.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text


def test_hf_tokenizer_config_names_specials(tmp_path):
  path, reference = _write_bpe(tmp_path, specials=("[P]", "[B]", "[E]"))
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"bos_token": "[B]", "eos_token": {"content": "[E]"}, "pad_token": "[P]"})
  )
  tok = load_tokenizer(str(path))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == tuple(
    reference.token_to_id(t) for t in ("[P]", "[B]", "[E]")
  )


def test_hf_tokenizer_gpt2_style_single_special(tmp_path):
  path, reference = _write_bpe(tmp_path, specials=("<|endoftext|>",))
  tok = load_tokenizer(str(path))
  eos = reference.token_to_id("<|endoftext|>")
  assert tok.eos_id == tok.bos_id == tok.pad_id == eos


def test_hf_tokenizer_is_picklable(tmp_path):
  import pickle

  path, _ = _write_bpe(tmp_path)
  tok = pickle.loads(pickle.dumps(load_tokenizer(str(path))))
  assert tok.decode(tok.encode("1 + 2")) == "1 + 2"


def test_load_tokenizer_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"^data\.tokenizer=.*no such file"):
    load_tokenizer(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match=r"^data\.tokenizer="):
    load_tokenizer(str(bad))
  path, _ = _write_bpe(tmp_path, specials=("<unk>",))
  with pytest.raises(ValueError, match=r"^data\.tokenizer=.*end-of-sequence"):
    load_tokenizer(str(path))
