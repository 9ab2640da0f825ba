"""Tests of optax_mtl.dualproj (Quinton & Rey 2024)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import gramian_harness
from tests import test_upgrad

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


@pytest.mark.parametrize("preference", [None, (0.5, 0.3, 0.2),
                                         (1.0, -0.5, 0.2)])
@pytest.mark.parametrize("regularization", [0.0, 1e-4, 0.1])
def test_preference_and_regularization_reproduce_torchjd(
    preference, regularization):
  # torchjd's DualProj: argmin_{v >= p} vᵀ (G / tr(G) + reg_eps I) v.
  strategy = optax_mtl.dualproj(num_tasks=3, preference=preference,
                                regularization=regularization)
  pref_vector = np.full(3, 1 / 3) if preference is None else np.asarray(
      preference)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for jacobian in JACOBIANS[:4]:
    combined, state = update(jnp.asarray(jacobian, jnp.float32), state,
                             task_losses=jnp.ones(3))
    gramian = jacobian @ jacobian.T
    matrix = gramian / np.trace(gramian) + regularization * np.eye(3)
    expected = test_upgrad.numpy_box_qp(matrix, pref_vector)
    np.testing.assert_allclose(state.weights, expected, rtol=2e-4,
                               atol=2e-5)
    scale = np.max(np.linalg.norm(jacobian, axis=1))
    np.testing.assert_allclose(combined, expected @ jacobian, rtol=2e-4,
                               atol=2e-5 * scale)


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             *gramian_harness.SOLVER_ERRORS,
                             ({"num_tasks": 2, "preference": (1.0,)},
                              "preference"),
                             ({"num_tasks": 2,
                               "preference": (1.0, float("nan"))},
                              "preference"),
                             ({"num_tasks": 2, "regularization": -1.0},
                              "regularization")))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.dualproj, kwargs, message)


def test_nearly_opposite_gradients_reach_the_optimum_float32():
  # As test_upgrad's: the exact projection (float64, same float32 Gramian)
  # puts ~99 on the nearly opposite pair; the solver stopped at ~57.
  from tests import test_solvers  # pylint: disable=import-outside-toplevel
  jacobian = test_upgrad.nearly_opposite_pair_jacobian()
  strategy = optax_mtl.dualproj(5)
  update, state = strategy.update(jnp.asarray(jacobian), strategy.init(None),
                                  task_losses=jnp.ones(5))
  gramian = np.asarray(optax_mtl.gramian(jnp.asarray(jacobian)), np.float64)
  exact = test_solvers.exact_dual_cone(gramian, np.full(5, 0.2))
  np.testing.assert_allclose(state.weights[2:4], exact[2:4], rtol=0.1)
  rows = jacobian.astype(np.float64)
  direction = np.asarray(update, np.float64)
  cosines = rows @ direction / (np.linalg.norm(rows, axis=1)
                                * np.linalg.norm(direction))
  assert cosines.min() >= -3e-5, cosines


def test_old_spelling_warns_and_gives_the_same_strategy():
  # 0.1: dualproj(T, preferences=...).
  gramian_harness.check_old_spelling(
      lambda: optax_mtl.dualproj(3, preferences=(1.0, -0.5, 2.0)),
      lambda: optax_mtl.dualproj(3, (1.0, -0.5, 2.0)), old="preferences")
