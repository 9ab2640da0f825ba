"""Tests of optax_mtl.aligned_mtl against an SVD of the gradient matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from optax_mtl._src.weighting import _aligned_mtl
from tests import gramian_harness

JACOBIANS = gramian_harness.fixed_jacobians(
    "t2_conflict", "t3_mixed", "t4_rank2", "t5_random",
    t5_wide_rank=(np.random.default_rng(6).normal(size=(5, 3))
                  * [1.0, 0.3, 0.05]).tolist(),
    t3_duplicate=[[2.0, -1.0, 0.0], [1.0, 1.5, 0.5], [1.0, 1.5, 0.5]],
    t3_zero=[[2.0, -1.0], [0.0, 0.0], [-0.5, 2.0]],
)


def aligned_reference(jacobian, preferences=None, rtol=1e-6,
                      scale_mode="min"):
  """Algorithm 1 of Senushkin et al. (2023) via the SVD of J, float64.

  J = U S Wᵀ, so G = J Jᵀ = U S² Uᵀ: V = U, λ = S², B = σ U S⁻¹ Uᵀ over
  the singular values kept (λ above rtol · λ_max), with σ² the smallest
  kept λ ("min"), their lower median ("median", torch.median) or their
  mean ("rmse"), as the authors' ProcrustesSolver chooses it.
  """
  jacobian = np.asarray(jacobian, np.float64)
  num_tasks = jacobian.shape[0]
  if preferences is None:
    preferences = np.ones(num_tasks)
  u, s, _ = np.linalg.svd(jacobian, full_matrices=False)
  if s.max() == 0:
    return np.zeros(num_tasks)
  keep = s**2 > rtol * s.max()**2
  u, s = u[:, keep], s[keep]
  eigenvalues = np.sort(s**2)
  sigma = np.sqrt({"min": eigenvalues[0],
                   "median": eigenvalues[(len(eigenvalues) - 1) // 2],
                   "rmse": eigenvalues.mean()}[scale_mode])
  b_matrix = sigma * (u / s) @ u.T
  return b_matrix @ np.asarray(preferences, np.float64)


b_columns = jax.jit(jax.vmap(
    lambda gramian, preferences: _aligned_mtl._aligned_mtl_weights(
        gramian, preferences, None)[0], in_axes=(None, 0)))


def aligned_weights(jacobian, preferences=None, **kwargs):
  return gramian_harness.single_step(optax_mtl.aligned_mtl, jacobian,
                                     preferences, **kwargs)


@pytest.mark.parametrize("name", sorted(JACOBIANS))
def test_golden_values(name):
  jacobian = np.asarray(JACOBIANS[name])
  weights, combined, state = aligned_weights(jacobian)
  expected = aligned_reference(jacobian)
  np.testing.assert_allclose(weights, expected, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(combined, expected @ jacobian, rtol=2e-4,
                             atol=2e-5)
  assert int(state.rank) == np.linalg.matrix_rank(jacobian)


def test_preferences():
  jacobian = np.asarray(JACOBIANS["t3_mixed"])
  preferences = (1.0, 2.0, 0.5)
  weights, _, _ = aligned_weights(jacobian, preferences)
  np.testing.assert_allclose(weights,
                             aligned_reference(jacobian, preferences),
                             rtol=2e-4)


def test_two_task_golden_value():
  weights, combined, state = aligned_weights([[4.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(weights, [0.25, 1.0], rtol=1e-6)
  np.testing.assert_allclose(combined, [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(state.condition_number, 16.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["t3_mixed", "t5_random", "t4_rank2"])
def test_aligned_gradients_are_orthogonal_with_equal_norms(name):
  jacobian = np.asarray(JACOBIANS[name])
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  # B from the rule: the weights for the preferences e_k are B e_k.
  num_tasks = jacobian.shape[0]
  b_matrix = np.asarray(b_columns(gramian, jnp.eye(num_tasks))).T
  aligned = b_matrix.T @ jacobian  # Rows: the aligned task gradients.
  rank = np.linalg.matrix_rank(jacobian)
  eigenvalues = np.linalg.eigvalsh(np.asarray(gramian, np.float64))
  smallest = np.sort(eigenvalues)[-rank]
  u = np.linalg.svd(jacobian, full_matrices=False)[0][:, :rank]
  np.testing.assert_allclose(aligned @ aligned.T, smallest * u @ u.T,
                             atol=1e-4 * eigenvalues.max())


def test_permutation_equivariance_and_scale_invariance():
  gramian_harness.check_weights_equivariant_and_homogeneous(
      aligned_weights, JACOBIANS["t5_random"], scales=(1e-10, 1e-3, 1e5, 1e10),
      exponent=0)


def test_zero_and_duplicated_gradients_give_finite_weights():
  weights, combined, state = aligned_weights(np.zeros((3, 2)))
  np.testing.assert_array_equal(weights, np.zeros(3))
  np.testing.assert_array_equal(combined, np.zeros(2))
  assert int(state.rank) == 0
  weights, _, _ = aligned_weights(JACOBIANS["t3_duplicate"])
  assert np.all(np.isfinite(weights))
  np.testing.assert_allclose(weights[1], weights[2], rtol=1e-5)


def test_value_and_grad_with_shared_parameters():
  gramian_harness.check_shared_parameters_step(optax_mtl.aligned_mtl(3),
                                               aligned_reference)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("name", ["t3_mixed", "t4_rank2", "t5_random",
                                  "t5_wide_rank"])
def test_scale_modes_of_the_authors_code(name, scale_mode):
  jacobian = np.asarray(JACOBIANS[name])
  weights, _, _ = gramian_harness.single_step(
      optax_mtl.aligned_mtl, jacobian, scale_mode=scale_mode)
  np.testing.assert_allclose(
      weights, aligned_reference(jacobian, scale_mode=scale_mode), rtol=2e-4,
      atol=2e-5)


def test_torchjds_mean_preferences():
  # torchjd's AlignedMTL: α = B · (1/T) (its default pref_vector, the mean).
  jacobian = np.asarray(JACOBIANS["t5_random"])
  weights, combined, _ = aligned_weights(jacobian, (0.2,) * 5)
  gramian = jacobian @ jacobian.T
  eigenvalues, eigenvectors = np.linalg.eigh(gramian)
  b_matrix = np.sqrt(eigenvalues.min()) * (
      eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T
  np.testing.assert_allclose(weights, b_matrix @ np.full(5, 0.2), rtol=2e-4)
  default, _, _ = aligned_weights(jacobian)
  np.testing.assert_allclose(weights, default / 5, rtol=1e-5)


def nearly_parallel(seed, delta):
  """[g, 2g + δh, g/2 − δh/2]: two real directions, λ₂/λ₁ ≈ δ²/5."""
  rng = np.random.default_rng(seed)
  gradient, other = rng.standard_normal((2, 100))
  other -= (other @ gradient) / (gradient @ gradient) * gradient
  return np.stack([gradient, 2 * gradient + delta * other,
                   0.5 * gradient - 0.5 * delta * other]).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_nearly_parallel_float32_gradients_keep_their_second_direction(seed):
  # λ₂/λ₁ ≈ 9e-7 lies between T ε = 3.6e-7 and 10 T ε: the former cut-off
  # dropped that real direction (the update off by a factor of about 1000).
  jacobian = nearly_parallel(seed, 3e-3)
  expected = aligned_reference(jacobian, rtol=1e-10)  # Rank 2, float64.
  _, combined, state = aligned_weights(jacobian)
  assert int(state.rank) == 2
  expected_update = expected @ jacobian.astype(np.float64)
  error = np.linalg.norm(combined - expected_update) / np.linalg.norm(
      expected_update)
  assert error < 0.1  # float32's resolution of λ₂: ε λ₁ / λ₂ ≈ 0.14.
  _, dropped, state = aligned_weights(jacobian,
                                      eigenvalue_rtol=30 * 2.0**-23)
  assert int(state.rank) == 1
  assert np.linalg.norm(dropped - expected_update) > 100 * np.linalg.norm(
      expected_update)


@pytest.mark.parametrize("dtype, x64", [(np.float32, False), (np.float32, True),
                                        (np.float64, True)])
def test_parallel_gradients_have_rank_one(dtype, x64):
  # J = [g, g, c g] has rank one, in float32 and float64, with or without
  # x64: B = V Vᵀ over the one direction.
  with jax.enable_x64(x64):
    for seed, _, jacobian, combined, state in (
        gramian_harness.parallel_gradient_steps(
            optax_mtl.aligned_mtl(3), 50, dtype=dtype)):
      assert int(state.rank) == 1, seed
      expected = aligned_reference(jacobian, rtol=1e-3) @ jacobian
      np.testing.assert_allclose(combined, expected, rtol=1e-4,
                                 atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             (dict(num_tasks=2, preference=(1.0,)),
                              "preference"),
                             (dict(num_tasks=2, preference=(1.0, -1.0)),
                              "preference"),
                             (dict(num_tasks=2, eigenvalue_rtol=1.0),
                              "eigenvalue_rtol"),
                             (dict(num_tasks=2, scale_mode="max"),
                              "scale_mode")))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.aligned_mtl, kwargs, message)


def test_old_spelling_warns_and_gives_the_same_strategy():
  # 0.1: aligned_mtl(T, preferences=...).
  gramian_harness.check_old_spelling(
      lambda: optax_mtl.aligned_mtl(3, preferences=(1.0, 2.0, 0.5)),
      lambda: optax_mtl.aligned_mtl(3, (1.0, 2.0, 0.5)), old="preferences")
