"""Tests of optax_mtl.dualproj (Quinton & Rey 2024)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl

# A scripted sequence of small Jacobians [T=3, 4] (see tests/test_upgrad.py).
JACOBIANS = np.array([
    [[1.0, 0.0, 0.5, 0.0], [-0.5, 1.0, 0.0, 0.2], [0.3, -0.4, 1.0, 0.0]],
    [[2.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [1.2, 1.6, 0.5, 0.0]],
    [[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 2.0], [-1.0, 0.5, 0.0, 1.0]],
    [[100.0, 0.0, 5.0, 0.0], [0.0, 0.01, 0.0, 0.02], [-3.0, -2.0, 1.0, 0.0]],
    [[1.0, 2.0, 0.0, 0.0], [-1.0, -2.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]],
])


def numpy_dualproj(jacobian):
  """argmin_{Jy >= 0} ‖y - ḡ‖ with ḡ the mean gradient (active subsets)."""
  mean = jacobian.mean(axis=0)
  best, best_distance = None, np.inf
  for size in range(len(jacobian) + 1):
    for active in itertools.combinations(range(len(jacobian)), size):
      rows = jacobian[list(active)]
      point = mean - (np.linalg.pinv(rows) @ (rows @ mean) if size else 0)
      if np.all(jacobian @ point >= -1e-10):
        distance = np.linalg.norm(point - mean)
        if distance < best_distance - 1e-14:
          best, best_distance = point, distance
  return best


def test_golden_values_over_a_scripted_sequence():
  strategy = optax_mtl.dualproj(num_tasks=3)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for jacobian in JACOBIANS:
    combined, state = update(jnp.asarray(jacobian, jnp.float32), state,
                             task_losses=jnp.ones(3))
    expected = numpy_dualproj(jacobian)
    scale = np.max(np.linalg.norm(jacobian, axis=1))
    np.testing.assert_allclose(combined, expected, atol=1e-5 * scale,
                               rtol=1e-4)
    np.testing.assert_allclose(np.asarray(state.weights) @ jacobian, expected,
                               atol=1e-5 * scale, rtol=1e-4)
    assert bool(state.solver_converged)


def test_non_conflicting_and_mean_when_no_conflict():
  strategy = optax_mtl.dualproj(num_tasks=6)
  update = jax.jit(strategy.update)
  rng = np.random.default_rng(0)
  for width in (3, 10):
    for _ in range(4):
      jacobian = rng.normal(size=(6, width)).astype(np.float32)
      combined, state = update(jnp.asarray(jacobian), strategy.init(None),
                               task_losses=jnp.ones(6))
      scale = np.max(np.sum(jacobian**2, axis=1))
      assert np.all(jacobian @ np.asarray(combined) >= -1e-5 * scale)
      # The weights are >= 1/T (v >= u in the dual).
      assert np.all(np.asarray(state.weights) >= 1 / 6 - 1e-6)
  jacobian = np.abs(rng.normal(size=(6, 5))).astype(np.float32)
  combined, _ = update(jnp.asarray(jacobian), strategy.init(None),
                       task_losses=jnp.ones(6))
  np.testing.assert_allclose(combined, jacobian.mean(axis=0), rtol=1e-5)


def test_permutation_invariance_and_scaling():
  rng = np.random.default_rng(1)
  jacobian = rng.normal(size=(4, 3))
  strategy = optax_mtl.dualproj(num_tasks=4)
  update = jax.jit(strategy.update)

  def direction(matrix):
    return np.asarray(update(jnp.asarray(matrix, jnp.float32),
                             strategy.init(None), task_losses=jnp.ones(4))[0])

  order = rng.permutation(4)
  np.testing.assert_allclose(direction(jacobian[order]), direction(jacobian),
                             atol=1e-5)
  for factor in (1e-5, 1e5):  # d(κJ) = κ d(J).
    np.testing.assert_allclose(direction(factor * jacobian),
                               factor * direction(jacobian),
                               rtol=1e-4, atol=1e-6 * factor)


def test_both_faces_agree():
  jacobian = JACOBIANS[0].astype(np.float32)
  strategy = optax_mtl.dualproj(num_tasks=3)
  loss_fn = lambda params: jnp.ones(3) + jnp.asarray(jacobian) @ params
  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  params = jnp.zeros(4)
  (losses, grads), state = step(params, strategy.init(params))
  update, optax_state = jax.jit(strategy.update)(
      jnp.asarray(jacobian), strategy.init(params), task_losses=losses)
  np.testing.assert_allclose(grads, update, atol=1e-6)
  np.testing.assert_allclose(state.weights, optax_state.weights, atol=1e-6)
  np.testing.assert_allclose(grads, numpy_dualproj(JACOBIANS[0]), atol=1e-5)


def test_accepts_any_loss_sign_and_keeps_state_types():
  strategy = optax_mtl.dualproj(num_tasks=2)
  assert strategy.weighting.requires_positive_losses is False
  state = strategy.init(None)
  assert isinstance(state, optax_mtl.DualprojState)
  _, new_state = strategy.update(jnp.eye(2), state,
                                 task_losses=jnp.array([-1.0, 0.0]))
  assert int(new_state.num_skipped) == 0
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(
      lambda x: x.dtype, state)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_tasks": 0}, "num_tasks"),
    ({"num_tasks": 2, "max_iters": 0}, "max_iters"),
    ({"num_tasks": 2, "tol": -1.0}, "tol"),
    ({"num_tasks": 2, "update_weights_every": 0}, "update_weights_every"),
])
def test_hyperparameter_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optax_mtl.dualproj(**kwargs)
