"""SFT data source: loss on the response only, splits disjoint, too-long examples, resume, errors.

The reference tokenization is written out here from the spec, not taken from train/ or the
template code: the plain chat prompt `User: {question}\\nAssistant: <think>\\n`, the target
`{solution}\\n</think>\\nThe answer is \\boxed{answer}.`, UTF-8 bytes + 3, BOS=1, EOS=2.
"""

import ml_collections
import numpy as np
import pytest

from adaptive.tasks import make_task
from train import data as data_lib
from train import sft_data

BOS, EOS, PAD = 1, 2, 0
OPTIONS = dict(length=8, min_length=2)


def config(**overrides):
  data = data_lib.default_data_config()
  data.source = "sft:long_sum"
  data.task_options = ml_collections.ConfigDict(OPTIONS)
  data.num_examples = 64
  data.eval_examples = 16
  data.prefetch = 0
  for key, value in overrides.items():
    data[key] = value
  return data


def byte_ids(text):
  return [b + 3 for b in text.encode("utf-8")]


def reference(problem):
  """(ids, number of prompt ids) of one SFT example, from the spec."""
  prompt = [BOS, *byte_ids(f"User: {problem.question}\nAssistant: <think>\n")]
  target = byte_ids(f"{problem.solution}\n</think>\nThe answer is \\boxed{{{problem.answer}}}.")
  return [*prompt, *target, EOS], len(prompt)


def segments(batch):
  """Every packed segment of a batch: (tokens, targets, loss_mask) arrays."""
  found = []
  for b in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][b]
    assert np.all(batch["loss_mask"][b][seg == 0] == 0)
    for s in range(1, int(seg.max(initial=0)) + 1):
      where = seg == s
      np.testing.assert_array_equal(batch["positions"][b][where], np.arange(where.sum()))
      found.append(tuple(batch[k][b][where] for k in ("tokens", "targets", "loss_mask")))
  return found


def test_loss_mask_is_exactly_the_completion_and_its_eos():
  problems = make_task("long_sum", **OPTIONS).problems("train", 64, seed=0)
  expected = {}
  for problem in problems:
    ids, prompt_len = reference(problem)
    expected[tuple(ids[:-1])] = (ids, prompt_len)
  it = data_lib.make_iterator(config(), seq_len=256, global_batch_size=4, seed=0)
  seen = 0
  for _ in range(6):
    for tokens, targets, mask in segments(next(it)):
      ids, prompt_len = expected[tuple(tokens)]  # every segment is one whole train example
      np.testing.assert_array_equal(targets, ids[1:])
      # Target j is ids[j + 1]: a response token iff j + 1 >= prompt_len.
      want = (np.arange(len(targets)) + 1 >= prompt_len).astype(np.float32)
      np.testing.assert_array_equal(mask, want)
      assert targets[mask > 0][-1] == EOS and mask.sum() == len(ids) - prompt_len
      seen += 1
  assert seen >= 24


def test_train_and_eval_examples_are_disjoint_and_eval_is_heldout():
  data = config(num_examples=300, eval_examples=100)
  train = sft_data.split_examples(data, "train")
  heldout = sft_data.split_examples(data, "eval")
  train_prompts = {train[i][0] for i in range(len(train))}
  eval_prompts = {heldout[i][0] for i in range(len(heldout))}
  assert len(eval_prompts) > 50 and not train_prompts & eval_prompts
  task_heldout = make_task("long_sum", **OPTIONS).problems("heldout", 100, seed=0)
  assert [heldout.problem(i) for i in range(100)] == task_heldout


def test_too_long_examples_are_dropped_or_cut():
  # length 2..8: examples of ~175-215 tokens; seq_len 190 fits only the short ones.
  problems = make_task("long_sum", **OPTIONS).problems("train", 64, seed=0)
  whole = {tuple(reference(p)[0][:-1]) for p in problems}
  lengths = [len(reference(p)[0]) - 1 for p in problems]
  seq_len = int(np.median(lengths))
  dropped = data_lib.make_iterator(config(), seq_len=seq_len, global_batch_size=4, seed=0)
  for _ in range(4):
    for tokens, _, _ in segments(next(dropped)):
      assert tuple(tokens) in whole
  cut = data_lib.make_iterator(config(sft_too_long="cut"), seq_len=64, global_batch_size=4, seed=0)
  pieces = segments(next(cut))
  assert all(len(t) <= 64 and m.any() for t, _, m in pieces)
  # The prompt is > 64 tokens: some pieces start mid-example and are all response.
  assert any(m.all() for _, _, m in pieces) and any(not m[0] for _, _, m in pieces)


def test_iterator_state_resumes_exactly():
  it = data_lib.make_iterator(config(), seq_len=256, global_batch_size=4, seed=3)
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  again = data_lib.make_iterator(config(), seq_len=256, global_batch_size=4, seed=3)
  again.set_state(state)
  for batch in want:
    got = next(again)
    for key in batch:
      np.testing.assert_array_equal(got[key], batch[key])
  other = data_lib.make_iterator(
    config(task_options=ml_collections.ConfigDict(dict(length=7, min_length=2))),
    seq_len=256,
    global_batch_size=4,
    seed=3,
  )
  with pytest.raises(ValueError, match="different pipeline"):
    other.set_state(state)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("source", "sft:no_such_task", r"^data\.source='sft:no_such_task'"),
    ("source", "sft:", r"^data\.source='sft:'"),
    ("task_options", ml_collections.ConfigDict(dict(lenght=8)), r"^data\.task_options=.*lenght"),
    ("task_options", ml_collections.ConfigDict(dict(length=0)), r"^data\.task_options="),
    ("sft_too_long", "wrap", r"^data\.sft_too_long='wrap'"),
    ("chat_template", "/no/such/dir", r"^data\.chat_template='/no/such/dir'"),
    ("num_examples", 0, r"^data\.num_examples=0"),
  ],
)
def test_validation_names_the_field(field, value, message):
  data = config()
  data[field] = value
  with pytest.raises(ValueError, match=message):
    data_lib.validate_data_config(data, seq_len=256, global_batch_size=4, process_count=1)


def test_a_seq_len_no_example_fits_fails_before_iterating():
  with pytest.raises(ValueError, match=r"^seq_len=32: none of the first 8 SFT examples fits"):
    data_lib.make_iterator(config(), seq_len=32, global_batch_size=4, seed=0)
