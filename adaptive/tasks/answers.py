"""Answer extraction and the completion format, shared by every task.

The reward parser (as the Delethink reference does it):

1. Take the text after the FIRST `</think>`. Without one the completion scores 0 when thinking is
   required (the Delethink setting); otherwise the whole text is used.
2. In that text find every complete `\\boxed{...}` (optional spaces before `{`; braces nest; a
   backslash escapes the next character, so `\\{` and `\\}` do not count) and take the content of
   the one that starts last. An unclosed `\\boxed{` (a trace cut off mid-answer) is ignored.
3. The content, stripped of surrounding whitespace, goes to the task's checker.

The completion format written for SFT (and parsed back by the above):

    <think>\\n{solution}\\n</think>\\nThe answer is \\boxed{{answer}}.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
BOXED = "\\boxed"
ANSWER_TEMPLATE = "The answer is \\boxed{{{}}}."


def text_after_think(text: str, *, require_think: bool = True) -> str | None:
  """The text after the first `</think>`; None if there is none and thinking is required."""
  head, found, tail = text.partition(THINK_CLOSE)
  if found:
    return tail
  return None if require_think else head


def _closing_brace(text: str, open_index: int) -> int | None:
  """Index of the `}` matching the `{` at `open_index`, or None if it is never closed."""
  depth = 0
  index = open_index
  while index < len(text):
    char = text[index]
    if char == "\\":
      index += 2  # an escaped character (\{, \}, \\) never opens or closes a group
      continue
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return index
    index += 1
  return None


def last_boxed(text: str) -> str | None:
  """Content of the complete `\\boxed{...}` that starts last in `text` (stripped), or None."""
  start = text.rfind(BOXED)
  while start != -1:
    brace = start + len(BOXED)
    while brace < len(text) and text[brace] in " \t\n":
      brace += 1
    if brace < len(text) and text[brace] == "{":
      close = _closing_brace(text, brace)
      if close is not None:
        return text[brace + 1 : close].strip()
    start = text.rfind(BOXED, 0, start)
  return None


def extract_answer(text: str, *, require_think: bool = True) -> str | None:
  """The boxed answer of a completion (see module docstring), or None if it has none."""
  tail = text_after_think(text, require_think=require_think)
  if tail is None:
    return None
  return last_boxed(tail)


def format_completion(solution: str | None, answer: str) -> str:
  """The SFT target text: thinking block, then the boxed answer (see module docstring)."""
  thinking = solution or ""
  return f"{THINK_OPEN}\n{thinking}\n{THINK_CLOSE}\n{ANSWER_TEMPLATE.format(answer)}"
