"""Every engine mode under jit with a batch sharded over explicit mesh axes."""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_every_engine_mode_under_an_explicit_mesh():
  script = pathlib.Path(__file__).with_name("sharding_modes_check.py")
  env = dict(os.environ, PYTHONPATH=str(script.parent.parent))
  result = subprocess.run([sys.executable, str(script)], capture_output=True,
                          text=True, env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().startswith("OK 32"), result.stdout
