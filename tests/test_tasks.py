"""adaptive.tasks: answer extraction, verifiers, splits, the long-trace task, chat templates.

References are independent of the code under test: a written-out expectation table for
extraction, reasoning-gym's own `score_answer`, math equalities worked out by hand, a replay of the
long task written here from its question text, and transformers' `apply_chat_template`.
"""

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive.tasks import (
  TASK_NAMES,
  ChatTemplate,
  Problem,
  extract_answer,
  length_for_solution_chars,
  make_task,
  reward_on_window,
)
from adaptive.tasks.math_check import math_equal

# --- answer extraction -------------------------------------------------------------------------

# (completion, require_think, expected answer); None = no answer (reward 0).
EXTRACTION_TABLE = [
  ("<think>\nwork\n</think>\nThe answer is \\boxed{42}.", True, "42"),
  ("work</think>\\boxed{7}", True, "7"),  # prompt opened <think>: the completion has no opening
  ("</think> \\boxed{ 7 } ", True, "7"),  # content is stripped
  ("</think>\\boxed {5}", True, "5"),  # spaces before the brace
  ("</think>\\boxed{\\frac{1}{2}}", True, "\\frac{1}{2}"),  # nested braces
  ("</think>\\boxed{{a}{b{c}}}", True, "{a}{b{c}}"),  # deeper nesting
  ("</think>\\boxed{\\{1,2\\}}", True, "\\{1,2\\}"),  # escaped braces do not count
  ("</think>\\boxed{\\}}", True, "\\}"),
  ("</think>\\boxed{1} or \\boxed{2}", True, "2"),  # several: the last one
  ("</think>\\boxed{\\boxed{3}}", True, "3"),  # the one that starts last
  ("</think>\\boxed{1} then \\boxed{2", True, "1"),  # an unclosed last box is ignored
  ("</think>\\boxed{12", True, None),  # cut off mid-answer
  ("\\boxed{5}", True, None),  # no think tag, thinking required
  ("\\boxed{5}", False, "5"),  # no think tag, tags optional: the whole text
  ("a \\boxed{5}\nb", False, "5"),
  ("\\boxed{9}</think>no box", True, None),  # only text after </think> counts
  ("\\boxed{9}</think>\\boxed{4}", False, "4"),  # a think tag present: its tail, even if optional
  ("x</think>\\boxed{1}</think>\\boxed{2}", True, "2"),  # two tags: after the first one
  ("x</think>y</think>z", True, None),
  ("x</think>\\boxed{1}</think>", True, "1"),
  ("", True, None),
  ("", False, None),
  ("</think>", True, None),
  ("</think>\\boxed{}", True, ""),  # empty box: extracted empty (scores 0)
  ("</think>\\boxed", True, None),
  ("</think>\\boxed5", True, None),  # TeX's brace-less \boxed 5 is not supported
  ("</think>The answer is 5.", True, None),  # no box, no answer
]


@pytest.mark.parametrize("text,require_think,expected", EXTRACTION_TABLE)
def test_extract_answer_table(text, require_think, expected):
  assert extract_answer(text, require_think=require_think) == expected


# --- verifiers ---------------------------------------------------------------------------------

MATH_TABLE = [
  ("0.5", "\\frac{1}{2}", True),
  ("\\frac{1}{2}", "0.5", True),
  ("\\frac{1}{2}", "1/2", True),
  ("$\\dfrac{332}{971}$", "332/971", True),  # reasoning-gym writes some answers inside $...$
  ("-129", "-129.0", True),
  ("\\sqrt{2}", "2^{1/2}", True),
  ("2\\pi", "\\pi \\cdot 2", True),
  ("4-7i", "4.0 - 7.0i", True),
  ("12", "13", False),
  ("\\frac{1}{2}", "\\frac{1}{3}", False),
  ("5", "", False),
  ("5", "five apples", False),
]


@pytest.mark.parametrize("reference,answer,equal", MATH_TABLE)
def test_math_equal(reference, answer, equal):
  assert math_equal(reference, answer) is equal


def boxed(answer: str) -> str:
  return f"<think>\nwork\n</think>\nThe answer is \\boxed{{{answer}}}."


@pytest.mark.parametrize("dataset", ["chain_sum", "spell_backward", "leg_counting"])
def test_reasoning_gym_score_is_the_datasets_own(dataset):
  import reasoning_gym

  task = make_task(f"rg:{dataset}")
  own = reasoning_gym.create_dataset(dataset, seed=123, size=1)  # an independent instance
  for problem in task.problems("train", 4, seed=3):
    entry = problem.metadata["entry"]
    for answer in (problem.answer, problem.answer + "1", "x" + problem.answer[::-1], "0"):
      expected = own.score_answer(answer, entry)
      assert task.score(problem, boxed(answer)) == pytest.approx(expected), answer
    assert task.score(problem, boxed(problem.answer)) == 1.0


def test_reasoning_gym_binary_option():
  task = make_task("rg:chain_sum", binary=True)
  problem = task.problems("train", 1, seed=0)[0]
  assert task.score(problem, boxed(problem.answer)) == 1.0
  assert task.score(problem, boxed(problem.answer + "1")) == 0.0  # the dataset itself gives 0.x
  assert make_task("rg:chain_sum").score(problem, boxed(problem.answer + "1")) > 0.0


def test_datasets_that_execute_answers_need_an_explicit_opt_in():
  with pytest.raises(ValueError, match="allow_eval=True"):
    make_task("rg:countdown")  # its score_answer runs the answer through sympy's parse_expr
  task = make_task("rg:countdown", allow_eval=True)
  problem = task.problems("train", 1, seed=0)[0]
  assert task.score(problem, task.sft_completion(problem)) == 1.0
  make_task("math:simple_equations")  # math tasks score with math-verify, never with the dataset


def test_dataset_without_a_reference_answer_is_rl_only():
  task = make_task("rg:rush_hour")  # scored by simulating the moves
  problem = task.problems("train", 1, seed=0)[0]
  assert problem.answer == "" and problem.metadata["entry"]["answer"] is None
  with pytest.raises(ValueError, match="no reference answer"):
    task.sft_completion(problem)
  assert task.score(problem, boxed("")) == 0.0


@pytest.mark.slow
def test_every_reasoning_gym_dataset_scores_its_own_sft_completion():
  from adaptive.tasks.gym import _registry

  for dataset in sorted(_registry()):
    if dataset == "composite":  # needs a list of datasets as its option
      continue
    task = make_task(f"rg:{dataset}", allow_eval=True)
    for problem in task.problems("train", 3, seed=0):
      if problem.answer:
        assert task.score(problem, task.sft_completion(problem)) == 1.0, dataset


def corrupt_answer(answer: str) -> str:
  """A different answer of the same kind that does not contain the reference."""
  if re.fullmatch(r"-?\d+", answer):
    return str(int(answer) + 1) if not answer.endswith("9") else str(int(answer) - 1)
  if re.fullmatch(r"[A-Z]", answer):
    return "B" if answer == "A" else "A"
  return "\\frac{7}{3}" if answer != "\\frac{7}{3}" else "1"


SFT_TASKS = [
  ("long_sum", {"length": 20, "ops": "+-*"}),
  ("long_fsm", {"length": 20}),
  ("long_recurrence", {"length": 20, "max_coefficient": 3}),
  ("rg:chain_sum", {}),
  ("rg:basic_arithmetic", {}),
  ("math", {}),
  ("math:fraction_simplification", {}),
]


@pytest.mark.parametrize("name,options", SFT_TASKS)
def test_sft_completion_scores_one_and_corruptions_zero(name, options):
  task = make_task(name, **options)
  for problem in task.problems("train", 3, seed=5):
    completion = task.sft_completion(problem)
    prefix = f"<think>\n{problem.solution or ''}\n</think>\n"
    assert completion == prefix + f"The answer is \\boxed{{{problem.answer}}}."
    assert task.score(problem, completion) == 1.0
    wrong = completion.replace(
      f"\\boxed{{{problem.answer}}}", f"\\boxed{{{corrupt_answer(problem.answer)}}}"
    )
    assert task.score(problem, wrong) == 0.0
    untagged = completion.replace("</think>", "")
    assert task.score(problem, untagged) == 0.0
    assert task.score(problem, untagged, require_think=False) == 1.0
    assert task.score(problem, completion[: completion.rindex("}")]) == 0.0  # cut inside the box


RANDOM_TEXT = st.one_of(
  st.text(max_size=200),
  st.lists(
    st.sampled_from(
      [
        "</think>",
        "<think>",
        "\\boxed{",
        "\\boxed",
        "{",
        "}",
        "\\",
        "7",
        "x",
        " ",
        "\n",
        "\\frac{1}{2}",
        "$",
        "1e9",
        "**",
      ]
    ),
    max_size=30,
  ).map("".join),
)


@settings(max_examples=150, deadline=None)
@given(text=RANDOM_TEXT, require_think=st.booleans())
def test_score_never_raises_on_random_text(task_zoo, text, require_think):
  for task, problem in task_zoo:
    reward = task.score(problem, text, require_think=require_think)
    assert 0.0 <= reward <= 1.0


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(0, 258), max_size=300))
def test_score_of_decoded_random_byte_tokens(task_zoo, ids):
  from train.tokenizer import ByteTokenizer

  text = ByteTokenizer().decode(ids)  # invalid UTF-8 turns into U+FFFD
  for task, problem in task_zoo:
    assert 0.0 <= task.score(problem, text) <= 1.0


def test_score_of_non_text_is_zero(task_zoo):
  for task, problem in task_zoo:
    good = task.sft_completion(problem)
    assert task.score(problem, good.encode("utf-8")) == 1.0
    assert task.score(problem, b"\xff\xfe</think>\\boxed{\xc3}") == 0.0
    assert task.score(problem, None) == 0.0
    assert task.score(problem, 12) == 0.0


@pytest.fixture(scope="module")
def task_zoo():
  tasks = [make_task("long_sum", length=5), make_task("rg:chain_sum"), make_task("math")]
  return [(task, task.problems("train", 1, seed=0)[0]) for task in tasks]


# --- splits and determinism --------------------------------------------------------------------

SPLIT_TASKS = [
  ("long_sum", {"length": 6}),
  ("long_sum", {"length": 3, "ops": "+", "max_operand": 2}),  # only 8 distinct problems exist
  ("rg:gcd", {}),
  ("rg:leg_counting", {"min_animals": 1, "max_animals": 1}),  # a small problem space
  ("math", {}),
  ("long_fsm", {"length": 4, "states": 2, "symbols": 2}),  # 2 tables x 16 input lists
  ("long_recurrence", {"length": 3, "modulus": 3}),  # 9 start pairs x 3 lengths
]


@pytest.mark.parametrize("name,options", SPLIT_TASKS)
def test_train_and_heldout_never_share_a_problem(name, options):
  task = make_task(name, **options)
  train = {p.question for seed in (0, 1, 2) for p in task.problems("train", 150, seed)}
  heldout = {p.question for seed in (0, 1, 2) for p in task.problems("heldout", 150, seed)}
  assert train and heldout
  assert not train & heldout


@pytest.mark.parametrize(
  "name,options", [("long_sum", {"length": 8}), ("rg:chain_sum", {}), ("math", {})]
)
def test_problems_are_deterministic(name, options):
  first = make_task(name, **options).problems("train", 12, seed=7)
  again = make_task(name, **options).problems("train", 12, seed=7)
  assert first == again
  assert make_task(name, **options).problems("train", 5, seed=7) == first[:5]  # a prefix
  assert make_task(name, **options).problems("train", 12, seed=8) != first
  assert make_task(name, **options).problems("heldout", 12, seed=7) != first


def test_math_jsonl(tmp_path):
  lines = [
    json.dumps({"problem": f"What is {i} halves?", "answer": f"\\boxed{{\\frac{{{i}}}{{2}}}}"})
    for i in range(200)
  ]
  (tmp_path / "a.jsonl").write_text("\n".join(lines[:100]) + "\n\n")
  (tmp_path / "b.jsonl").write_text("\n".join(lines[100:] + lines[:3]))  # 3 duplicates
  task = make_task(f"math_jsonl:{tmp_path}/*.jsonl", heldout_fraction=0.2)
  train = task.problems("train", 400, seed=0)  # more than the split holds: reshuffled epochs
  heldout = task.problems("heldout", 40, seed=0)
  train_questions, heldout_questions = {p.question for p in train}, {p.question for p in heldout}
  assert not train_questions & heldout_questions
  assert len(train_questions) + len({p.question for p in task.problems("heldout", 400, 0)}) == 200
  assert 20 <= len(heldout_questions) <= 60
  problem = heldout[0]
  half = problem.answer
  assert re.fullmatch(r"\\frac\{\d+\}\{2\}", half)
  numerator = int(re.search(r"\d+", half).group())
  assert task.score(problem, boxed(str(numerator / 2))) == 1.0
  assert task.score(problem, boxed(str(numerator / 2 + 1))) == 0.0


def test_unknown_task_and_bad_options_name_what_is_wrong():
  with pytest.raises(ValueError, match="long_sum"):
    make_task("long_summ")
  with pytest.raises(ValueError, match=re.escape(str(TASK_NAMES[0]))):
    make_task("nope")
  with pytest.raises(ValueError, match="chain_sum"):
    make_task("rg:chain_summ")
  with pytest.raises(ValueError, match="min_terms"):
    make_task("rg:chain_sum", min_term=2)
  with pytest.raises(ValueError, match="ops"):
    make_task("long_sum", ops="+/")
  with pytest.raises(ValueError, match="length"):
    make_task("long_sum", length=0)
  with pytest.raises(ValueError, match="lenght"):
    make_task("long_sum", lenght=3)
  with pytest.raises(ValueError, match="split"):
    make_task("long_sum").problems("test", 1, seed=0)


# --- the long-trace family --------------------------------------------------------------------


def replay_sum(question: str) -> tuple[str, list[str], list[int]]:
  """Independent re-implementation of long_sum from its question text: (answer, lines, states)."""
  modulus = int(re.search(r"modulo (\d+)", question).group(1))
  steps = re.findall(r"(\d+):([-+*])(\d+)", question.split("Steps:")[1])
  value, lines, states = 0, [], []
  for index, (step, op, operand) in enumerate(steps, 1):
    assert int(step) == index
    value = {"+": value + int(operand), "-": value - int(operand), "*": value * int(operand)}[op]
    value %= modulus
    lines.append(f"{index}:{op}{operand}={value}")
    states.append(value)
  return str(value), lines, states


def replay_fsm(question: str) -> tuple[str, list[str], list[str]]:
  """Independent re-implementation of long_fsm from its question text: (answer, lines, states)."""
  table = dict(re.findall(r"([A-Z]\d)>([A-Z])", question.split("Inputs:")[0]))
  inputs = re.findall(r"(\d+):(\d)", question.split("Inputs:")[1])
  state, lines, states = "A", [], []
  for index, (step, symbol) in enumerate(inputs, 1):
    assert int(step) == index
    following = table[state + symbol]
    lines.append(f"{index}:{state}{symbol}>{following}")
    state = following
    states.append(state)
  return state, lines, states


def replay_recurrence(question: str) -> tuple[str, list[str], list[int]]:
  """Independent re-implementation of long_recurrence from its question text."""
  a, b, p, q, modulus, steps = map(
    int,
    re.search(
      r"\((\d+),(\d+)\).*\(b,(\d+)a\+(\d+)b mod (\d+)\)\. After (\d+) steps", question
    ).groups(),
  )
  lines, states = [], []
  for index in range(1, steps + 1):
    a, b = b, (p * a + q * b) % modulus
    lines.append(f"{index}:{a},{b}")
    states.append(f"{a},{b}")
  return str(b), lines, states


# (task, options, replay, a regex that reads (step, state) from one trace line, K). K is stated
# here, not read from the task: twice the longest line, "150:+9=9\n", "150:A0>B\n" and
# "150:99,99\n".
LONG_CASES = [
  (
    "long_sum",
    {"length": 150, "ops": "+-*", "modulus": 10},
    replay_sum,
    r"(\d+):[-+*]\d+=(\d+)",
    18,
  ),
  (
    "long_fsm",
    {"length": 150, "states": 6, "symbols": 3},
    replay_fsm,
    r"(\d+):[A-Z]\d>([A-Z])",
    18,
  ),
  (
    "long_recurrence",
    {"length": 150, "modulus": 100, "max_coefficient": 5},
    replay_recurrence,
    r"(\d+):(\d+,\d+)",
    20,
  ),
]


@pytest.mark.parametrize("name,options,replay,line_regex,k", LONG_CASES)
def test_long_trace_replays_to_its_answer(name, options, replay, line_regex, k):
  task = make_task(name, **options)
  assert task.markov_window_chars() == k
  for problem in task.problems("train", 3, seed=0) + task.problems("heldout", 3, seed=0):
    answer, lines, _ = replay(problem.question)
    assert len(lines) == 150
    assert problem.answer == answer
    assert problem.solution.split("\n") == lines
    assert task.score(problem, task.sft_completion(problem)) == 1.0


def last_state_in(window: str, at_trace_start: bool, line_regex: str) -> tuple[int, str] | None:
  """(step, state) of the last complete line visible in `window`, parsed independently."""
  lines = ("\n" + window if at_trace_start else window).split("\n")
  complete = lines[1:-1]  # lines[0] may be cut on the left, lines[-1] is unfinished
  if not complete:
    return None
  match = re.fullmatch(line_regex, complete[-1])
  return int(match.group(1)), match.group(2)


@pytest.mark.parametrize("name,options,replay,line_regex,k", LONG_CASES)
def test_long_trace_state_is_in_the_last_k_characters(name, options, replay, line_regex, k):
  """The Markov property: every prefix's current state is in its last K characters."""
  problem = make_task(name, **options).problems("train", 1, seed=1)[0]
  _, _, states = replay(problem.question)
  trace = problem.solution + "\n"  # in a completion the last line is followed by "\n</think>"
  for cut in range(len(trace) + 1):
    done = trace[:cut].count("\n")  # steps whose line is complete
    window = trace[max(0, cut - k) : cut]
    expected = (done, str(states[done - 1])) if done else None
    assert last_state_in(window, cut <= k, line_regex) == expected, cut
  # K is tight: with one character less some prefix shows no complete line.
  assert any(
    last_state_in(trace[cut - k + 1 : cut], False, line_regex) is None
    for cut in range(k, len(trace))
  )


def test_long_trace_length_knob():
  chunk = 256
  length = length_for_solution_chars(4 * chunk, ops="+-*")
  task = make_task("long_sum", length=length, ops="+-*")
  low, high = task.solution_chars_range()
  assert low >= 4 * chunk
  assert make_task("long_sum", length=length - 1, ops="+-*").solution_chars_range()[0] < 4 * chunk
  fsm_length = length_for_solution_chars(4 * chunk, "long_fsm", states=5)
  assert make_task("long_fsm", length=fsm_length).solution_chars_range()[0] >= 4 * chunk
  varied = make_task("long_sum", length=60, min_length=20, modulus=97, max_operand=50)
  v_low, v_high = varied.solution_chars_range()
  sizes = [len(p.solution) for p in varied.problems("train", 40, seed=0)]
  assert v_low <= min(sizes) and max(sizes) <= v_high
  assert len({len(p.metadata["steps"]) for p in varied.problems("train", 40, seed=0)}) > 5
  for p in task.problems("train", 3, seed=0):
    assert low <= len(p.solution) <= high
    assert len(p.solution.encode("utf-8")) == len(p.solution)  # ASCII: one byte token per char


def test_long_trace_difficulty_knobs():
  sums = make_task("long_sum", length=50).problems("train", 5, seed=0)
  mixed = make_task("long_sum", length=50, ops="+-*").problems("train", 5, seed=0)
  assert all(op == "+" for p in sums for op, _ in p.metadata["steps"])
  assert {op for p in mixed for op, _ in p.metadata["steps"]} == {"+", "-", "*"}
  big = make_task("long_fsm", length=200, states=12, symbols=5).problems("train", 3, seed=0)
  assert {state for p in big for state in re.findall(r">([A-Z])", p.solution)} == set(
    "ABCDEFGHIJKL"
  )
  assert {
    int(k) for p in big for k in re.findall(r"\d+:(\d)\b", p.question.split("Inputs:")[1])
  } == set(range(5))


# --- the Delethink window reward ---------------------------------------------------------------


def test_reward_on_the_last_window_with_byte_tokens():
  from train.tokenizer import ByteTokenizer

  tokenizer = ByteTokenizer()
  task = make_task("long_sum", length=120)
  problem = task.problems("train", 1, seed=0)[0]
  prompt_opening = "<think>\n"
  generated = tokenizer.encode(task.sft_completion(problem)[len(prompt_opening) :])
  chunk, carry = 128, 64
  assert len(generated) > 4 * chunk
  # Delethink chunks: chunk 1 has C tokens, later ones C - m; the last window is carry + last output.
  boundaries = [chunk]
  while boundaries[-1] < len(generated):
    boundaries.append(boundaries[-1] + chunk - carry)
  last_start = boundaries[-2]
  window = generated[last_start - carry :]
  assert reward_on_window(task, problem, tokenizer.decode(window)) == 1.0
  cut = generated[: len(generated) - 20]  # the trace stopped before its answer was complete
  assert reward_on_window(task, problem, tokenizer.decode(cut[-carry:])) == 0.0
  # A </think> that scrolled out of the window no longer counts.
  tail = tokenizer.decode(generated)[-12:]
  assert "</think>" not in tail and "\\boxed{" in tail
  assert reward_on_window(task, problem, tail) == 0.0
  assert reward_on_window(task, problem, tail, require_think=False) == 1.0


# --- chat templates ----------------------------------------------------------------------------

QWEN2_TEMPLATE = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
  "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# In the style of DeepSeek-R1-Distill: bos_token, a namespace, thinking stripped from history,
# whitespace control, and a generation prompt that opens the thinking block.
R1_STYLE_TEMPLATE = """{% set ns = namespace(system_prompt='') %}
{%- for message in messages %}
  {%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{% endif %}
{%- endfor %}
{{ bos_token }}{{ ns.system_prompt }}
{%- for message in messages %}
  {%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}
  {%- elif message['role'] == 'assistant' %}
    {% set content = message['content'] %}
    {% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}
    {{- '<｜Assistant｜>' + content + eos_token }}
  {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"""

CONVERSATIONS = [
  [{"role": "user", "content": "What is 2+2?"}],
  [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi {{ there }} ünïcode"},
  ],
  [
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "<think>\nhm\n</think>\nb"},
    {"role": "user", "content": "c\n"},
  ],
]


def write_tokenizer_dir(path, template: str, special: dict, as_jinja_file: bool):
  """A tiny Hugging Face tokenizer directory (word-level vocabulary, no download)."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"[UNK]": 0, "hello": 1}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokens = [v["content"] if isinstance(v, dict) else v for v in special.values()]
  tokenizer.add_special_tokens(tokens)
  tokenizer.save(str(path / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
  if as_jinja_file:
    (path / "chat_template.jinja").write_text(template)
  else:
    config["chat_template"] = template
  (path / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
  "template,special,as_jinja_file",
  [
    (QWEN2_TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, False),
    (
      R1_STYLE_TEMPLATE,
      {
        "bos_token": {  # the serialized AddedToken form of older tokenizer configs
          "__type": "AddedToken",
          "content": "<｜begin▁of▁sentence｜>",
          "lstrip": False,
          "normalized": True,
          "rstrip": False,
          "single_word": False,
          "special": True,
        },
        "eos_token": "<｜end▁of▁sentence｜>",
      },
      False,
    ),
    (R1_STYLE_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}, True),
  ],
)
def test_chat_template_matches_transformers(tmp_path, template, special, as_jinja_file):
  pytest.importorskip("transformers")
  from transformers import PreTrainedTokenizerFast

  write_tokenizer_dir(tmp_path, template, special, as_jinja_file)
  reference = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  ours = ChatTemplate.from_tokenizer_dir(str(tmp_path))
  for messages in CONVERSATIONS:
    for add_generation_prompt in (True, False):
      expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
      )
      got = ours.render_messages(messages, add_generation_prompt=add_generation_prompt)
      assert got == expected
  question = CONVERSATIONS[0][0]["content"]
  assert ours.render(question) == reference.apply_chat_template(
    CONVERSATIONS[0], tokenize=False, add_generation_prompt=True
  )


def test_plain_template_and_sft_target():
  plain = ChatTemplate.plain()
  assert plain.render("What is 2+2?") == "User: What is 2+2?\nAssistant: <think>\n"
  task = make_task("long_sum", length=3)
  problem = task.problems("train", 1, seed=0)[0]
  prompt, target = plain.sft_target(problem.question, task.sft_completion(problem))
  assert prompt + target == prompt[: -len("<think>\n")] + task.sft_completion(problem)
  assert target.startswith(problem.solution)
  assert task.score(problem, target) == 1.0  # what the model generates after the prompt
  no_think = ChatTemplate("{{ messages[0]['content'] }}|")
  assert no_think.sft_target("q", "<think>\nx") == ("q|", "<think>\nx")


def test_problem_is_frozen_and_hashable():
  problem = Problem(question="q", answer="1", solution=None, metadata={"a": [1]})
  with pytest.raises(AttributeError):
    problem.answer = "2"
  assert hash(problem) == hash(Problem("q", "1", None, {"b": 2}))
  assert np.isfinite(make_task("long_sum", length=2).score(problem, "</think>\\boxed{1}"))
