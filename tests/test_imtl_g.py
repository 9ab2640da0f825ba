"""Tests of optax_mtl.imtl_g against the paper's formula on the gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import gramian_harness

JACOBIANS = gramian_harness.fixed_jacobians(
    "t2_conflict", "t3_mixed", "t5_random",
    t2_scaled=[[10.0, 0.0], [-1.0, 1.0]],
    t4_rank3=[[3.0, -2.0, 0.5, 0.0], [-0.5, 1.0, 1.0, 0.0],
              [0.5, 0.25, 1.5, 1.0], [2.0, -0.75, 2.5, 1.0]],
    t3_duplicate=[[2.0, -1.0], [1.0, 1.5], [1.0, 1.5]],
    t3_zero=[[2.0, -1.0], [0.0, 0.0], [-0.5, 2.0]],
)


def imtl_g_reference(jacobian, eps=1e-8):
  """IMTL-G (Liu et al. 2021, Eq. for α) on the explicit gradients, float64.

  Task 1 of the paper is the task with the largest norm; zero gradients are
  dropped (α = 0); rank deficiency uses the pseudo-inverse.
  """
  jacobian = np.asarray(jacobian, np.float64)
  num_tasks = jacobian.shape[0]
  norms = np.linalg.norm(jacobian, axis=1)
  alpha = np.zeros(num_tasks)
  if norms.max() == 0:
    return alpha
  anchor = int(np.argmax(norms))
  others = [k for k in range(num_tasks)
            if k != anchor and norms[k] > eps * norms.max()]
  alpha[anchor] = 1.0
  if not others:
    return alpha
  units = jacobian / np.where(norms > 0, norms, 1.0)[:, None]
  d = np.stack([jacobian[anchor] - jacobian[k] for k in others])
  u = np.stack([units[anchor] - units[k] for k in others])
  rest = jacobian[anchor] @ u.T @ np.linalg.pinv(d @ u.T, rcond=1e-10)
  alpha[others] = rest
  alpha[anchor] = 1.0 - rest.sum()
  return alpha


def imtl_weights(jacobian):
  weights, combined, _ = gramian_harness.single_step(optax_mtl.imtl_g,
                                                     jacobian)
  return weights, combined


@pytest.mark.parametrize("name", sorted(JACOBIANS))
def test_golden_values(name):
  jacobian = np.asarray(JACOBIANS[name])
  weights, combined = imtl_weights(jacobian)
  expected = imtl_g_reference(jacobian)
  np.testing.assert_allclose(weights, expected, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(combined, expected @ jacobian, rtol=2e-4,
                             atol=2e-5)
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["t2_conflict", "t3_mixed", "t5_random",
                                  "t4_rank3"])
def test_equal_projections_on_unit_gradients(name):
  jacobian = np.asarray(JACOBIANS[name])
  _, combined = imtl_weights(jacobian)
  units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
  projections = units @ combined
  np.testing.assert_allclose(projections, projections[0], rtol=1e-4)


def test_two_task_golden_value():
  # g1 = (2, 0), g2 = (0, 1): 2 α1 = α2 and α1 + α2 = 1.
  weights, combined = imtl_weights([[2.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(weights, [1 / 3, 2 / 3], rtol=1e-6)
  np.testing.assert_allclose(combined, [2 / 3, 2 / 3], rtol=1e-6)


def test_permutation_equivariance():
  jacobian = np.asarray(JACOBIANS["t5_random"])
  perm = np.random.default_rng(0).permutation(5)
  weights, _ = imtl_weights(jacobian)
  permuted, _ = imtl_weights(jacobian[perm])
  np.testing.assert_allclose(permuted, weights[perm], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-10, 1e-3, 1e4, 1e10])
def test_weights_do_not_depend_on_the_common_scale(scale):
  jacobian = np.asarray(JACOBIANS["t3_mixed"])
  weights, _ = imtl_weights(jacobian)
  scaled, _ = imtl_weights(jacobian * scale)
  np.testing.assert_allclose(scaled, weights, rtol=1e-4)


def test_duplicated_gradients_share_their_weight():
  weights, _ = imtl_weights(JACOBIANS["t3_duplicate"])
  assert np.all(np.isfinite(weights))
  np.testing.assert_allclose(weights[1], weights[2], rtol=1e-5)
  # Same update as with the duplicate merged into one task.
  merged = imtl_g_reference(np.asarray(JACOBIANS["t3_duplicate"])[:2])
  np.testing.assert_allclose(weights[0], merged[0], rtol=1e-4)


def test_zero_gradients():
  weights, _ = imtl_weights(JACOBIANS["t3_zero"])
  assert weights[1] == 0.0
  weights, combined = imtl_weights(np.zeros((3, 4)))
  np.testing.assert_array_equal(weights, np.zeros(3))
  np.testing.assert_array_equal(combined, np.zeros(4))


def test_single_task():
  weights, combined = imtl_weights([[1.0, -2.0]])
  np.testing.assert_array_equal(weights, [1.0])
  np.testing.assert_array_equal(combined, [1.0, -2.0])


def test_value_and_grad_with_shared_parameters():
  gramian_harness.check_shared_parameters_step(optax_mtl.imtl_g(3),
                                               imtl_g_reference)


def torchjd_imtl_g(jacobian):
  """torchjd's IMTLG weighting in float64: v = pinv(G) n, α = v / Σ v."""
  jacobian = np.asarray(jacobian, np.float64)
  gramian = jacobian @ jacobian.T
  solution = np.linalg.pinv(gramian, rcond=1e-10, hermitian=True) @ np.sqrt(
      np.diag(gramian))
  return solution / solution.sum()


def least_squares_imtl_g(jacobian):
  """d ∝ J⁺n, the least-norm least-squares solution of g_i·d = ‖g_i‖,
  scaled so that the weights sum to one (independent of the Gramian)."""
  jacobian = np.asarray(jacobian, np.float64)
  direction = np.linalg.lstsq(jacobian, np.linalg.norm(jacobian, axis=1),
                              rcond=1e-10)[0]
  alpha = np.linalg.lstsq(jacobian.T, direction, rcond=1e-10)[0]
  return direction / alpha.sum()


@pytest.mark.parametrize("seed", range(5))
def test_more_tasks_than_dimensions_give_the_pseudo_inverse_update(seed):
  # Three tasks in two dimensions: equal projections do not exist, and the
  # paper's system is singular; the weights are torchjd's pseudo-inverse
  # ones and the update the least-squares one (not a collapse to 0).
  jacobian = np.random.default_rng(seed).normal(size=(3, 2))
  weights, combined = imtl_weights(jacobian)
  np.testing.assert_allclose(weights, torchjd_imtl_g(jacobian), rtol=2e-4,
                             atol=2e-5)
  np.testing.assert_allclose(combined, least_squares_imtl_g(jacobian),
                             rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", sorted(JACOBIANS))
def test_matches_torchjds_definition(name):
  weights, _ = imtl_weights(JACOBIANS[name])
  np.testing.assert_allclose(weights, torchjd_imtl_g(JACOBIANS[name]),
                             rtol=2e-4, atol=2e-5)


def test_unit_gradients_that_cancel_give_a_zero_update():
  # Three gradients of norm 2 at 120°: Σ u_i = 0, so G⁺n = 0 (the least
  # squares of u_i·d = 1 is d = 0).
  angles = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
  jacobian = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  weights, combined = imtl_weights(jacobian)
  np.testing.assert_array_equal(weights, np.zeros(3))
  np.testing.assert_array_equal(combined, np.zeros(2))


@pytest.mark.parametrize("x64", [False, True])
def test_parallel_float32_gradients(x64):
  # J = [g, g, c g] (rank 1): α = (1, 1, c) / (2 + c) exactly. Under x64 the
  # float32 Gramian keeps float32's cut-off (float64's would keep its
  # rounding noise as a direction).
  with jax.enable_x64(x64):
    for seed, factor, _, _, state in gramian_harness.parallel_gradient_steps(
        optax_mtl.imtl_g(3), 20):
      assert state.weights.dtype == jnp.float32
      np.testing.assert_allclose(state.weights,
                                 np.array([1.0, 1.0, factor]) / (2 + factor),
                                 rtol=1e-4, err_msg=str(seed))


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             (dict(num_tasks=2, min_relative_norm=-1.0),
                              "min_relative_norm"),
                             (dict(num_tasks=2, min_relative_norm=1.0),
                              "min_relative_norm")))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.imtl_g, kwargs, message)


def test_old_spelling_warns_and_gives_the_same_strategy():
  # 0.1: imtl_g(T, eps=...), a cut-off on the relative norm.
  gramian_harness.check_old_spelling(
      lambda: optax_mtl.imtl_g(3, eps=0.5),
      lambda: optax_mtl.imtl_g(3, min_relative_norm=0.5), old="eps",
      jacobian=[[1.0, 0.0], [0.0, 0.4], [3.0, 1.0]])
