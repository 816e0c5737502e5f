"""train.evaluate: a scripted generator against hand-computed accuracies, a tiny random model end
to end, and field-naming validation.

The scripted generator writes fixed texts (byte tokens) for each (problem, sample, chunk) and
drives the environment itself, so every expected number below is worked out by hand from the
rules in train/evaluate.py's docstring, not by calling its scoring helpers.
"""

import io
import json

import ml_collections
import numpy as np
import pytest
from flax import nnx

from adaptive.tasks import ChatTemplate, make_task
from configs import sft_traces
from models import registry
from train import evaluate
from train.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
OPTIONS = dict(length=2)


def answers(count):
  """(right, wrong) answers of the first `count` held-out problems (seed 0)."""
  problems = make_task("long_sum", **OPTIONS).problems("heldout", count, seed=0)
  return [(p.answer, str((int(p.answer) + 1) % 10)) for p in problems]


def scripted(script):
  """A rollout function writing script[(problem, sample)][chunk] = (text, ends_on_eos)."""

  def rollout_fn(env, queries, *, num_samples, sampling, rng, problem_ids, progress):
    del sampling, rng, progress
    rows = [(p, g) for p in range(len(queries)) for g in range(num_samples)]
    obs = env.reset([queries[p] for p, _ in rows])
    chunk = 0
    while not obs.done.all():
      outputs = []
      for r, (p, g) in enumerate(rows):
        if obs.done[r]:
          outputs.append(None)
          continue
        text, eos = script[(problem_ids[p], g)][chunk]
        ids = [b + 3 for b in text.encode()] + ([TOKENIZER.eos_id] if eos else [])
        assert len(ids) <= obs.max_new_tokens[r]
        outputs.append(ids)
      obs = env.step(outputs)
      chunk += 1
    return evaluate.Rollouts(env.traces, env.ended_on_eos, np.array([p for p, _ in rows]))

  return rollout_fn


def eval_section(**fields):
  ev = evaluate.default_rl_eval_config()
  ev.task_options = ml_collections.ConfigDict(OPTIONS)
  for key, value in fields.items():
    ev[key] = value
  return ev


def run_scripted(ev, script):
  out = io.StringIO()
  results = evaluate.evaluate(ev, scripted(script), TOKENIZER, ChatTemplate.plain(), out=out)
  return results, out.getvalue()


def test_longcot_trimmed_accuracy_equals_the_hand_computed_curve():
  (a0, w0), (a1, w1), (a2, _) = answers(3)
  box = lambda x: f"\\boxed{{{x}}}"
  script = {
    (0, 0): [("x</think>" + box(a0), True)],  # 18 + EOS: right from budget 20 on
    (0, 1): [("</think>" + box(w0), True)],  # wrong: never
    (1, 0): [("</think>" + box(a1) + " no " + box(w1), True)],  # revised to wrong: never
    (1, 1): [("</think>" + box(w1) + " no " + box(a1), True)],  # revised to right (ends at 30)
    (2, 0): [(box(a2), True)],  # no </think>: never
    (2, 1): [("." * 40 + "</think>" + box(a2), True)],  # right, ends at 57
  }
  ev = eval_section(envs=("longcot",), heldout=3, num_samples=2, longcot_budgets=(10, 20, 40, 64))
  results, printed = run_scripted(ev, script)
  curve = results["longcot"]["curve"]
  assert [p["budget"] for p in curve] == [10, 20, 40, 64]
  assert [p["accuracy"] for p in curve] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])
  assert [p["count"] for p in curve] == [6] * 4
  lengths = [19, 18, 31, 31, 10, 58]  # tokens, EOS included
  for point in curve:
    want = np.mean([min(n, point["budget"]) for n in lengths])
    assert point["mean_thinking_tokens"] == pytest.approx(want)
  assert results["accuracy"] == pytest.approx(0.5)
  assert results["stderr"] == pytest.approx(np.sqrt(0.5 * 0.5 / 6))
  assert results["count"] == 6 and results["problems"] == 3
  assert "‖ chunk 1 (carry 0 tokens) ‖ x</think>" in printed
  # Per problem (2 samples each), from the comments above: at budget 20 only (0, 0) is right;
  # in full, one of each problem's two traces is. Problems as the units: std([.5]*3) = 0.
  assert [p["problem_accuracy"] for p in curve] == [[0, 0, 0], [0.5, 0, 0], [0.5, 0.5, 0]] + [
    [0.5, 0.5, 0.5]
  ]
  assert curve[1]["problem_stderr"] == pytest.approx(np.std([0.5, 0, 0], ddof=1) / np.sqrt(3))
  assert results["problem_stderr"] == 0.0


def test_delethink_accuracy_by_cap_equals_the_hand_computed_curve():
  (a0, _), (a1, _) = answers(2)
  box = lambda x: f"\\boxed{{{x}}}"
  script = {
    # Ends in chunk 1: right at every cap.
    (0, 0): [("ab</think>" + box(a0), True)],
    # </think> ends chunk 1 and stays in the carry (last m = 16 tokens); the box comes in
    # chunk 2: 0 at cap 1 (no box yet), right from cap 2.
    (0, 1): [("." * 24 + "</think>", False), (box(a0), True)],
    # Never ends: 0 everywhere.
    (1, 0): [("." * 32, False), ("." * 16, False), ("." * 16, False)],
    # </think> opens chunk 1 and scrolls out of the carry (keep_head 4 keeps only "</th"): the
    # box in chunk 2 follows no </think> in its window, 0 everywhere.
    (1, 1): [("</think>" + "." * 24, False), (box(a1), True)],
  }
  ev = eval_section(
    envs=("delethink",),
    heldout=2,
    num_samples=2,
    chunk_size=32,
    carryover=16,
    keep_head=4,
    mode="inference",
    max_chunks=(1, 2, 3),
  )
  results, printed = run_scripted(ev, script)
  curve = results["delethink"]["curve"]
  assert [p["accuracy"] for p in curve] == pytest.approx([1 / 4, 2 / 4, 2 / 4])
  assert [p["thinking_budget"] for p in curve] == [32, 48, 64]
  thinking = [[20, 20, 20], [32, 42, 42], [32, 48, 64], [32, 42, 42]]
  want = np.mean(thinking, axis=0)
  assert [p["mean_thinking_tokens"] for p in curve] == pytest.approx(want.tolist())
  assert [p["eos_rate"] for p in curve] == pytest.approx([1 / 4, 3 / 4, 3 / 4])
  assert results["delethink"]["accuracy"] == pytest.approx(0.5)
  assert "‖ chunk 2 (carry 20 tokens) ‖ " in printed


def tiny_config():
  config = sft_traces.get_config()
  config.unlock()
  config.model.update(dict(dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16))
  config.model.mlp_dim = 64
  config.rl_eval.update(
    dict(
      heldout=2,
      num_samples=1,
      chunk_size=16,
      carryover=8,
      keep_head=2,
      max_chunks=(1, 2),
      longcot_budgets=(4, 8, 16),
      temperature=1.0,
      batch_problems=2,
      print_samples=1,
    )
  )
  config.rl_eval.task_options = ml_collections.ConfigDict(OPTIONS)
  return config


def test_tiny_random_model_end_to_end(tmp_path, capsys):
  config = tiny_config()
  fields = dict(config.model)
  model_config = registry.make_config(fields.pop("kind"), fields)
  model = registry.build("dense", model_config, rngs=nnx.Rngs(0))
  results = evaluate.run(config, str(tmp_path), model=model, output="tiny.json")
  written = json.loads((tmp_path / "tiny.json").read_text())
  assert written == json.loads(json.dumps(results))
  for key in ("accuracy", "stderr", "count", "mean_thinking_tokens", "delethink", "longcot"):
    assert key in written
  assert written["count"] == 2
  for name, setting, field in (
    ("delethink", "max_chunks", "max_chunks"),
    ("longcot", "budget", "longcot_budgets"),
  ):
    curve = written[name]["curve"]
    assert [p[setting] for p in curve] == list(config.rl_eval[field])
    assert all(0 <= p["accuracy"] <= 1 and p["count"] == 2 for p in curve)
  longcot = written["longcot"]["curve"]
  assert all(a["accuracy"] <= b["accuracy"] for a, b in zip(longcot[:-1], longcot[1:], strict=True))
  assert all(p["mean_thinking_tokens"] <= p["budget"] for p in longcot)
  assert "‖ chunk 1" in capsys.readouterr().out


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("max_chunks", (2, 1), r"^rl_eval\.max_chunks=\(2, 1\)"),
    ("longcot_budgets", (), r"^rl_eval\.longcot_budgets=\(\)"),
    ("envs", ("delethink", "markov"), r"^rl_eval\.envs="),
    ("carryover", 64, r"^rl_eval\.carryover: carryover"),
    ("mode", "test", r"^rl_eval\.mode='test'"),
    ("temperature", -1.0, r"^rl_eval\.temperature=-1\.0"),
    ("heldout", 0, r"^rl_eval\.heldout=0"),
    ("task", "no_task", r"^rl_eval\.task='no_task'"),
    ("task_options", ml_collections.ConfigDict(dict(steps=3)), r"^rl_eval\.task_options="),
    ("output", "a/b.json", r"^rl_eval\.output='a/b\.json'"),
  ],
)
def test_bad_rl_eval_fields_fail_before_loading(field, value, message, tmp_path):
  config = tiny_config()
  config.rl_eval[field] = value
  with pytest.raises(ValueError, match=message):
    evaluate.run(config, str(tmp_path))  # no checkpoint either: the field is reported first
