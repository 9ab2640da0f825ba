"""Tests of optax_mtl.constant (torchjd's Constant): w fixed, d = Σ w_k g_k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
NAN, INF = harness.NAN, harness.INF
WEIGHTS = [0.5, -2.0, 3.0]  # A negative weight is allowed, as in torchjd.
# A NaN, a zero and an infinite loss; only the non-finite ones are rejected.
LOSSES = harness.REJECTED_IN_MIDDLE
GRADS = harness.scripted_grads(LOSSES)


def is_finite(losses):
  return bool(np.all(np.isfinite(losses)))


def reference_weights(losses, weights):
  """The same weights at every step, rejected or not."""
  return np.broadcast_to(np.asarray(weights, np.float64),
                         (len(losses), len(weights)))


def test_golden_values_optax_face():
  state = harness.check_optax_face(
      optax_mtl.constant(NUM_TASKS, WEIGHTS), LOSSES, GRADS,
      reference_weights(LOSSES, WEIGHTS))
  assert int(state.num_skipped) == sum(not is_finite(l) for l in LOSSES) == 2


def test_golden_values_value_and_grad_face():
  state = harness.check_value_and_grad_face(
      optax_mtl.constant(NUM_TASKS, WEIGHTS), LOSSES, GRADS[0],
      reference_weights(LOSSES, WEIGHTS), accepted=is_finite)
  assert int(state.num_skipped) == 2


def test_update_is_the_fixed_combination():
  task_grads = {"a": jnp.arange(6.0).reshape(3, 2),
                "b": jnp.ones((3, 1, 2))}
  update, state = jax.jit(optax_mtl.constant(NUM_TASKS, WEIGHTS).update)(
      task_grads, optax_mtl.constant(NUM_TASKS, WEIGHTS).init(None),
      task_losses=jnp.array([1.0, -1.0, 0.0]))
  weights = np.asarray(WEIGHTS, np.float32)
  np.testing.assert_allclose(update["a"],
                             weights @ np.arange(6.0).reshape(3, 2))
  np.testing.assert_allclose(update["b"], np.full((1, 2), weights.sum()))
  assert int(state.num_skipped) == 0
  assert state.weights.dtype == jnp.float32


def test_num_tasks_must_match_the_weights():
  strategy = optax_mtl.constant(np.int64(3), np.array([1, 2, 3]))
  assert optax_mtl.weighting_of(strategy).num_tasks == 3
  np.testing.assert_array_equal(strategy.init(None).weights, [1.0, 2.0, 3.0])
  with pytest.raises(ValueError,
                     match=r"weights must be 2 numbers, got shape \(3,\)"):
    optax_mtl.constant(2, [1.0, 2.0, 3.0])


def test_nan_loss_is_counted_but_weights_stay():
  strategy = optax_mtl.constant(2, [1.0, 2.0])
  _, state = strategy.update(jnp.eye(2), strategy.init(None),
                             task_losses=jnp.array([NAN, 1.0]))
  assert int(state.num_skipped) == 1
  np.testing.assert_array_equal(state.weights, [1.0, 2.0])


@pytest.mark.parametrize("weights, message", [
    ([], r"weights must be 1 numbers, got shape \(0,\)"),
    ([[1.0, 2.0]], r"weights must be 1 numbers, got shape \(1, 2\)"),
    (1.0, r"weights must be 1 numbers, got shape \(\)"),
    ([NAN], r"weights must be finite \(in float32\), got \[nan\]"),
    ([INF], r"weights must be finite .*inf"),
    ([1e39], r"weights must be finite \(in float32\), got \[1e\+39\]"),
    (["a"], r"weights must be .*dtype <U1"),
    ("ab", r"weights must be 1 numbers, got 'ab'"),
    (None, r"weights must be 1 numbers, got None"),
    (True, r"weights must be 1 numbers, got True"),
])
def test_weight_errors(weights, message):
  with pytest.raises(ValueError, match=message):
    optax_mtl.constant(1, weights)


@pytest.mark.parametrize("num_tasks", [0, None, 2.0, [1.0, 2.0]])
def test_num_tasks_errors(num_tasks):
  with pytest.raises(ValueError, match=r"num_tasks must be an integer >= 1"):
    optax_mtl.constant(num_tasks, [1.0, 2.0])


def test_weights_are_float64_under_x64():
  # Under x64 the weights are applied in float64, unrounded: 0.1 is not
  # float32's 0.1 (the losses were cast to float32 by the step).
  with jax.enable_x64(True):
    strategy = optax_mtl.constant(2, [0.1, 0.7])
    jacobian = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)))
    update, _ = strategy.update(jacobian, strategy.init(None),
                                task_losses=jnp.ones(2))
    assert update.dtype == jnp.float64
    np.testing.assert_allclose(update, np.array([0.1, 0.7]) @ np.asarray(
        jacobian), rtol=1e-15, atol=1e-16)
