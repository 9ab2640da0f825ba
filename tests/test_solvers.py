"""Tests of optax_mtl._src.solvers against exact SciPy solutions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from optax_mtl._src import solvers

SIZES = (2, 5, 16, 64)
KINDS = ("well", "ill", "rank", "zero", "duplicate")


# --------------------------------------------------------------------------
# Random instances and exact SciPy references.
# --------------------------------------------------------------------------


def make_jacobian(rng, num_tasks, kind):
  """A random Jacobian [T, n] of the given kind (no scale yet)."""
  width = int(rng.integers(1, num_tasks + 1)) if kind == "rank" else (
      2 * num_tasks + 3)
  jacobian = rng.normal(size=(num_tasks, width))
  if kind == "ill":
    jacobian *= np.logspace(0, -4, num_tasks)[:, None]
  if kind == "zero":
    jacobian[rng.integers(num_tasks)] = 0.0
  if kind == "duplicate":
    jacobian[-1] = jacobian[0]
  return jacobian


def instances(seed, count=None, sizes=SIZES):
  """(T, kind, G) over the sizes and every kind, scales 1e-10 ... 1e10."""
  rng = np.random.default_rng(seed)
  cases = [(t, k) for t in sizes for k in KINDS]
  if count is not None:
    cases = [cases[i] for i in rng.choice(len(cases), count, replace=False)]
  for num_tasks, kind in cases:
    jacobian = make_jacobian(rng, num_tasks, kind)
    scale = 10.0 ** rng.uniform(-5, 5)  # G entries from 1e-10 to 1e10.
    jacobian = jacobian * scale
    yield num_tasks, kind, jacobian @ jacobian.T


def normalised(gramian):
  return gramian / np.max(np.diag(gramian))


def factor(gramian):
  """Rows R with R Rᵀ = G (the task gradients up to a rotation)."""
  eigenvalues, eigenvectors = np.linalg.eigh(gramian)
  return eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))


def scipy_min_norm_rows(rows):
  """Exact min-norm weights of conv(rows) by NNLS.

  With ``λ = s w`` (``w`` on the simplex), ``‖Rᵀλ‖² + (1ᵀλ - 1)²`` is
  ``s² ‖Rᵀw‖² + (s - 1)²``: the NNLS solution normalised is the min-norm
  point's weights.
  """
  num_tasks = rows.shape[0]
  matrix = np.vstack([rows.T, np.ones((1, num_tasks))])
  target = np.zeros(matrix.shape[0])
  target[-1] = 1.0
  solution, _ = scipy.optimize.nnls(matrix, target, maxiter=50 * num_tasks)
  return solution / solution.sum()


def scipy_min_norm(gramian):
  gramian = normalised(gramian)
  weights = scipy_min_norm_rows(factor(gramian))
  return weights @ gramian @ weights


def scipy_dual_cone_qp(gramian, lower):
  """min_{v >= u} vᵀGv as bounded least squares: min_{v >= u} ‖Rᵀv‖.

  (BVLS rather than ``nnls``: SciPy's ``nnls`` diverges on a zero column,
  i.e. a zero task gradient.)
  """
  gramian = normalised(gramian)
  rows = factor(gramian)
  solution = scipy.optimize.lsq_linear(
      rows.T, np.zeros(rows.shape[1]), bounds=(lower, np.inf), method="bvls",
      tol=1e-15).x
  return solution @ gramian @ solution


def cagrad_objective(gramian, c, weights):
  mean = np.full(len(weights), 1.0 / len(weights))
  radius = c * np.sqrt(max(mean @ gramian @ mean, 0.0))
  return weights @ gramian @ mean + radius * np.sqrt(
      max(weights @ gramian @ weights, 0.0))


def scipy_cagrad(gramian, c):
  """Exact optimum of the CAGrad dual, by NNLS and Brent's method.

  ``r‖x‖ = min_τ ‖x‖²/(2τ) + τr²/2`` turns the dual into
  ``min_τ min_{w∈Δ} ‖Rᵀ(w + τm)‖²/(2τ) + const``: for fixed τ the min-norm
  point of the shifted rows ``R + τ 1 g_0ᵀ``, and the optimal τ solves
  ``‖Rᵀw(τ)‖ = r τ``.
  """
  gramian = normalised(gramian)
  num_tasks = len(gramian)
  rows = factor(gramian)
  mean_gradient = rows.mean(axis=0)
  radius = c * np.linalg.norm(mean_gradient)

  def weights_at(tau):
    return scipy_min_norm_rows(rows + tau * mean_gradient[None, :])

  def excess(tau):
    return np.linalg.norm(weights_at(tau) @ rows) - radius * tau

  low, high = 1e-12, 1.0
  while excess(high) > 0:
    high *= 2.0
  if excess(low) <= 0:
    weights = weights_at(low)
  else:
    tau = scipy.optimize.brentq(excess, low, high, xtol=1e-15, rtol=1e-14)
    weights = weights_at(tau)
  del num_tasks
  return cagrad_objective(gramian, c, weights)


def scipy_project_simplex(vector):
  """The threshold θ with Σ max(x - θ, 0) = 1, by Brent's method."""
  excess = lambda theta: np.maximum(vector - theta, 0.0).sum() - 1.0
  theta = scipy.optimize.brentq(excess, vector.min() - 1.0, vector.max(),
                                xtol=1e-15)
  return np.maximum(vector - theta, 0.0)


# --------------------------------------------------------------------------
# Jitted solvers, compiled once per (size, dtype).
# --------------------------------------------------------------------------

MIN_NORM_64 = jax.jit(functools.partial(solvers.solve_min_norm,
                                        max_iters=20000, tol=1e-13))
DUAL_CONE_64 = jax.jit(functools.partial(solvers.solve_dual_cone_qp,
                                         max_iters=500, tol=1e-11))
CAGRAD_64 = jax.jit(functools.partial(solvers.solve_cagrad, max_iters=20000,
                                      tol=1e-13))
MIN_NORM_32 = jax.jit(functools.partial(solvers.solve_min_norm,
                                        max_iters=2000))
DUAL_CONE_32 = jax.jit(functools.partial(solvers.solve_dual_cone_qp,
                                         max_iters=200))
CAGRAD_32 = jax.jit(functools.partial(solvers.solve_cagrad, max_iters=2000))


# Objectives are compared on G / max_k G_kk: 1e-6 relative, plus this much
# absolute where the optimum is zero (0 in the hull, rank-deficient G), which
# is the accuracy of the SciPy references themselves there.
ATOL_64 = 1e-10


def assert_same_objective(ours, reference, rtol, atol, context):
  assert abs(ours - reference) <= rtol * abs(reference) + atol, (
      f"{context}: objective {ours!r} vs SciPy {reference!r}")


def test_min_norm_matches_scipy_float64():
  with jax.enable_x64(True):
    for num_tasks, kind, gramian in instances(seed=0):
      result = MIN_NORM_64(jnp.asarray(gramian))
      weights = np.asarray(result.weights)
      assert result.weights.dtype == jnp.float64
      np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)
      assert weights.min() >= 0.0
      ours = weights @ normalised(gramian) @ weights
      assert_same_objective(ours, scipy_min_norm(gramian), 1e-6, ATOL_64,
                            f"T={num_tasks} {kind}")
      assert float(result.gap) <= 1e-13 or not bool(result.converged)


def test_dual_cone_qp_matches_scipy_float64():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    for num_tasks, kind, gramian in instances(seed=1):
      lower = rng.normal(size=num_tasks)
      result = DUAL_CONE_64(jnp.asarray(gramian), jnp.asarray(lower))
      solution = np.asarray(result.weights)
      assert result.weights.dtype == jnp.float64
      assert bool(result.converged), (num_tasks, kind, float(result.gap))
      assert np.all(solution >= lower - 1e-12)
      # Non-conflicting: J (Jᵀv) = G v >= 0.
      assert np.all(normalised(gramian) @ solution >= -1e-10)
      ours = solution @ normalised(gramian) @ solution
      assert_same_objective(ours, scipy_dual_cone_qp(gramian, lower), 1e-6,
                            ATOL_64, f"T={num_tasks} {kind}")


DUAL_CONE_WARM_64 = jax.jit(functools.partial(solvers.solve_dual_cone_qp,
                                              max_iters=500, tol=1e-11))


def test_dual_cone_qp_warm_start_matches_scipy_float64():
  # A guess only moves the start of the search: from the exact solution no
  # iteration is left; from a perturbed one, a random one, or one that is
  # infeasible, the optimum is the same as SciPy's.
  rng = np.random.default_rng(11)
  with jax.enable_x64(True):
    for num_tasks, kind, gramian in instances(seed=11):
      context = f"T={num_tasks} {kind}"
      lower = rng.normal(size=num_tasks)
      reference = scipy_dual_cone_qp(gramian, lower)
      cold = DUAL_CONE_64(jnp.asarray(gramian), jnp.asarray(lower))
      exact = DUAL_CONE_WARM_64(jnp.asarray(gramian), jnp.asarray(lower),
                                warm_start=cold.weights)
      assert int(exact.iterations) == 0, context
      guesses = {
          "exact": np.asarray(cold.weights),
          "perturbed": np.asarray(cold.weights) * rng.uniform(
              0.5, 1.5, num_tasks),
          "random": lower + rng.exponential(size=num_tasks) * (
              rng.random(num_tasks) < 0.5),
          "all free": lower + 1.0}
      for name, guess in guesses.items():
        result = DUAL_CONE_WARM_64(jnp.asarray(gramian), jnp.asarray(lower),
                                   warm_start=jnp.asarray(guess))
        solution = np.asarray(result.weights)
        assert bool(result.converged), (context, name, float(result.gap))
        assert np.all(solution >= lower - 1e-12), (context, name)
        assert np.all(normalised(gramian) @ solution >= -1e-10), (context,
                                                                  name)
        assert_same_objective(solution @ normalised(gramian) @ solution,
                              reference, 1e-6, ATOL_64, f"{context} {name}")


MIN_NORM_WARM_64 = jax.jit(functools.partial(solvers.solve_min_norm,
                                             max_iters=20000, tol=1e-13))
CAGRAD_WARM_64 = jax.jit(functools.partial(solvers.solve_cagrad,
                                           max_iters=20000, tol=1e-13))


def test_frank_wolfe_warm_start_matches_scipy_float64():
  # From the exact solution no iteration is left; from any other guess (a
  # perturbed solution, a random point off the simplex, a non-finite one)
  # the optimum is the same as SciPy's.
  rng = np.random.default_rng(12)
  with jax.enable_x64(True):
    for num_tasks, kind, gramian in instances(seed=12, count=12,
                                              sizes=(5, 16, 64)):
      c = float(rng.uniform(0.1, 0.9))
      cases = (
          ("min_norm", MIN_NORM_64, MIN_NORM_WARM_64, (),
           lambda w: w @ normalised(gramian) @ w, scipy_min_norm(gramian)),
          ("cagrad", CAGRAD_64, CAGRAD_WARM_64, (c,),
           lambda w: cagrad_objective(normalised(gramian), c, w),
           scipy_cagrad(gramian, c)))
      for name, cold_solver, warm_solver, args, objective, reference in cases:
        context = f"{name} T={num_tasks} {kind}"
        cold = cold_solver(jnp.asarray(gramian), *args)
        exact = warm_solver(jnp.asarray(gramian), *args,
                            warm_start=cold.weights)
        if bool(cold.converged):  # (64 ill-conditioned tasks may not.)
          assert int(exact.iterations) == 0, context
        guesses = {
            "perturbed": np.asarray(cold.weights) * rng.uniform(
                0.5, 1.5, num_tasks),
            "random": rng.normal(size=num_tasks),
            "non-finite": np.full(num_tasks, np.nan)}
        for guess_name, guess in guesses.items():
          result = warm_solver(jnp.asarray(gramian), *args,
                               warm_start=jnp.asarray(guess))
          weights = np.asarray(result.weights)
          np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)
          assert weights.min() >= 0.0, (context, guess_name)
          assert_same_objective(objective(weights), reference, 1e-6, ATOL_64,
                                f"{context} {guess_name}")


def test_cagrad_matches_scipy_float64():
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    for num_tasks, kind, gramian in instances(seed=2, count=16):
      c = float(rng.uniform(0.1, 0.9))
      result = CAGRAD_64(jnp.asarray(gramian), c)
      weights = np.asarray(result.weights)
      assert result.weights.dtype == jnp.float64
      np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)
      assert weights.min() >= 0.0
      ours = cagrad_objective(normalised(gramian), c, weights)
      assert_same_objective(ours, scipy_cagrad(gramian, c), 1e-6, ATOL_64,
                            f"T={num_tasks} {kind} c={c}")


def test_solvers_match_scipy_float32():
  rng = np.random.default_rng(3)
  for num_tasks, kind, gramian in instances(seed=3, sizes=(5, 16)):
    gramian32 = jnp.asarray(gramian, jnp.float32)
    scale = np.asarray(normalised(np.asarray(gramian32, np.float64)))
    context = f"T={num_tasks} {kind}"
    result = MIN_NORM_32(gramian32)
    assert result.weights.dtype == jnp.float32
    weights = np.asarray(result.weights, np.float64)
    assert_same_objective(weights @ scale @ weights, scipy_min_norm(scale),
                          1e-3, 1e-5, context)
    lower = rng.normal(size=num_tasks)
    result = DUAL_CONE_32(gramian32, jnp.asarray(lower, jnp.float32))
    assert result.weights.dtype == jnp.float32
    solution = np.asarray(result.weights, np.float64)
    assert np.all(scale @ solution >= -1e-4 * np.abs(lower).sum())
    assert_same_objective(solution @ scale @ solution,
                          scipy_dual_cone_qp(scale, lower), 1e-3,
                          1e-4 * (1 + np.sum(lower**2)), context)
    result = CAGRAD_32(gramian32, 0.5)
    assert result.weights.dtype == jnp.float32
    weights = np.asarray(result.weights, np.float64)
    assert_same_objective(cagrad_objective(scale, 0.5, weights),
                          scipy_cagrad(scale, 0.5), 1e-3, 1e-5, context)



def test_dual_cone_qp_converges_in_float32_on_forty_tasks():
  # UPGrad's T problems on one float32 Gramian of every kind (rank-deficient,
  # duplicated and zero gradients, ill-conditioned): all converge, finite,
  # and the direction conflicts with no task beyond float32 round-off.
  solve_all = jax.jit(jax.vmap(solvers.solve_dual_cone_qp,
                               in_axes=(None, 0)))
  for num_tasks, kind, gramian in instances(seed=13, sizes=(40,)):
    gramian32 = jnp.asarray(gramian, jnp.float32)
    result = solve_all(gramian32, jnp.eye(num_tasks, dtype=jnp.float32))
    solutions = np.asarray(result.weights, np.float64)
    assert np.all(np.isfinite(solutions)), kind
    assert bool(np.all(result.converged)), kind
    scale = normalised(np.asarray(gramian32, np.float64))
    assert np.all(scale @ solutions.T >= -1e-4), kind

@pytest.mark.parametrize("exponent", [-10, 10])
def test_weights_do_not_depend_on_the_scale(exponent):
  rng = np.random.default_rng(4)
  jacobian = rng.normal(size=(5, 8))
  with jax.enable_x64(True):
    gramian = jnp.asarray(jacobian @ jacobian.T)
    scaled = gramian * 10.0**exponent
    lower = jnp.asarray(rng.normal(size=5))
    for solve, args in ((MIN_NORM_64, ()), (DUAL_CONE_64, (lower,)),
                        (CAGRAD_64, (0.5,))):
      np.testing.assert_allclose(solve(scaled, *args).weights,
                                 solve(gramian, *args).weights, atol=1e-7)
  gramian32 = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  lower32 = jnp.asarray(lower, jnp.float32)
  for solve, args in ((MIN_NORM_32, ()), (DUAL_CONE_32, (lower32,)),
                      (CAGRAD_32, (0.5,))):
    np.testing.assert_allclose(
        solve(gramian32 * np.float32(10.0**exponent), *args).weights,
        solve(gramian32, *args).weights, atol=1e-3)


def test_min_norm_kkt_conditions():
  # (Gw)_k >= wᵀGw for every k, with equality where w_k > 0.
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    for _ in range(5):
      jacobian = rng.normal(size=(5, 3))
      gramian = normalised(jacobian @ jacobian.T)
      weights = np.asarray(MIN_NORM_64(jnp.asarray(gramian)).weights)
      product, value = gramian @ weights, weights @ gramian @ weights
      assert np.all(product >= value - 1e-12)
      assert np.all(np.abs(weights * (product - value)) <= 1e-12)


def test_min_norm_two_tasks_closed_form():
  gramian = jnp.array([[4.0, 1.0], [1.0, 1.0]])
  result = MIN_NORM_32(gramian)
  # w_1 = (G_22 - G_12) / (G_11 + G_22 - 2 G_12) = 0 / 3.
  np.testing.assert_allclose(result.weights, [0.0, 1.0], atol=1e-7)
  assert int(result.iterations) == 0 and bool(result.converged)
  identical = jnp.ones((2, 2))
  np.testing.assert_allclose(MIN_NORM_32(identical).weights, [0.5, 0.5])


def test_single_task_and_zero_gramian():
  one = solvers.solve_min_norm(jnp.ones((1, 1)))
  np.testing.assert_allclose(one.weights, [1.0])
  zero = MIN_NORM_32(jnp.zeros((4, 4)))
  np.testing.assert_allclose(zero.weights, np.full(4, 0.25))
  assert bool(zero.converged)
  qp = DUAL_CONE_32(jnp.zeros((3, 3)), jnp.array([1.0, -1.0, 0.0]))
  np.testing.assert_allclose(qp.weights, [1.0, -1.0, 0.0])
  cagrad = CAGRAD_32(jnp.zeros((3, 3)), 0.5)
  np.testing.assert_allclose(cagrad.weights, np.full(3, 1 / 3), rtol=1e-6)


def test_diagnostics_report_an_unfinished_solve():
  rng = np.random.default_rng(6)
  jacobian = rng.normal(size=(16, 40)) * np.logspace(0, -3, 16)[:, None]
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  lower = jnp.asarray(rng.normal(size=16), jnp.float32)
  for result in (solvers.solve_min_norm(gramian, max_iters=1),
                 solvers.solve_dual_cone_qp(gramian, lower, max_iters=1),
                 solvers.solve_cagrad(gramian, 0.5, max_iters=1)):
    assert int(result.iterations) == 1
    assert not bool(result.converged)
    assert float(result.gap) > 0
  for result in (MIN_NORM_32(gramian), DUAL_CONE_32(gramian, lower),
                 CAGRAD_32(gramian, 0.5)):
    assert bool(result.converged)
    assert result.iterations.dtype == jnp.int32
    assert result.converged.dtype == jnp.bool_


def test_permutation_invariance():
  rng = np.random.default_rng(7)
  jacobian = rng.normal(size=(5, 4))
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  lower = jnp.asarray(rng.normal(size=5), jnp.float32)
  order = rng.permutation(5)
  permuted = gramian[order][:, order]
  for solve, args, permuted_args in (
      (MIN_NORM_32, (), ()), (DUAL_CONE_32, (lower,), (lower[order],)),
      (CAGRAD_32, (0.5,), (0.5,))):
    np.testing.assert_allclose(solve(permuted, *permuted_args).weights,
                               solve(gramian, *args).weights[order],
                               atol=2e-4)


def test_project_simplex_matches_scipy():
  rng = np.random.default_rng(8)
  with jax.enable_x64(True):
    project = jax.jit(solvers.project_simplex)
    for size in (1, 2, 5, 64):
      for scale in (1e-3, 1.0, 1e3):
        vector = rng.normal(size=size) * scale
        ours = project(jnp.asarray(vector))
        assert ours.dtype == jnp.float64
        np.testing.assert_allclose(ours, scipy_project_simplex(vector),
                                   atol=1e-12)
  np.testing.assert_allclose(
      solvers.project_simplex(jnp.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5],
      atol=1e-7)
  np.testing.assert_allclose(
      solvers.project_simplex(jnp.array([1.0, 1.0])), [0.5, 0.5])


@pytest.mark.parametrize("call, message", [
    (lambda: solvers.solve_min_norm(jnp.ones((2, 3))), "gramian"),
    (lambda: solvers.solve_min_norm(jnp.eye(3), max_iters=0), "max_iters"),
    (lambda: solvers.solve_min_norm(jnp.eye(3), tol=-1.0), "tol"),
    (lambda: solvers.solve_dual_cone_qp(jnp.eye(3), jnp.ones(2)), "lower"),
    (lambda: solvers.solve_dual_cone_qp(jnp.eye(3), jnp.ones(3),
                                        max_iters=True), "max_iters"),
    (lambda: solvers.solve_dual_cone_qp(jnp.eye(3), jnp.ones(3),
                                        warm_start=jnp.ones(2)), "warm_start"),
    (lambda: solvers.solve_min_norm(jnp.eye(3), warm_start=jnp.ones(4)),
     "warm_start"),
    (lambda: solvers.solve_cagrad(jnp.eye(3), -0.5), "c"),
    (lambda: solvers.solve_cagrad(jnp.eye(3), 0.5, tol=float("nan")), "tol"),
    (lambda: solvers.project_simplex(jnp.ones((2, 2))), "vector"),
])
def test_argument_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()
