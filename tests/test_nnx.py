"""The Flax NNX example (notebooks/nnx_training.py) trains, through both faces."""

import importlib.util
import pathlib

import numpy as np
import pytest

from tests import strategy_cases

_SCRIPT = pathlib.Path(__file__).parents[1] / "notebooks" / "nnx_training.py"
_spec = importlib.util.spec_from_file_location("nnx_training", _SCRIPT)
nnx_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nnx_training)

NUM_STEPS = 40
# Several strategies of each kind (equal and normalized_gradients run in
# test_both_faces_follow_the_same_trajectory); those not merged yet are left
# out.
PREFERRED = ("ema", "uncertainty", "mgda", "upgrad")
STRATEGIES = [name for name in PREFERRED if name in strategy_cases.names()]


def _factory(name):
  return strategy_cases.factory_of(name, nnx_training.NUM_TASKS)


def _check_learns(history, name):
  losses = history["losses"]
  assert losses.shape == (NUM_STEPS, nnx_training.NUM_TASKS)
  assert np.all(np.isfinite(losses)), name
  first, last = losses[0], losses[-5:].mean(axis=0)
  # Every task improves, and the tasks improve a lot on average.
  assert np.all(last < first), (name, first, last)
  assert np.mean(last / first) < 0.5, (name, first, last)
  weights = np.stack([history[f"mtl/weights/{k}"]
                      for k in range(nnx_training.NUM_TASKS)], axis=1)
  assert np.all(np.isfinite(weights)), name
  assert history["mtl/num_skipped"][-1] == 0, name


@pytest.mark.parametrize("name", STRATEGIES)
def test_optax_face_with_nnx_optimizer(name):
  history, _ = nnx_training.train_optax_face(_factory(name)(), NUM_STEPS)
  _check_learns(history, name)


@pytest.mark.parametrize("name", STRATEGIES)
def test_training_step_face_with_split_model(name):
  history, _ = nnx_training.train_step_face(_factory(name)(), NUM_STEPS)
  _check_learns(history, name)


@pytest.mark.parametrize("name", ["equal", "normalized_gradients"])
def test_both_faces_follow_the_same_trajectory(name):
  optax_history, optax_model = nnx_training.train_optax_face(
      _factory(name)(), NUM_STEPS)
  step_history, step_model = nnx_training.train_step_face(
      _factory(name)(), NUM_STEPS)
  _check_learns(optax_history, name)
  np.testing.assert_allclose(optax_history["losses"], step_history["losses"],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(optax_model.trunk.layers[0].kernel[...]),
      np.asarray(step_model.trunk.layers[0].kernel[...]), rtol=1e-4,
      atol=1e-6)


def test_script_main_runs(monkeypatch, capsys):
  monkeypatch.setattr("sys.argv", ["nnx_training.py", "--strategy", "equal",
                                   "--steps", "3"])
  nnx_training.main()
  output = capsys.readouterr().out
  assert "equal, optax face" in output and "training-step face" in output
