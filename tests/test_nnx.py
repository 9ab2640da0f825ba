"""The Flax NNX example (notebooks/nnx_training.py) trains, through both faces.

The example's model has BatchNorm and Dropout in its trunk; optax_mtl.nnx
itself is tested in test_nnx_module.py.
"""

import functools
import importlib.util
import pathlib

from flax import nnx
import jax
import numpy as np
import optax
import pytest

from tests import strategies

_SCRIPT = pathlib.Path(__file__).parents[1] / "notebooks" / "nnx_training.py"
_spec = importlib.util.spec_from_file_location("nnx_training", _SCRIPT)
nnx_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nnx_training)

NUM_STEPS = 40
# Several strategies of each kind (equal and normalized_gradients run in
# test_both_faces_follow_the_same_trajectory).
STRATEGIES = ("loss_ema", "uncertainty", "mgda", "upgrad")


def _factory(name):
  return functools.partial(strategies.build, name, nnx_training.NUM_TASKS)


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
def test_training_step_face(name):
  history, model = nnx_training.train_step_face(_factory(name)(), NUM_STEPS)
  _check_learns(history, name)
  # The step updated the BatchNorm statistics and the Dropout RNG count.
  assert not np.allclose(model.trunk.layers[1].mean[...], 0.0)
  assert int(model.trunk.layers[3].rngs.count[...]) == NUM_STEPS


@pytest.mark.parametrize("name", ["upgrad", "imtl_g"])
def test_training_step_face_with_features(name):
  history, _ = nnx_training.train_step_face(_factory(name)(), NUM_STEPS,
                                            use_features=True)
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
  monkeypatch.setattr("sys.argv", ["nnx_training.py", "--strategy", "upgrad",
                                   "--steps", "3", "--features"])
  nnx_training.main()
  output = capsys.readouterr().out
  assert "upgrad, optax face" in output
  assert "training-step face (encoder_fn)" in output
  assert "held-out" in output


def test_checkpoint_recipe_resumes(tmp_path):
  """save_checkpoint / restore_checkpoint carry the whole training state."""
  strategy = _factory("upgrad")()
  training_step = nnx_training.make_training_step(strategy)
  inputs, targets = nnx_training.make_data()

  def fresh(seed):
    model = nnx_training.make_model(seed)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    return model, optimizer, strategy.init(nnx.state(model, nnx.Param))

  model, optimizer, strategy_state = fresh(0)
  for _ in range(2):
    _, strategy_state, _ = training_step(model, optimizer, strategy_state,
                                         inputs, targets)
  nnx_training.save_checkpoint(tmp_path / "ckpt", model, optimizer,
                               strategy_state)
  restored_model, restored_optimizer, template = fresh(5)
  restored_state = nnx_training.restore_checkpoint(
      tmp_path / "ckpt", restored_model, restored_optimizer, template)
  continued = training_step(model, optimizer, strategy_state, inputs, targets)
  resumed = training_step(restored_model, restored_optimizer, restored_state,
                          inputs, targets)
  for expected, actual in zip(jax.tree.leaves(continued),
                              jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(actual, expected)
  for expected, actual in zip(
      jax.tree.leaves(nnx.state(model, nnx.Not(nnx.RngKey))),
      jax.tree.leaves(nnx.state(restored_model, nnx.Not(nnx.RngKey)))):
    np.testing.assert_array_equal(actual, expected)


def test_evaluate_uses_running_statistics_and_keeps_the_model():
  model = nnx_training.make_model()
  inputs, targets = nnx_training.make_data(held_out=True)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.RngKey)))
  first = nnx_training.evaluate(model, inputs, targets)
  np.testing.assert_array_equal(first,
                                nnx_training.evaluate(model, inputs, targets))
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.RngKey)))
  for expected, actual in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(actual, expected)
  # In training mode BatchNorm normalises by the batch, Dropout drops units.
  assert not np.allclose(first, nnx_training.task_losses(model, inputs,
                                                         targets))
