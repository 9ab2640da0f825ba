"""Tests of optax_mtl.dualproj (Quinton & Rey 2024)."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import gramian_harness

# A scripted sequence of small Jacobians [T=3, 4]: see gramian_harness.
JACOBIANS = gramian_harness.DUAL_CONE_JACOBIANS


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
  gramian_harness.check_scripted_dual_cone_directions(
      optax_mtl.dualproj(num_tasks=3), numpy_dualproj)


def test_warm_start_from_the_weights_of_the_last_step():
  first, _ = gramian_harness.check_warm_start_repeats(
      optax_mtl.dualproj(num_tasks=3), JACOBIANS[4])
  np.testing.assert_allclose(first, numpy_dualproj(JACOBIANS[4]), atol=1e-5)


def test_non_conflicting_and_mean_when_no_conflict():

  def check_state(state):
    # The weights are >= 1/T (v >= u in the dual).
    assert np.all(np.asarray(state.weights) >= 1 / 6 - 1e-6)

  gramian_harness.check_non_conflicting_and_mean_when_no_conflict(
      optax_mtl.dualproj(num_tasks=6), check_state)


def test_permutation_invariance_and_scaling():
  rng = np.random.default_rng(1)
  jacobian = rng.normal(size=(4, 3))
  direction = gramian_harness.direction_fn(optax_mtl.dualproj(num_tasks=4),
                                          4)

  order = rng.permutation(4)
  np.testing.assert_allclose(direction(jacobian[order]), direction(jacobian),
                             atol=1e-5)
  gramian_harness.check_positively_homogeneous(  # d(κJ) = κ d(J).
      direction, jacobian, rtol=1e-4, atol_per_factor=1e-6)


def test_both_faces_agree():
  jacobian = JACOBIANS[0].astype(np.float32)
  grads, _ = gramian_harness.check_both_faces_agree(
      optax_mtl.dualproj(num_tasks=3), jacobian,
      gramian_harness.linear_loss(jacobian, np.ones(3)), jnp.zeros(4),
      grads_tolerance=dict(atol=1e-6), weights_tolerance=dict(atol=1e-6))
  np.testing.assert_allclose(grads, numpy_dualproj(JACOBIANS[0]), atol=1e-5)


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             *gramian_harness.SOLVER_ERRORS))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.dualproj, kwargs, message)
