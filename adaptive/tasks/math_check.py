"""Math answers checked with math-verify: equal as mathematical objects, not as strings.

Both answers are parsed as the content of a `\\boxed{}` (LaTeX first, then plain expressions), so
`\\frac{1}{2}`, `1/2` and `0.5` agree. math-verify bounds each parse and comparison with a
SIGALRM timer, which only works in the main thread; elsewhere the timer is off and answers longer
than `MAX_ANSWER_CHARS` are refused instead (sympy can take unbounded time on huge expressions).
"""

from __future__ import annotations

import functools
import logging
import threading

MAX_ANSWER_CHARS = 1000
TIMEOUT_SECONDS = 5


@functools.cache
def _math_verify():
  import math_verify  # slow import: only when a math answer is checked
  import math_verify.errors

  # math-verify logs a warning per unparsable answer; garbage answers are expected here.
  for name in ("math_verify", "math_verify.parser", "math_verify.grader"):
    logging.getLogger(name).setLevel(logging.ERROR)
  return math_verify


def _timeout() -> int | None:
  return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def strip_dollars(answer: str) -> str:
  """`$x$` (how some datasets write reference answers) -> `x`."""
  answer = answer.strip()
  if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
    answer = answer.strip("$").strip()
  return answer


def parse_math(answer: str) -> list:
  """math-verify's parse of `\\boxed{answer}` (empty list when nothing parses)."""
  mv = _math_verify()
  config = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
  return mv.parse(
    f"\\boxed{{{strip_dollars(answer)}}}", extraction_config=config, parsing_timeout=_timeout()
  )


def math_equal(reference: str, answer: str) -> bool:
  """Whether `answer` equals `reference` as math (see module docstring); False on any failure."""
  if not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
    return False
  mv = _math_verify()
  try:
    gold, predicted = parse_math(reference), parse_math(answer)
    if not gold or not predicted:
      return False
    return bool(mv.verify(gold, predicted, timeout_seconds=_timeout()))
  except Exception:
    return False
  except mv.errors.TimeoutException:  # a BaseException in math-verify
    return False
