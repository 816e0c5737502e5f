"""The README's first Python example runs as written (the public API as a user meets it)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_example_runs():
  example = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
  namespace: dict = {}
  exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
  out = namespace["out"]
  assert out.tokens_BN.shape == (2, 16)
  assert namespace["logits_BSV"].shape == (1, 6, 256)


def test_readme_self_speculative_example_runs():
  examples = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  (example,) = [e for e in examples if "SelfSpeculative" in e]
  namespace: dict = {}
  exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
  stats = namespace["out"].speculative
  assert 0.0 <= float(stats.acceptance_rate) <= 1.0
