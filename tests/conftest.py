"""Test set-up: 8 fake CPU devices, float32 matmuls at full precision, a compilation cache.

The persistent compilation cache (also handed to the subprocess tests through
JAX_COMPILATION_CACHE_DIR) only saves compile time: the same tiny programs recur
across tests and runs. Results never depend on it.
"""

import os
import tempfile

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
COMPILATION_CACHE_DIR = os.path.join(tempfile.gettempdir(), "adaptive-test-jax-cache")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
