"""Test configuration: the ``slow`` marker.

The ecosystem tests (sharding on 8 simulated devices, the notebooks, the
benchmark suite) take most of a minute each. They are marked ``slow`` here,
by module, so that the inner loop can leave them out::

  make test-fast   # pytest -n 2 --dist loadfile -m "not slow" optax_mtl tests

``make test`` (and CI) runs everything.
"""

import pathlib

import pytest

SLOW_MODULES = frozenset({
    "test_sharding.py",
    "test_sharding_modes.py",
    "test_notebooks.py",
    "test_benchmarks.py",
})


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if pathlib.Path(str(item.fspath)).name in SLOW_MODULES:
      item.add_marker(pytest.mark.slow)
