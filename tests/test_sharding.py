"""Multi-device training equals single-device training, for every strategy.

The check runs in a subprocess (tests/sharding_check.py) because the number
of simulated CPU devices is fixed when JAX starts: the subprocess gets
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. One subprocess checks
every strategy, one compiled function per way of running it (the slow tier:
``make test-all``); ``make test`` checks four strategies under
``shard_map``'s type check.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import strategies

_SCRIPT = pathlib.Path(__file__).with_name("sharding_check.py")
_ROOT = pathlib.Path(__file__).parents[1]


def _run_check(output, *arguments):
  environment = dict(os.environ)
  environment["XLA_FLAGS"] = (environment.get("XLA_FLAGS", "") +
                              " --xla_force_host_platform_device_count=8")
  environment["JAX_PLATFORMS"] = "cpu"
  completed = subprocess.run(
      [sys.executable, str(_SCRIPT), str(output), *arguments], cwd=_ROOT,
      env=environment, capture_output=True, text=True, timeout=600,
      check=False)
  assert completed.returncode == 0, completed.stderr[-4000:]
  return json.loads(pathlib.Path(output).read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return _run_check(tmp_path_factory.mktemp("sharding") / "results.json")


@pytest.mark.slow
def test_every_strategy_was_checked(results):
  assert sorted(results) == sorted(strategies.NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", strategies.NAMES)
def test_jit_and_shard_map_match_single_device(results, name):
  """Losses, weights, gradients, params, strategy state; same on all devices."""
  assert results[name] == []


def test_shard_map_with_check_vma(tmp_path):
  """shard_map's default type check: the losses are typed device-varying."""
  names = ["equal", "loss_ema", "normalized_gradients", "mgda"]
  checked = _run_check(tmp_path / "vma.json", "--check-vma", *names)
  assert checked == {name: [] for name in names}
