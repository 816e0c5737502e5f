"""The notebooks in colabs/ run top to bottom and are stored without outputs.

Every `colabs/*.ipynb` is executed cell by cell with nbclient in a fresh IPython kernel on this
interpreter (a kernelspec written for the test, so the kernel is this environment's Python
whatever kernelspecs the machine has), with `ADAPTIVE_SMALL=1` (the notebooks' small sizes),
the repository first on PYTHONPATH, its working directory colabs/ (as a user opening the
notebook would have), and one CPU device: the fake 8 devices of conftest.py are not passed on.
A cell that raises fails the test with the notebook's name, the cell's index and source and the
error. Per-cell times are printed (`pytest -s` shows them).
"""

import json
import os
import pathlib
import re
import sys
import tempfile
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

REPO = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # one cell; a hung kernel fails instead of stalling the suite
KERNEL_NAME = "adaptive-notebook-test"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


def kernel_environment() -> dict:
  env = dict(os.environ)
  env["ADAPTIVE_SMALL"] = "1"
  env["JAX_PLATFORMS"] = "cpu"
  # conftest.py sets --xla_force_host_platform_device_count=8 for this process; a notebook
  # runs on one CPU device, like a CPU runtime. Other XLA flags pass through.
  flags = [
    flag
    for flag in env.get("XLA_FLAGS", "").split()
    if not flag.startswith("--xla_force_host_platform_device_count")
  ]
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  env["HF_HUB_OFFLINE"] = "1"
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


@pytest.fixture(scope="module")
def kernel_specs():
  """A kernelspec running ipykernel on this interpreter."""
  with tempfile.TemporaryDirectory() as root:
    spec_dir = os.path.join(root, KERNEL_NAME)
    os.makedirs(spec_dir)
    spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": f"Python ({sys.executable})",
      "language": "python",
    }
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
      json.dump(spec, f)
    yield KernelSpecManager(kernel_dirs=[root], ensure_native_kernel=False)


def test_colabs_has_notebooks():
  assert NOTEBOOKS, f"no notebooks found in {COLABS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, kernel_specs):
  nb = nbformat.read(path, as_version=4)
  km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_specs)
  client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False)
  seconds = []
  failure = None
  started = time.perf_counter()
  with client.setup_kernel(env=kernel_environment(), cwd=str(COLABS)):
    for index, cell in enumerate(nb.cells):
      if cell.cell_type != "code":
        continue
      cell_start = time.perf_counter()
      try:
        client.execute_cell(cell, index)
      except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        error = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
        failure = (
          f"{path.name}: code cell {index} failed with {error}\n"
          f"(ADAPTIVE_SMALL=1; the cell's source and traceback follow)\n{ANSI.sub('', str(e))}"
        )
        break
      seconds.append((index, time.perf_counter() - cell_start))
  if failure:  # outside the except block: the report is this message, not a chain
    pytest.fail(failure, pytrace=False)
  total = time.perf_counter() - started
  print(f"\n{path.name}: {total:.1f} s in all (kernel start included); per code cell:")
  print("  " + ", ".join(f"[{i}] {s:.1f}s" for i, s in seconds))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [
    index
    for index, cell in enumerate(nb.cells)
    if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
  ]
  assert not dirty, (
    f"{path.name}: code cells {dirty} have stored outputs or execution counts; clear them "
    f"(jupyter nbconvert --clear-output --inplace {path.relative_to(REPO)}, or Edit → Clear "
    f"all outputs) before committing"
  )
