"""Chat templates: the prompt text a model continues, up to where it starts thinking.

`ChatTemplate.plain()` is a short readable default for the byte tokenizer; `from_tokenizer_dir`
renders a Hugging Face tokenizer directory's own jinja `chat_template` exactly as transformers'
`apply_chat_template(..., tokenize=False, add_generation_prompt=True)` does (same jinja settings,
globals and special-token variables), with jinja2 alone: no transformers at run time. Templates
from the Hub are untrusted code, so they run in jinja2's immutable sandbox, as in transformers.

Rendered text may contain special tokens as text (e.g. `<｜begin▁of▁sentence｜>`); a Hugging Face
tokenizer maps them to their ids when encoding.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence

from adaptive.tasks.answers import THINK_OPEN

# {{ '\n' }} keeps the newlines explicit: trim_blocks would eat a literal newline after a tag.
PLAIN_TEMPLATE = (
  "{% for message in messages %}"
  "{{ message['role'] | capitalize }}: {{ message['content'] }}{{ '\\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ 'Assistant: <think>\\n' }}{% endif %}"
)

# The special-token variables transformers passes to every template (its special_tokens_map).
SPECIAL_TOKEN_NAMES = (
  "bos_token",
  "eos_token",
  "unk_token",
  "sep_token",
  "pad_token",
  "cls_token",
  "mask_token",
)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A jinja chat template and the special-token strings it may use."""

  source: str
  special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)

  @classmethod
  def plain(cls) -> ChatTemplate:
    """`User: {question}\\nAssistant: <think>\\n`: for the byte tokenizer."""
    return cls(PLAIN_TEMPLATE)

  @classmethod
  def from_tokenizer_dir(cls, path: str) -> ChatTemplate:
    """The chat template of a Hugging Face tokenizer directory.

    Like transformers: `chat_template.jinja` if present, else `chat_template` of
    `tokenizer_config.json` (a string, or a list of named templates: the one named "default");
    special tokens from `tokenizer_config.json`, then `special_tokens_map.json` for the rest.
    """
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
      with open(jinja_path, encoding="utf-8") as f:
        source = f.read()
    else:
      source = _default_template(config.get("chat_template"), path)
    special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
      content = _token_content(config.get(name))
      if content is None:
        content = _token_content(special_map.get(name))
      if content is not None:
        special[name] = content
    return cls(source, special)

  def render_messages(
    self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
  ) -> str:
    """The template applied to `messages` ([{"role": ..., "content": ...}, ...])."""
    plain_messages = [{str(k): v for k, v in dict(m).items()} for m in messages]
    return _compile(self.source).render(
      messages=plain_messages,
      add_generation_prompt=add_generation_prompt,
      **dict(self.special_tokens),
    )

  def render(self, question: str) -> str:
    """The prompt for one user question, up to where the assistant's reply (thinking) starts."""
    return self.render_messages([{"role": "user", "content": question}])

  def sft_target(self, question: str, completion: str) -> tuple[str, str]:
    """(prompt, target) for SFT on `completion` (e.g. `Task.sft_completion`).

    When the prompt already opens the thinking block (ends with `<think>` or `<think>\\n`, as
    `plain()` and R1-style templates do), the target drops that opening from the completion, so
    prompt + target reads `<think>` once.
    """
    prompt = self.render(question)
    for opening in (THINK_OPEN + "\n", THINK_OPEN):
      if prompt.endswith(opening) and completion.startswith(opening):
        return prompt, completion[len(opening) :]
    return prompt, completion


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  return value if isinstance(value, dict) else {}


def _token_content(entry) -> str | None:
  if isinstance(entry, str):
    return entry
  if isinstance(entry, dict) and isinstance(entry.get("content"), str):
    return entry["content"]
  return None


def _default_template(template, path: str) -> str:
  if isinstance(template, str):
    return template
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(named.get("default"), str):
      return named["default"]
  raise ValueError(
    f"tokenizer directory {path!r}: no chat template (neither chat_template.jinja nor a "
    "'chat_template' in tokenizer_config.json with a 'default' entry)"
  )


@functools.lru_cache(maxsize=16)
def _compile(source: str):
  """The jinja environment of transformers' `_compile_jinja_template`, minus its tracking."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class GenerationBlock(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  def strftime_now(format):
    return datetime.datetime.now().strftime(format)

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)
