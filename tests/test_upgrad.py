"""Tests of optax_mtl.upgrad (Quinton & Rey 2024)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import gramian_harness

JACOBIANS = gramian_harness.DUAL_CONE_JACOBIANS


def numpy_project_onto_dual_cone(jacobian, vector):
  """argmin_{Jy >= 0} ‖y - x‖, by enumerating the active constraints.

  The projection onto a polyhedral cone is the projection onto the null
  space of the rows active there: try every subset, keep the closest point
  that satisfies ``J y >= 0``.
  """
  best, best_distance = None, np.inf
  num_tasks = len(jacobian)
  for size in range(num_tasks + 1):
    for active in itertools.combinations(range(num_tasks), size):
      rows = jacobian[list(active)]
      point = vector - (np.linalg.pinv(rows) @ (rows @ vector) if size else 0)
      if np.all(jacobian @ point >= -1e-10):
        distance = np.linalg.norm(point - vector)
        if distance < best_distance - 1e-14:
          best, best_distance = point, distance
  return best


def numpy_upgrad(jacobian):
  """d = (1/T) Σ_i Π(g_i), straight from the paper's definition."""
  return np.mean([numpy_project_onto_dual_cone(jacobian, row)
                  for row in jacobian], axis=0)


def test_golden_values_over_a_scripted_sequence():
  state = gramian_harness.check_scripted_dual_cone_directions(
      optax_mtl.upgrad(num_tasks=3), numpy_upgrad)
  assert int(state.num_skipped) == 0


def test_non_conflicting_and_mean_when_no_conflict():

  def check_state(state):
    assert bool(state.solver_converged)

  gramian_harness.check_non_conflicting_and_mean_when_no_conflict(
      optax_mtl.upgrad(num_tasks=6), check_state)


def test_permutation_invariance_and_linearity_under_scaling():
  rng = np.random.default_rng(1)
  jacobian = rng.normal(size=(4, 3))
  direction = gramian_harness.direction_fn(optax_mtl.upgrad(num_tasks=4), 4)

  order = rng.permutation(4)
  np.testing.assert_allclose(direction(jacobian[order]), direction(jacobian),
                             atol=1e-5)
  # Linear under scaling: d(diag(c) J) = (1/T) Σ c_i Π(g_i), linear in c.
  projections = np.array([numpy_project_onto_dual_cone(jacobian, row)
                          for row in jacobian])
  for scales in (np.array([1.0, 2.0, 0.5, 3.0]), np.array([1e-3, 1, 1, 1e2])):
    np.testing.assert_allclose(
        direction(scales[:, None] * jacobian),
        scales @ projections / 4, atol=1e-5 * scales.max(), rtol=1e-4)


def test_warm_start_from_the_solution_of_the_last_step():
  # state.solution[i] is v^(i): Jᵀ v^(i) is the projection of g_i.
  _, state = gramian_harness.check_warm_start_repeats(
      optax_mtl.upgrad(num_tasks=3), JACOBIANS[0])
  projections = [numpy_project_onto_dual_cone(JACOBIANS[0], row)
                 for row in JACOBIANS[0]]
  np.testing.assert_allclose(np.asarray(state.solution) @ JACOBIANS[0],
                             projections, atol=1e-5)


def test_both_faces_agree():
  jacobian = JACOBIANS[0].astype(np.float32)
  grads, _ = gramian_harness.check_both_faces_agree(
      optax_mtl.upgrad(num_tasks=3), jacobian,
      gramian_harness.linear_loss(jacobian, np.ones(3)), jnp.zeros(4),
      grads_tolerance=dict(atol=1e-6), weights_tolerance=dict(atol=1e-6))
  np.testing.assert_allclose(grads, numpy_upgrad(JACOBIANS[0]), atol=1e-5)


def numpy_box_qp(matrix, lower):
  """argmin_{v >= u} vᵀAv (A PSD) by enumerating the free sets (KKT)."""
  num_tasks = len(lower)
  best, best_value = None, np.inf
  for size in range(num_tasks + 1):
    for free in itertools.combinations(range(num_tasks), size):
      free = list(free)
      bound = [k for k in range(num_tasks) if k not in free]
      v = np.array(lower, np.float64)
      if free:
        v[free] = -np.linalg.pinv(matrix[np.ix_(free, free)]) @ (
            matrix[np.ix_(free, bound)] @ v[bound])
      gradient = matrix @ v
      if (np.all(v[free] >= lower[free] - 1e-12)
          and np.all(gradient[bound] >= -1e-12)):
        value = v @ matrix @ v
        if value < best_value - 1e-15:
          best, best_value = v, value
  return best


def torchjd_normalize_regularize(gramian, reg_eps, norm_eps=0.0):
  """torchjd's regularize(normalize(G, norm_eps), reg_eps)."""
  trace = np.trace(gramian)
  normalised = np.zeros_like(gramian) if trace < norm_eps else gramian / trace
  return normalised + reg_eps * np.eye(len(gramian))


def torchjd_upgrad_weights(jacobian, pref_vector, reg_eps, norm_eps=0.0):
  """torchjd's UPGradWeighting: Σ_i argmin_{v >= p_i e_i} vᵀ G' v."""
  matrix = torchjd_normalize_regularize(jacobian @ jacobian.T, reg_eps,
                                        norm_eps)
  return sum(numpy_box_qp(matrix, row) for row in np.diag(pref_vector))


@pytest.mark.parametrize("preference", [None, (0.5, 0.3, 0.2),
                                         (0.7, 0.0, 0.3)])
@pytest.mark.parametrize("regularization", [0.0, 1e-4, 0.1])
def test_preference_and_regularization_reproduce_torchjd(
    preference, regularization):
  strategy = optax_mtl.upgrad(num_tasks=3, preference=preference,
                              regularization=regularization)
  pref_vector = np.full(3, 1 / 3) if preference is None else np.asarray(
      preference)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for jacobian in JACOBIANS[:4]:
    combined, state = update(jnp.asarray(jacobian, jnp.float32), state,
                             task_losses=jnp.ones(3))
    expected = torchjd_upgrad_weights(jacobian, pref_vector, regularization)
    np.testing.assert_allclose(state.weights, expected, rtol=2e-4,
                               atol=2e-5)
    scale = np.max(np.linalg.norm(jacobian, axis=1))
    np.testing.assert_allclose(combined, expected @ jacobian, rtol=2e-4,
                               atol=2e-5 * scale)


def test_regularization_is_relative_to_the_gradients():
  # torchjd's absolute norm_eps = 1e-4 turns UPGrad into the plain mean as
  # soon as ‖J‖²_F < 1e-4; here the weights do not depend on the scale.
  jacobian = JACOBIANS[0]
  strategy = optax_mtl.upgrad(num_tasks=3, regularization=1e-4)
  direction = gramian_harness.direction_fn(strategy, 3)
  small = 1e-3 * jacobian  # ‖J‖²_F ≈ 4e-6.
  np.testing.assert_allclose(direction(small), 1e-3 * direction(jacobian),
                             rtol=1e-4)
  torchjd_small = torchjd_upgrad_weights(small, np.full(3, 1 / 3), 1e-4,
                                         norm_eps=1e-4)
  np.testing.assert_allclose(torchjd_small, np.full(3, 1 / 3))  # The mean.
  assert np.linalg.norm(direction(small) - torchjd_small @ small) > 0.1 * (
      np.linalg.norm(direction(small)))


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             *gramian_harness.SOLVER_ERRORS,
                             ({"num_tasks": 2, "preference": (1.0,)},
                              "preference"),
                             ({"num_tasks": 2, "preference": (1.0, -0.1)},
                              "preference"),
                             ({"num_tasks": 2, "regularization": -1e-4},
                              "regularization")))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.upgrad, kwargs, message)


def nearly_opposite_pair_jacobian():
  """Five float32 gradients: a near-duplicate pair and g₄ = −g₃ + 1e-3 g′
  (the reliability review's instance); the optimum puts ~96–99 on g₃, g₄."""
  rows = np.random.default_rng(3).normal(size=(5, 20))
  return np.stack([rows[0], rows[0] + 1e-6 * rows[1], rows[2],
                   -rows[2] + 1e-3 * rows[3], rows[4]]).astype(np.float32)


def test_nearly_opposite_gradients_reach_the_optimum_float32():
  # The exact projections (SciPy/NumPy active-set enumeration, float64, on
  # the same float32 Gramian) give weights ~99 on the pair; a floor that grew
  # with the multipliers stopped at ~57 and reported convergence, with the
  # update conflicting by 60× tol.
  from tests import test_solvers  # pylint: disable=import-outside-toplevel
  jacobian = nearly_opposite_pair_jacobian()
  strategy = optax_mtl.upgrad(5)
  update, state = strategy.update(jnp.asarray(jacobian), strategy.init(None),
                                  task_losses=jnp.ones(5))
  gramian = np.asarray(optax_mtl.gramian(jnp.asarray(jacobian)), np.float64)
  exact = np.mean([test_solvers.exact_dual_cone(gramian, np.eye(5)[i])
                   for i in range(5)], axis=0)
  np.testing.assert_allclose(state.weights[2:4], exact[2:4], rtol=0.1)
  rows = jacobian.astype(np.float64)
  direction = np.asarray(update, np.float64)
  cosines = rows @ direction / (np.linalg.norm(rows, axis=1)
                                * np.linalg.norm(direction))
  # float32's own floor here: the exact weights, rounded to float32 and
  # combined in float32, conflict by about 7e-6.
  assert cosines.min() >= -3e-5, cosines


def test_old_spellings_warn_and_give_the_same_strategy():
  # 0.1: upgrad(T, preferences=...), state.solutions.
  gramian_harness.check_old_spelling(
      lambda: optax_mtl.upgrad(3, preferences=(0.5, 0.3, 0.2)),
      lambda: optax_mtl.upgrad(3, (0.5, 0.3, 0.2)), old="preferences",
      renamed_fields={"solutions": "solution"})
