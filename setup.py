"""adaptive: adaptive-compute transformers in JAX/Flax.

Install with

  pip install -e ".[test]"        # library + test tools
  pip install -e ".[test,hf]"     # + torch (CPU) and transformers for parity tests
"""

from setuptools import setup

setup(
  name="adaptive",
  version="0.1.0",
  description="Adaptive-compute transformers in JAX/Flax: routing, early exit, "
  "Markovian reasoning, Pallas kernels, sharded training.",
  python_requires=">=3.11",
  packages=[
    "adaptive",
    "adaptive.envs",
    "adaptive.tasks",
    "models",
    "kernels",
    "train",
    "configs",
    "benchmarks",
  ],
  install_requires=[
    # JAX 0.10.x runs on Python 3.11, 0.11.x on 3.12; both are supported. flax 0.12.8 does not
    # import on JAX 0.11.2 (jax.experimental.hijax has no HiPrimitive); 0.12.10 does (H200 run).
    "jax>=0.10,<0.12",
    "flax>=0.12.8,<0.14; python_version < '3.12'",
    "flax>=0.12.10,<0.14; python_version >= '3.12'",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.12",
    "tensorflow-datasets>=4.9.9",
    "ml-collections>=1.0",
    "reasoning-gym>=0.1.23",
    "math-verify>=0.8",
    # chat templates are rendered by jinja2 itself (no transformers at run time); 3.1.6 closes
    # sandbox escapes, and Hub templates are untrusted code.
    "jinja2>=3.1.6",
    "tensorboardX>=2.6",
    "tokenizers>=0.21",
    "safetensors>=0.5",
    "numpy>=1.26",
    "tqdm>=4.66",
  ],
  extras_require={
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.6",
      "hypothesis>=6.100",
      # ruff is pinned: formatting may change between releases, and CI checks it.
      "ruff==0.17.6",
      # tests/test_notebooks.py executes colabs/*.ipynb in an IPython kernel; the notebooks
      # plot with matplotlib and look inside models with treescope.
      "nbclient>=0.10",
      "nbformat>=5.10",
      "ipykernel>=6.29",
      "matplotlib>=3.8",
      "treescope>=0.1.7",
    ],
    # torch is pinned to the CPU build: an unpinned torch pulls GBs of CUDA wheels.
    "hf": ["torch==2.13.0", "transformers>=4.56,<6"],
  },
)
