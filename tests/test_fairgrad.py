"""Tests of optax_mtl.fairgrad (Ban & Ji 2024) and its α-fair solver, against
SciPy's least squares on ``G w − w^{-1/α}`` in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import optax_mtl
from optax_mtl._src import solvers
from optax_mtl._src.solvers import _alpha_fair


def scipy_alpha_fair(gramian, alpha):
  """w > 0 with G w = w^{-1/α}, by SciPy's bounded least squares."""
  num_tasks = len(gramian)
  result = optimize.least_squares(
      lambda w: gramian @ w - w ** (-1.0 / alpha),
      np.ones(num_tasks), bounds=(1e-12, np.inf), xtol=1e-15, ftol=1e-15,
      gtol=1e-15, max_nfev=10000)
  return result.x


def random_gramian(num_tasks, dim, seed, spread=1.0):
  rng = np.random.default_rng(seed)
  jacobian = rng.normal(size=(num_tasks, dim)) * np.exp(
      rng.uniform(-spread, spread, (num_tasks, 1)))
  return jacobian @ jacobian.T


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("num_tasks, seed", [(2, 0), (3, 1), (5, 2), (8, 3)])
def test_solver_matches_scipy(alpha, num_tasks, seed):
  gramian = random_gramian(num_tasks, num_tasks + 3, seed)
  expected = scipy_alpha_fair(gramian, alpha)
  with jax.enable_x64(True):
    result = _alpha_fair.solve_alpha_fair(jnp.asarray(gramian, jnp.float64),
                                          alpha)
    assert result.weights.dtype == jnp.float64
  np.testing.assert_allclose(result.weights, expected, rtol=1e-7)
  assert bool(result.converged)
  result32 = jax.jit(lambda g: _alpha_fair.solve_alpha_fair(g, alpha))(
      jnp.asarray(gramian, jnp.float32))
  np.testing.assert_allclose(result32.weights, expected, rtol=2e-4)


def test_alpha_one_is_nash_mtl():
  gramian = jnp.asarray(random_gramian(4, 6, 5), jnp.float32)
  np.testing.assert_allclose(
      _alpha_fair.solve_alpha_fair(gramian, 1.0).weights,
      solvers.solve_nash(gramian).weights, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-20, 1e-6, 1e6])
def test_weights_follow_the_scale_law(scale):
  gramian = random_gramian(3, 5, 4)
  alpha = 2.0
  with jax.enable_x64(True):
    base_weights = _alpha_fair.solve_alpha_fair(jnp.asarray(gramian), alpha)
    scaled = _alpha_fair.solve_alpha_fair(jnp.asarray(gramian * scale), alpha)
  np.testing.assert_allclose(
      scaled.weights,
      np.asarray(base_weights.weights) * scale ** (-alpha / (alpha + 1)),
      rtol=1e-9)


def test_zero_task_and_no_solution():
  gramian = random_gramian(2, 4, 6)
  padded = np.zeros((3, 3))
  padded[:2, :2] = gramian
  result = _alpha_fair.solve_alpha_fair(jnp.asarray(padded, jnp.float32), 2.0)
  assert float(result.weights[2]) == 0.0
  np.testing.assert_allclose(result.weights[:2], scipy_alpha_fair(gramian, 2.0),
                             rtol=2e-4)
  opposite = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
  result = _alpha_fair.solve_alpha_fair(opposite, 2.0)
  assert int(result.outcome) == solvers.Outcome.NO_SOLUTION
  np.testing.assert_array_equal(result.weights, [0.0, 0.0])
  assert not bool(result.converged)


def test_strategy_in_both_faces():
  rng = np.random.default_rng(8)
  jacobian = rng.normal(size=(3, 5)).astype(np.float32)
  expected = scipy_alpha_fair(jacobian.astype(np.float64)
                              @ jacobian.T.astype(np.float64), 2.0)
  strategy = optax_mtl.fairgrad(3)
  update, state = jax.jit(strategy.update)(
      jnp.asarray(jacobian), strategy.init(None), task_losses=-jnp.ones(3))
  np.testing.assert_allclose(state.weights, expected, rtol=2e-4)
  np.testing.assert_allclose(update, expected @ jacobian, rtol=2e-4,
                             atol=1e-5)
  assert bool(state.solver_converged) and int(state.num_skipped) == 0
  step = jax.jit(optax_mtl.value_and_grad(
      lambda params: jnp.asarray(jacobian) @ params + 1.0, strategy))
  (_, grads), _ = step(jnp.zeros(5), strategy.init(None))
  np.testing.assert_allclose(grads, update, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=float("inf")), "alpha"),
    (dict(max_iters=0), "max_iters"), (dict(tol=-1.0), "tol")])
def test_hyperparameter_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optax_mtl.fairgrad(3, **kwargs)


def test_converged_means_every_task_within_its_own_round_off():
  # Gradient norms 1e-5 … 1e5 (float32): when the solver reports
  # convergence, every task's relative residual |(Gw)_i w_i^{1/α} − 1| (in
  # float64) is within tol plus that task's own round-off T ε (|G|w)_i
  # w_i^{1/α}; the large tasks' round-off no longer excuses the small ones.
  base = np.random.default_rng(3).normal(size=(5, 20))
  jacobian = jnp.asarray(base * np.logspace(-5, 5, 5)[:, None], jnp.float32)
  strategy = optax_mtl.fairgrad(5)
  _, state = strategy.update(jacobian, strategy.init(None),
                             task_losses=jnp.ones(5))
  gramian = np.asarray(optax_mtl.gramian(jacobian), np.float64)
  weights = np.asarray(state.weights, np.float64)
  residual = np.abs(gramian @ weights * np.sqrt(weights) - 1)
  own = 5 * np.finfo(np.float32).eps * (np.abs(gramian) @ weights) * np.sqrt(
      weights)
  assert bool(state.solver_converged)
  assert np.all(residual <= 1e-6 + 2 * own), (residual, own)
