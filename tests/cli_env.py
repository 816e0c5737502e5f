"""Environment for the tests that run `train.main` in subprocesses on fake CPU devices."""

import os
import subprocess
import tempfile


def environment(devices: int) -> dict:
  """This process's environment with `devices` fake CPU devices, the shared compile cache,
  and no inherited coordinator (each subprocess decides multi-process from its own flags)."""
  env = dict(os.environ)
  env.update(
    {
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      "JAX_PLATFORMS": "cpu",
      "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "adaptive-test-jax-cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
  )
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
  """(exit code, combined output) of a CLI subprocess; killed if it runs past `timeout` seconds."""
  try:
    out = proc.communicate(timeout=timeout)[0]
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return proc.returncode, out
