"""Test configuration: the ``slow`` tier, a compilation cache, and the
release of compiled programs.

``make test`` (the README's test command, and CI) leaves out the tests
marked ``slow``: the checks of every strategy and every engine mode on 8
simulated devices, the notebooks (the quickstart is also executed by the
documentation build), the paper configurations end to end, the conv-trunk
speed run, and the sweeps of every strategy through Orbax checkpoints,
mixed precision and the NNX module face. ``make test-all`` runs them too::

  make test       # pytest -n 2 --dist loadfile -m "not slow" optax_mtl tests
  make test-all   # pytest -n 2 --dist loadfile optax_mtl tests

Most of the suite's time is XLA compiling small programs, and the test
processes compile many of the same ones (every module that runs over all
strategies, on either xdist worker): they share JAX's persistent
compilation cache in ``.pytest_cache/xla`` (or ``JAX_COMPILATION_CACHE_DIR``
when set). The cache is keyed by the program, the compiler's version and
options, so it changes no result.

Every program XLA compiles for the CPU holds a few memory mappings until
it is freed, and a test process compiles thousands of them: past Linux's
``vm.max_map_count`` (65530 by default) the next compilation crashes the
process (a segmentation fault or an abort inside ``backend_compile``), and
pytest-xdist then waits forever for the lost worker. After each module, a
process that holds more than :data:`MAX_MAPPINGS` mappings drops JAX's
in-memory caches, which frees the programs.
"""

import gc
import os
import pathlib

import jax
import pytest

# Whole modules in the slow tier; single tests carry @pytest.mark.slow.
SLOW_MODULES = frozenset({
    "test_sharding_modes.py",
    "test_notebooks.py",
    # Sweeps of every strategy through Orbax, bf16/float16 and the NNX
    # module face (test_nnx.py keeps the NNX face in the default tier).
    "test_checkpoint.py",
    "test_mixed_precision.py",
    "test_nnx_module.py",
})

# A third of the default vm.max_map_count. A program holds about 3 mappings
# (300 compilations added 966), so the rest leaves room for a module that
# compiles 10 000 programs.
MAX_MAPPINGS = 20_000


def pytest_configure(config):
  """Points JAX's persistent compilation cache at .pytest_cache/xla."""
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    cache = pathlib.Path(config.rootpath, ".pytest_cache", "xla")
    jax.config.update("jax_compilation_cache_dir", str(cache))
  # Every program, however fast to compile: most take well under a second.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if pathlib.Path(str(item.fspath)).name in SLOW_MODULES:
      item.add_marker(pytest.mark.slow)


def memory_mappings() -> int:
  """The number of memory mappings of this process (0 where not Linux)."""
  try:
    with open("/proc/self/maps", "rb") as maps:
      return sum(1 for _ in maps)
  except OSError:
    return 0


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
  """Drops JAX's compilation caches after a module when mappings pile up."""
  yield
  if memory_mappings() > MAX_MAPPINGS:
    jax.clear_caches()
    gc.collect()
