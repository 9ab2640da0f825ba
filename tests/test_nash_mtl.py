"""Tests of optax_mtl.nash_mtl: the Newton solver against SciPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import optax_mtl
from optax_mtl._src import solvers
from tests import gramian_harness

solve = jax.jit(
    lambda gramian, max_iters, tol: solvers.solve_nash(
        gramian, max_iters=max_iters, tol=tol), static_argnums=(1, 2))


def nash_reference(jacobian):
  """α > 0 with G α = 1/α (Navon et al. 2022, Eq. 3.2) by SciPy, float64.

  In the variables u = log α, a trust-region Newton minimisation of
  ``½ αᵀGα − Σ log α`` (convex in α), polished by a root finder on
  ``α ⊙ Gα − 1``. Returns α and the reference's own residual.
  """
  jacobian = np.asarray(jacobian, np.float64)
  gramian = jacobian @ jacobian.T
  num_tasks = gramian.shape[0]
  start = np.log(1.0 / np.sqrt(np.diag(gramian)))

  def objective(u):
    alpha = np.exp(u)
    return 0.5 * alpha @ gramian @ alpha - np.sum(u)

  def residual(u):
    alpha = np.exp(u)
    return alpha * (gramian @ alpha) - 1.0

  def jacobian_of_residual(u):
    alpha = np.exp(u)
    return (np.diag(alpha * (gramian @ alpha))
            + alpha[:, None] * gramian * alpha[None, :])

  first = scipy.optimize.minimize(
      objective, start, jac=residual, hess=jacobian_of_residual,
      method="trust-exact", options=dict(gtol=1e-12, maxiter=2000))
  polished = scipy.optimize.root(residual, first.x, jac=jacobian_of_residual,
                                 method="hybr", options=dict(xtol=1e-15))
  assert num_tasks == polished.x.shape[0]
  return np.exp(polished.x), np.max(np.abs(residual(polished.x)))


def random_jacobian(rng, num_tasks, condition, scale):
  """J = U diag(s) Wᵀ with cond(G) = condition and ‖J‖₂ = scale."""
  num_params = num_tasks + 3
  u, _ = np.linalg.qr(rng.normal(size=(num_tasks, num_tasks)))
  w, _ = np.linalg.qr(rng.normal(size=(num_params, num_tasks)))
  singular_values = np.logspace(0, -0.5 * np.log10(condition), num_tasks)
  return scale * (u * rng.permutation(singular_values)) @ w.T


@pytest.mark.parametrize("num_tasks", [2, 3, 8, 16, 64])
def test_solver_matches_scipy_in_float64(num_tasks):
  rng = np.random.default_rng(num_tasks)
  with jax.enable_x64(True):
    for condition in (1.0, 1e3, 1e6):
      for scale in (1e-10, 1.0, 1e10):
        jacobian = random_jacobian(rng, num_tasks, condition, scale)
        expected, reference_residual = nash_reference(jacobian)
        assert reference_residual < 1e-9
        gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float64)
        solution = solve(gramian, 100, 1e-12)
        assert solution.weights.dtype == jnp.float64
        assert bool(solution.converged), (condition, scale)
        assert float(solution.gap) <= 1e-12
        np.testing.assert_allclose(solution.weights, expected, rtol=1e-6)


@pytest.mark.parametrize("num_tasks", [2, 5, 16, 64])
def test_solver_matches_scipy_in_float32(num_tasks):
  rng = np.random.default_rng(100 + num_tasks)
  for condition in (1.0, 1e2):
    for scale in (1e-10, 1.0, 1e10):
      jacobian = random_jacobian(rng, num_tasks, condition, scale)
      jacobian = jacobian.astype(np.float32)
      expected, _ = nash_reference(jacobian)
      solution = solve(jnp.asarray(jacobian @ jacobian.T), 50, 1e-5)
      assert bool(solution.converged)
      assert int(solution.iterations) <= 20
      np.testing.assert_allclose(solution.weights, expected, rtol=1e-3)


def nash_step(jacobian, **kwargs):
  return gramian_harness.single_step(optax_mtl.nash_mtl, jacobian, **kwargs)


FIXED_JACOBIANS = gramian_harness.fixed_jacobians(
    "t2_conflict", "t3_mixed", "t5_random",
    t5_rank4=np.random.default_rng(4).normal(size=(5, 4)).tolist(),
)


@pytest.mark.parametrize("name", sorted(FIXED_JACOBIANS))
def test_golden_values_and_the_update_norm(name):
  jacobian = np.asarray(FIXED_JACOBIANS[name])
  solution = solve(jnp.asarray(jacobian @ jacobian.T, jnp.float32), 50, 1e-5)
  weights = np.asarray(solution.weights, np.float64)
  expected, _ = nash_reference(jacobian)
  np.testing.assert_allclose(weights, expected, rtol=1e-4)
  # Every task's utility g_i · d is 1/α_i, so ‖d‖² = T.
  combined = weights @ jacobian
  np.testing.assert_allclose(jacobian @ combined, 1.0 / weights, rtol=1e-4)
  np.testing.assert_allclose(combined @ combined, jacobian.shape[0],
                             rtol=1e-4)
  assert bool(solution.converged)
  assert 0 < int(solution.iterations) <= 50
  assert float(solution.gap) <= 1e-5


def test_optax_face_golden_value_and_diagnostics():
  jacobian = np.asarray(FIXED_JACOBIANS["t3_mixed"])
  weights, combined, state = nash_step(jacobian)
  expected, _ = nash_reference(jacobian)
  np.testing.assert_allclose(weights, expected, rtol=1e-4)
  np.testing.assert_allclose(combined, expected @ jacobian, rtol=1e-4,
                             atol=1e-5)
  assert bool(state.solver_converged)
  assert 0 < int(state.solver_iterations) <= 50
  assert 0.0 <= float(state.solver_gap) <= 1e-5
  assert state.solver_gap.dtype == jnp.float32


def test_orthogonal_gradients():
  weights, _, state = nash_step([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0],
                                 [0.0, 0.0, 4.0]])
  np.testing.assert_allclose(weights, [0.5, 2.0, 0.25], rtol=1e-6)
  assert int(state.solver_iterations) == 0


def test_permutation_equivariance_and_scaling():
  # α for cJ is α/c, and ‖d‖² = T at every scale.
  for combined in gramian_harness.check_weights_equivariant_and_homogeneous(
      nash_step, FIXED_JACOBIANS["t5_random"], scales=(1e-10, 1e-3, 1e4, 1e10),
      exponent=-1):
    np.testing.assert_allclose(combined @ combined, 5.0, rtol=1e-4)


def test_zero_gradient_gets_zero_weight():
  jacobian = np.array([[2.0, -1.0], [0.0, 0.0], [-0.5, 2.0]])
  weights, _, state = nash_step(jacobian)
  assert weights[1] == 0.0
  expected, _ = nash_reference(jacobian[[0, 2]])
  np.testing.assert_allclose(weights[[0, 2]], expected, rtol=1e-4)
  assert bool(state.solver_converged)
  weights, combined, _ = nash_step(np.zeros((3, 2)))
  np.testing.assert_array_equal(weights, np.zeros(3))
  np.testing.assert_array_equal(combined, np.zeros(2))


def test_duplicated_gradients():
  # g1 = g2: the solution exists (α1 = α2 = 1/√2 here).
  jacobian = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  weights, combined, _ = nash_step(jacobian)
  np.testing.assert_allclose(weights, [0.5**0.5, 0.5**0.5, 1.0], rtol=1e-5)
  np.testing.assert_allclose(jacobian @ combined, 1.0 / weights, rtol=1e-5)


@pytest.mark.parametrize("tol", [None, 1e-5, 1e-12, 0.0])
@pytest.mark.parametrize("x64", [False, True])
def test_no_bargaining_solution_is_reported_with_a_zero_update(tol, x64):
  # g1 = -g2: no direction helps both; 0 is in the hull of the unit
  # gradients. Whatever tol (a tight one must not overflow the weights and
  # get the step rejected), the update is the documented fallback, zero.
  jacobian = np.array([[1.0, 2.0], [-1.0, -2.0], [0.5, -0.3]])
  with jax.enable_x64(x64):
    strategy = optax_mtl.nash_mtl(3, tol=tol)
    dtype = jnp.float64 if x64 else jnp.float32
    combined, state = jax.jit(strategy.update)(
        jnp.asarray(jacobian, dtype), strategy.init(None),
        task_losses=jnp.ones(3))
  np.testing.assert_array_equal(combined, np.zeros(2))
  np.testing.assert_array_equal(state.weights, np.zeros(3))
  assert int(state.num_skipped) == 0  # Accepted, not rejected.
  assert int(state.solver_outcome) == solvers.Outcome.NO_SOLUTION
  assert not bool(state.solver_converged)
  assert np.isfinite(float(state.solver_gap))
  assert 0 < int(state.solver_iterations) <= 50


def test_solver_outcome_of_a_solved_step():
  _, _, state = nash_step(FIXED_JACOBIANS["t3_mixed"])
  assert int(state.solver_outcome) == solvers.Outcome.SUCCESS


def torchjd_max_norm(alpha, jacobian, max_norm):
  """torchjd's NashMTL: α ← α / ‖Jᵀα‖ · max_norm when ‖Jᵀα‖ > max_norm."""
  norm = np.linalg.norm(alpha @ jacobian)
  return alpha / norm * max_norm if norm > max_norm else alpha


def libmtl_clip(update, max_norm):
  """torch.nn.utils.clip_grad_norm_ as LibMTL's Nash_MTL applies it."""
  coefficient = max_norm / (np.linalg.norm(update) + 1e-6)
  return update * min(coefficient, 1.0)


@pytest.mark.parametrize("max_norm", [1.0, 0.5, 10.0])
def test_max_norm_reproduces_the_peers(max_norm):
  jacobian = np.asarray(FIXED_JACOBIANS["t3_mixed"])
  expected, _ = nash_reference(jacobian)
  weights, combined, _ = nash_step(jacobian, max_norm=max_norm)
  np.testing.assert_allclose(
      weights, torchjd_max_norm(expected, jacobian, max_norm), rtol=1e-4)
  np.testing.assert_allclose(
      combined, libmtl_clip(expected @ jacobian, max_norm), rtol=1e-4,
      atol=1e-5)
  # ‖d‖ = √3 > 1: the peers' default max_norm = 1 gives the unit d/√T.
  if max_norm == 1.0:
    np.testing.assert_allclose(np.linalg.norm(combined), 1.0, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_the_update_norm_is_the_square_root_of_t_at_every_scale(scale):
  # The peers divide G by ‖G‖_F, but their constraint log(α_i ‖G‖_F) +
  # log((Gα)_i / ‖G‖_F) >= 0 multiplies it back: their fixed point is
  # α_i (Gα)_i = 1, so ‖d‖² = αᵀGα = T at every scale, as here.
  jacobian = np.asarray(FIXED_JACOBIANS["t5_random"]) * scale
  gramian = jacobian @ jacobian.T
  frobenius = np.linalg.norm(gramian)
  alpha, _ = nash_reference(jacobian)
  np.testing.assert_allclose(
      np.log(alpha * frobenius) + np.log(gramian / frobenius @ alpha), 0.0,
      atol=1e-8)
  _, combined, _ = nash_step(jacobian)
  np.testing.assert_allclose(np.linalg.norm(combined), np.sqrt(5.0),
                             rtol=1e-4)


def test_unconverged_solve_is_reported():
  rng = np.random.default_rng(7)
  jacobian = random_jacobian(rng, 8, 1e4, 1.0)
  _, _, state = nash_step(jacobian, max_iters=1)
  assert int(state.solver_iterations) == 1
  assert not bool(state.solver_converged)
  assert float(state.solver_gap) > 1e-5
  assert int(state.solver_outcome) == solvers.Outcome.MAX_ITERS


def test_recompute_every_and_both_faces():
  jacobian = np.asarray(FIXED_JACOBIANS["t3_mixed"], np.float32)
  strategy = optax_mtl.recompute_every(optax_mtl.nash_mtl(3), 2)

  def loss_fn(params, data_scale):
    return data_scale * (jnp.asarray(jacobian) @ params) + 10.0

  params = jnp.ones(4)
  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  state = strategy.init(params)
  (_, grads), state = step(params, state, 1.0)
  expected, _ = nash_reference(jacobian)
  np.testing.assert_allclose(state.inner_state.weights, expected, rtol=1e-4)
  np.testing.assert_allclose(grads, expected @ jacobian, rtol=1e-4, atol=1e-5)
  # The second step reuses the weights although the gradients doubled.
  (_, grads), state = step(params, state, 2.0)
  np.testing.assert_allclose(state.inner_state.weights, expected, rtol=1e-4)
  np.testing.assert_allclose(grads, 2.0 * expected @ jacobian, rtol=1e-4,
                             atol=1e-5)
  (_, grads), state = step(params, state, 2.0)
  np.testing.assert_allclose(state.inner_state.weights, expected / 2.0,
                             rtol=1e-4)


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             (dict(num_tasks=2, max_iters=0), "max_iters"),
                             (dict(num_tasks=2, tol=-1.0), "tol"),
                             (dict(num_tasks=2, max_norm=-1.0), "max_norm")))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.nash_mtl, kwargs, message)


def test_old_positions_warn_and_give_the_same_strategy():
  # 0.1: nash_mtl(T, max_iters, tol, max_norm), all positional.
  gramian_harness.check_old_spelling(
      lambda: optax_mtl.nash_mtl(3, 20, 1e-5, 1.0),
      lambda: optax_mtl.nash_mtl(3, max_norm=1.0, max_iters=20, tol=1e-5),
      old="by position")
