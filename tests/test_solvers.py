"""Tests of optax_mtl._src.solvers against exact solutions (SciPy, float64).

Every solver is compared, on random instances of every kind (well and
ill-conditioned, rank-deficient, a zero gradient, duplicated and exactly
opposite gradients) and at scales 1e-10 … 1e10, with an exact reference:
enumeration of the active sets for T <= 8, SciPy's NNLS / BVLS / Brent
beyond. The stated accuracy follows from each solver's relative test:
``gap <= tol`` bounds the suboptimality by ``tol`` times the objective's
own size, or by the round-off floor.
"""

import functools
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import optax_mtl
from optax_mtl._src import solvers

KINDS = ("well", "ill", "rank", "zero", "duplicate", "opposite")
EXACT_SIZES = (3, 5, 8)  # References by enumeration of the active sets.
LARGE_SIZES = (16, 48)  # References by SciPy's NNLS / BVLS.
TOL_64 = 1e-12  # The float64 default.


# --------------------------------------------------------------------------
# Random instances.
# --------------------------------------------------------------------------


def make_jacobian(rng, num_tasks, kind):
  """A random Jacobian [T, n] of the given kind (unit scale)."""
  width = (int(rng.integers(1, num_tasks)) if kind == "rank"
           else 2 * num_tasks + 3)
  jacobian = rng.normal(size=(num_tasks, width))
  if kind == "ill":
    jacobian *= rng.permutation(np.logspace(0, -4, num_tasks))[:, None]
  if kind == "zero":
    jacobian[rng.integers(num_tasks)] = 0.0
  if kind == "duplicate":
    jacobian[-1] = jacobian[0]
  if kind == "opposite":
    jacobian[1] = -jacobian[0] * rng.uniform(0.5, 2.0)
  return jacobian


def instances(seed, sizes, kinds=KINDS):
  """(T, kind, J, G): every size and kind, at a scale from 1e-10 to 1e10."""
  rng = np.random.default_rng(seed)
  for num_tasks in sizes:
    for kind in kinds:
      jacobian = make_jacobian(rng, num_tasks, kind)
      jacobian = jacobian * 10.0 ** rng.uniform(-5, 5)
      yield num_tasks, kind, jacobian, jacobian @ jacobian.T


def factor(gramian):
  """Rows R with R Rᵀ = G (the task gradients up to a rotation)."""
  eigenvalues, eigenvectors = np.linalg.eigh(gramian)
  return eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))


def support_sets(num_tasks):
  for size in range(1, num_tasks + 1):
    yield from itertools.combinations(range(num_tasks), size)


# --------------------------------------------------------------------------
# Exact references (float64).
# --------------------------------------------------------------------------


def exact_min_norm(gramian):
  """argmin_{w ∈ Δ} wᵀGw: enumeration of supports (T <= 8), else NNLS.

  With ``λ = s w``, ``‖Rᵀλ‖² + (1ᵀλ − 1)²`` is ``s²‖Rᵀw‖² + (s − 1)²``:
  the NNLS solution, normalised, is the min-norm point's weights.
  """
  num_tasks = len(gramian)
  gramian = gramian / max(np.max(np.diag(gramian)), 1e-300)
  if num_tasks > 8:
    rows = factor(gramian)
    matrix = np.vstack([rows.T, np.ones((1, num_tasks))])
    target = np.zeros(matrix.shape[0])
    target[-1] = 1.0
    solution, _ = scipy.optimize.nnls(matrix, target, maxiter=100 * num_tasks)
    return solution / solution.sum()
  best, best_weights = np.inf, None
  for support in support_sets(num_tasks):
    support = list(support)
    size = len(support)
    block = gramian[np.ix_(support, support)]
    scales = 1 / np.sqrt(np.maximum(np.diag(block), 1e-300))
    scaled = block * np.outer(scales, scales)
    if np.linalg.cond(scaled) < 1e10:  # w_S ∝ G_SS⁻¹ 1, Jacobi-scaled.
      solution = scales * np.linalg.solve(scaled, scales)
      solution = solution / solution.sum()
    else:  # Singular: the KKT system in the least-squares sense.
      kkt = np.block([[block, np.ones((size, 1))],
                      [np.ones((1, size)), np.zeros((1, 1))]])
      solution = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0],
                                 rcond=None)[0][:size]
    weights = np.zeros(num_tasks)
    weights[support] = solution
    if weights.min() < -1e-12 or abs(weights.sum() - 1) > 1e-9:
      continue
    weights = np.clip(weights, 0, None)
    weights /= weights.sum()
    value = weights @ gramian @ weights
    if value < best:
      best, best_weights = value, weights
  return best_weights


def exact_dual_cone(gramian, lower):
  """argmin_{v ≥ u} vᵀGv: enumeration of free sets (T <= 8), else BVLS.

  Returns ``v``; ``Jᵀv`` (the projection) and ``vᵀGv`` are unique.
  """
  num_tasks = len(gramian)
  if num_tasks > 8:
    rows = factor(gramian)
    return scipy.optimize.lsq_linear(
        rows.T, np.zeros(rows.shape[1]), bounds=(lower, np.inf),
        method="bvls", tol=1e-15).x
  linear = gramian @ lower
  scale = np.sqrt(np.diag(gramian)).max() ** 2 * (1 + np.abs(lower).sum())
  best, best_solution = np.inf, lower.copy()
  for free in itertools.chain([()], support_sets(num_tasks)):
    free = list(free)
    slack = np.zeros(num_tasks)
    if free:
      slack[free] = np.linalg.lstsq(gramian[np.ix_(free, free)],
                                    -linear[free], rcond=None)[0]
    gradient = gramian @ slack + linear
    if slack.min() < -1e-12 * scale or gradient.min() < -1e-9 * scale:
      continue
    solution = np.clip(slack, 0, None) + lower
    value = solution @ gramian @ solution
    if value < best:
      best, best_solution = value, solution
  return best_solution


def cagrad_objective(gramian, c, weights):
  mean = np.full(len(weights), 1.0 / len(weights))
  radius = c * np.sqrt(max(mean @ gramian @ mean, 0.0))
  return weights @ gramian @ mean + radius * np.sqrt(
      max(weights @ gramian @ weights, 0.0))


def exact_cagrad(gramian, c):
  """min_{w∈Δ} h(w) = wᵀGm + r‖Rᵀw‖, by exact min-norm points and Brent.

  ``r‖x‖ = min_τ ‖x‖²/(2τ) + τr²/2`` gives ``h* = min_τ Φ(τ)`` with
  ``Φ(τ) = min_w wᵀGm + ‖Rᵀw‖²/(2τ) + τr²/2``, convex in ``τ``; its inner
  problem is the min-norm point of the shifted rows ``R + τ 1 g_0ᵀ``.
  Returns the optimal value (the smaller of ``Φ(τ*)`` and ``h(w(τ*))``,
  both upper bounds of ``h*`` that meet at the optimum).
  """
  scale = max(np.max(np.diag(gramian)), 1e-300)
  gramian = gramian / scale  # h is linear in the scale of G.
  rows = factor(gramian)
  mean_gradient = rows.mean(axis=0)
  radius = c * np.linalg.norm(mean_gradient)
  mean = np.full(len(gramian), 1 / len(gramian))

  def weights_at(tau):
    shifted = rows + tau * mean_gradient[None, :]
    return exact_min_norm(shifted @ shifted.T)

  def outer(tau):
    weights = weights_at(tau)
    direction = weights @ rows
    return (weights @ gramian @ mean + direction @ direction / (2 * tau)
            + tau * radius**2 / 2)

  high = 1.0
  while outer(2 * high) < outer(high) and high < 1e12:
    high *= 2
  tau = scipy.optimize.minimize_scalar(
      outer, bounds=(0.0, 4 * high), method="bounded",
      options=dict(xatol=1e-13 * high, maxiter=2000)).x
  tau = max(tau, 1e-300)
  return scale * min(outer(tau), cagrad_objective(gramian, c,
                                                  weights_at(tau)))


def exact_nash(gramian):
  """α > 0 with α ⊙ Gα = 1, by SciPy: L-BFGS-B on the convex potential
  ``½ βᵀCβ − Σ log β``, then the hybrid Powell root of ``β ⊙ Cβ = 1``
  from there (``α_i = β_i / ‖g_i‖``); checked to a residual of 1e-12.
  """
  norms = np.sqrt(np.diag(gramian))
  active = norms > 0
  cosines = gramian[np.ix_(active, active)] / np.outer(norms[active],
                                                       norms[active])
  size = active.sum()
  potential = scipy.optimize.minimize(
      lambda beta: 0.5 * beta @ cosines @ beta - np.sum(np.log(beta)),
      np.ones(size), jac=lambda beta: cosines @ beta - 1 / beta,
      method="L-BFGS-B", bounds=[(1e-12, None)] * size,
      options=dict(ftol=1e-15, gtol=1e-12, maxiter=10000)).x
  residual = lambda beta: beta * (cosines @ beta) - 1
  solution = scipy.optimize.root(
      residual, potential, method="hybr", options=dict(xtol=1e-15),
      jac=lambda beta: np.diag(cosines @ beta) + beta[:, None] * cosines).x
  assert np.max(np.abs(residual(solution))) < 1e-12
  alpha = np.zeros(len(gramian))
  alpha[active] = solution / norms[active]
  return alpha


def has_no_bargaining_solution(gramian):
  """0 lies in the convex hull of the unit gradients (exactly)."""
  norms = np.sqrt(np.diag(gramian))
  active = norms > 1e-300
  cosines = gramian[np.ix_(active, active)] / np.outer(norms[active],
                                                       norms[active])
  weights = exact_min_norm(cosines)
  return weights @ cosines @ weights < 1e-12


def scipy_project_simplex(vector):
  """The threshold θ with Σ max(x - θ, 0) = 1, by Brent's method."""
  excess = lambda theta: np.maximum(vector - theta, 0.0).sum() - 1.0
  theta = scipy.optimize.brentq(excess, vector.min() - 1.0, vector.max(),
                                xtol=1e-15)
  return np.maximum(vector - theta, 0.0)


# --------------------------------------------------------------------------
# Jitted solvers, compiled once per (solver, options, shape, dtype).
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def jitted(name, **options):
  return jax.jit(functools.partial(getattr(solvers, name), **options))


def assert_result_types(result, dtype):
  assert result.weights.dtype == dtype
  assert result.gap.dtype == dtype
  assert result.iterations.dtype == jnp.int32
  assert result.outcome.dtype == jnp.int32
  assert result.converged.dtype == jnp.bool_
  assert np.all(np.asarray(result.converged) == (
      np.asarray(result.outcome) == solvers.Outcome.SUCCESS))


def float64_solves(name, seed, sizes):
  """Yields ``(context, kind, J, G, result)``: the solver ``name`` on each
  float64 instance (x64 on while the caller checks it); the result's dtypes
  are checked."""
  with jax.enable_x64(True):
    for num_tasks, kind, jacobian, gramian in instances(seed, sizes):
      result = jitted(name)(jnp.asarray(gramian))
      assert_result_types(result, jnp.float64)
      yield f"T={num_tasks} {kind}", kind, jacobian, gramian, result


# --------------------------------------------------------------------------
# float64: every solver against its exact solution.
# --------------------------------------------------------------------------


def check_min_norm(jacobian, result, context, rtol, floor):
  """The answer's suboptimality and direction error, against the exact one.

  ``gap ≤ tol`` means ``f(w) − f* ≤ tol f(w)`` (or at the floor), hence
  ``‖d − d*‖² ≤ f(w) − f*``.
  """
  rows = jacobian
  gramian = rows @ rows.T
  reference = exact_min_norm(gramian)
  weights = np.asarray(result.weights, np.float64)
  assert weights.min() >= 0.0, context
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6, err_msg=context)
  value = max(weights @ gramian @ weights, 0.0)
  best = max(reference @ gramian @ reference, 0.0)
  largest = np.max(np.diag(gramian))
  assert value - best <= rtol * best + floor * largest, (
      f"{context}: f = {value!r}, exact {best!r}")
  error = np.linalg.norm((weights - reference) @ rows)
  assert error <= np.sqrt(rtol) * np.sqrt(best) + np.sqrt(
      floor * largest), f"{context}: ‖d − d*‖ = {error!r}"


def test_min_norm_matches_exact_float64():
  for context, kind, jacobian, _, result in float64_solves(
      "solve_min_norm", 0, EXACT_SIZES + LARGE_SIZES):
    assert bool(result.converged), (context, result)
    check_min_norm(jacobian, result, context, rtol=2 * TOL_64, floor=1e-13)
    if kind == "zero":  # d = 0 exactly: all weight on the zero task.
      np.testing.assert_array_equal(
          np.asarray(result.weights) @ jacobian, 0.0, err_msg=context)


def test_min_norm_of_gradients_of_very_different_norms():
  # Norms 1 … 1e4: the min-norm point is far below the largest norm, and
  # the relative stopping test still gives d within √tol of the optimum.
  with jax.enable_x64(True):
    for num_tasks in (3, 5, 8):
      for seed in range(10):
        rng = np.random.default_rng(seed)
        jacobian = rng.standard_normal((num_tasks, 8))
        jacobian = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
        jacobian *= rng.permutation(np.logspace(0, 4, num_tasks))[:, None]
        gramian = jacobian @ jacobian.T
        result = jitted("solve_min_norm")(jnp.asarray(gramian))
        assert bool(result.converged)
        direction = np.asarray(result.weights) @ jacobian
        exact = exact_min_norm(gramian) @ jacobian
        error = np.linalg.norm(direction - exact) / np.linalg.norm(exact)
        assert error <= 1e-6, (num_tasks, seed, error)


def check_dual_cone(jacobian, lower, result, context, rtol,
                    dtype=np.float64):
  """Feasible and as close to the exact projection as the tolerance says.

  ``gap ≤ tol``: no task conflicts with ``d = Jᵀv`` by a cosine beyond
  ``tol`` (relative to ``‖d‖``), up to the round-off floor
  ``T ε Σ_k ‖g_k‖ (|v_k − u_k| + |u_k|)`` of ``G v``.
  """
  rows = jacobian
  gramian = rows @ rows.T
  solution = np.asarray(result.weights, np.float64)
  reference = exact_dual_cone(gramian, lower)
  norms = np.sqrt(np.diag(gramian))
  size = np.linalg.norm(reference @ rows)
  floor = 8 * len(lower) * np.finfo(dtype).eps * (
      (np.abs(solution - lower) + np.abs(lower)) @ norms)
  assert np.all(solution >= lower - 1e-12 * np.abs(lower)), context
  # J d = G v ≥ 0, as cosines times ‖d‖.
  conflict = (gramian @ solution) / np.where(norms > 0, norms, 1)
  assert conflict.min() >= -(rtol * size + floor), (context, conflict.min())
  error = np.linalg.norm((solution - reference) @ rows)
  assert error <= np.sqrt(rtol) * size + np.sqrt(floor * size) + 4 * floor, (
      f"{context}: ‖d − d*‖ = {error!r}, ‖d*‖ = {size!r}")


def test_dual_cone_qp_matches_exact_float64():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    for num_tasks, kind, jacobian, gramian in instances(
        1, EXACT_SIZES + LARGE_SIZES):
      context = f"T={num_tasks} {kind}"
      for lower in (rng.normal(size=num_tasks),
                    np.eye(num_tasks)[rng.integers(num_tasks)]):
        result = jitted("solve_dual_cone_qp")(jnp.asarray(gramian),
                                              jnp.asarray(lower))
        assert_result_types(result, jnp.float64)
        assert bool(result.converged), (context, result)
        check_dual_cone(jacobian, lower, result, context, rtol=1e-10)
        if kind == "zero":  # The zero-gradient task keeps v_k = u_k.
          zero = np.diag(gramian) == 0
          np.testing.assert_array_equal(np.asarray(result.weights)[zero],
                                        lower[zero], err_msg=context)


def test_dual_cone_qp_batch_matches_single_problems():
  # UPGrad's T problems u = e_i in one batched call: each row as its own
  # solve, and as jax.vmap of the single-problem call.
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    for num_tasks, kind, jacobian, gramian in instances(2, (8,)):
      lowers = np.eye(num_tasks)
      batch = jitted("solve_dual_cone_qp")(jnp.asarray(gramian),
                                           jnp.asarray(lowers))
      assert batch.weights.shape == (num_tasks, num_tasks)
      assert batch.gap.shape == (num_tasks,)
      assert bool(np.all(batch.converged)), kind
      mapped = jax.jit(jax.vmap(solvers.solve_dual_cone_qp,
                                in_axes=(None, 0)))(jnp.asarray(gramian),
                                                    jnp.asarray(lowers))
      np.testing.assert_allclose(mapped.weights, batch.weights, atol=1e-9)
      for row in rng.choice(num_tasks, 3, replace=False):
        single = jitted("solve_dual_cone_qp")(jnp.asarray(gramian),
                                              jnp.asarray(lowers[row]))
        np.testing.assert_allclose(single.weights, batch.weights[row],
                                   atol=1e-9, err_msg=kind)
        check_dual_cone(jacobian, lowers[row],
                        jax.tree.map(lambda leaf, r=row: leaf[r], batch),
                        f"{kind} row {row}", rtol=1e-10)


def test_cagrad_matches_exact_float64():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    for num_tasks, kind, _, gramian in instances(3, EXACT_SIZES + (16,)):
      context = f"T={num_tasks} {kind}"
      c = float(rng.uniform(0.1, 0.9))
      result = jitted("solve_cagrad")(jnp.asarray(gramian), c)
      assert_result_types(result, jnp.float64)
      assert bool(result.converged), (context, result)
      weights = np.asarray(result.weights)
      assert weights.min() >= 0.0
      np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)
      ours = cagrad_objective(gramian, c, weights)
      best = exact_cagrad(gramian, c)
      # Relative to the size of the objective's terms, the round-off floor
      # at the kink (√ε) included.
      norms = np.sqrt(np.diag(gramian))
      size = norms.max() * np.linalg.norm(factor(gramian).mean(axis=0))
      assert abs(ours - best) <= 1e-9 * abs(best) + 1e-7 * size, (
          f"{context}: h = {ours!r}, exact {best!r}")


def test_nash_matches_exact_float64():
  for context, kind, jacobian, gramian, result in float64_solves(
      "solve_nash", 4, EXACT_SIZES + LARGE_SIZES):
    if has_no_bargaining_solution(gramian):
      assert int(result.outcome) == solvers.Outcome.NO_SOLUTION, context
      np.testing.assert_array_equal(result.weights, 0.0)
      continue
    assert bool(result.converged), (context, result)
    alpha = np.asarray(result.weights)
    np.testing.assert_allclose(alpha, exact_nash(gramian), rtol=1e-8,
                               err_msg=context)
    # The bargaining solution: every task's utility g_iᵀd = 1/α_i.
    active = np.diag(gramian) > 0
    utilities = (jacobian @ (alpha @ jacobian))[active]
    np.testing.assert_allclose(utilities * alpha[active], 1.0, rtol=1e-9)
    if kind == "zero":
      np.testing.assert_array_equal(alpha[~active], 0.0)


# --------------------------------------------------------------------------
# float32: the same references, at the stated float32 tolerance.
# --------------------------------------------------------------------------

# float32 tolerances: T ε is 4e-7 … 6e-6 here, above the default tol, so the
# round-off floor decides; the objectives are met to about 1e-4 relative
# (1e-3 at CAGrad's kink, whose floor is √(T ε)).
F32_RTOL = 1e-4


def test_solvers_match_exact_float32():
  rng = np.random.default_rng(5)
  for num_tasks, kind, jacobian, gramian64 in instances(5, (5, 16)):
    context = f"T={num_tasks} {kind}"
    gramian32 = jnp.asarray(gramian64, jnp.float32)
    gramian = np.asarray(gramian32, np.float64)
    result = jitted("solve_min_norm")(gramian32)
    assert_result_types(result, jnp.float32)
    assert bool(result.converged), (context, result)
    check_min_norm(jacobian, result, context, rtol=F32_RTOL, floor=1e-6)
    lower = rng.normal(size=num_tasks).astype(np.float32)
    result = jitted("solve_dual_cone_qp")(gramian32, jnp.asarray(lower))
    assert_result_types(result, jnp.float32)
    assert bool(result.converged), (context, result)
    check_dual_cone(jacobian, lower.astype(np.float64), result, context,
                    rtol=1e-5, dtype=np.float32)
    result = jitted("solve_cagrad")(gramian32, 0.5)
    assert_result_types(result, jnp.float32)
    assert bool(result.converged), (context, result)
    norms = np.sqrt(np.diag(gramian))
    size = norms.max() * np.linalg.norm(factor(gramian).mean(axis=0))
    ours = cagrad_objective(gramian, 0.5, np.asarray(result.weights,
                                                     np.float64))
    best = exact_cagrad(gramian, 0.5)
    assert abs(ours - best) <= F32_RTOL * abs(best) + 1e-3 * size, context
    result = jitted("solve_nash")(gramian32)
    assert_result_types(result, jnp.float32)
    if kind == "opposite":  # Rounded to float32: not solvable in float32.
      assert int(result.outcome) == solvers.Outcome.NO_SOLUTION, context
    elif not has_no_bargaining_solution(gramian) and kind != "rank":
      assert bool(result.converged), (context, result)
      np.testing.assert_allclose(result.weights, exact_nash(gramian),
                                 rtol=1e-3, err_msg=context)


def test_dual_cone_qp_upgrad_forty_tasks_float32():
  # UPGrad's T problems on one float32 Gramian of every kind: all converge,
  # finite, and J d ≥ 0 beyond float32 round-off.
  for num_tasks, kind, _, gramian64 in instances(13, (40,)):
    gramian32 = jnp.asarray(gramian64, jnp.float32)
    result = jitted("solve_dual_cone_qp")(
        gramian32, jnp.eye(num_tasks, dtype=jnp.float32))
    solutions = np.asarray(result.weights, np.float64)
    assert np.all(np.isfinite(solutions)), kind
    assert bool(np.all(result.converged)), (kind, result.gap, result.outcome)
    gramian = np.asarray(gramian32, np.float64)
    norms = np.sqrt(np.diag(gramian))
    conflict = (solutions @ gramian) / np.where(norms > 0, norms, 1)
    sizes = np.sqrt(np.maximum(np.einsum("bi,ij,bj->b", solutions, gramian,
                                         solutions), 0))
    assert np.all(conflict.min(axis=1) >= -1e-4 * (sizes + norms.max())), kind


# --------------------------------------------------------------------------
# Scale invariance, dtypes, degenerate inputs.
# --------------------------------------------------------------------------


def scaled_solutions(gramian, scale, lower):
  return {
      "min_norm": jitted("solve_min_norm")(gramian * scale).weights,
      "dual_cone": jitted("solve_dual_cone_qp")(gramian * scale,
                                                lower).weights,
      "cagrad": jitted("solve_cagrad")(gramian * scale, 0.5).weights,
      # α scales as c^{-1/2}.
      "nash": jitted("solve_nash")(gramian * scale).weights * np.sqrt(scale),
  }


@pytest.mark.parametrize("kind", ["well", "ill", "zero"])
def test_weights_do_not_depend_on_the_scale_float64(kind):
  rng = np.random.default_rng(6)
  jacobian = make_jacobian(rng, 6, kind)
  with jax.enable_x64(True):
    gramian = jnp.asarray(jacobian @ jacobian.T)
    lower = jnp.asarray(rng.normal(size=6))
    reference = scaled_solutions(gramian, 1.0, lower)
    for scale in (1e-40, 1e-20, 1e-10, 1e6, 1e12):
      for name, weights in scaled_solutions(gramian, scale, lower).items():
        np.testing.assert_allclose(weights, reference[name], rtol=1e-9,
                                   atol=1e-12, err_msg=f"{name} c={scale}")
    # A power of two scales G exactly, and the solvers see the same matrix.
    for scale in (2.0**-100, 2.0**60):
      for name, weights in scaled_solutions(gramian, scale, lower).items():
        np.testing.assert_array_equal(weights, reference[name],
                                      err_msg=f"{name} c={scale}")


def test_weights_do_not_depend_on_the_scale_float32():
  # Stated float32 tolerance: 1e-4 on weights of order 1 (the scaled
  # Gramian differs from the unscaled one by its own rounding).
  rng = np.random.default_rng(7)
  jacobian = make_jacobian(rng, 6, "well")
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  lower = jnp.asarray(rng.normal(size=6), jnp.float32)
  reference = scaled_solutions(gramian, 1.0, lower)
  for scale in (1e-30, 1e-12, 1e12, 1e30):
    for name, weights in scaled_solutions(gramian, np.float32(scale),
                                          lower).items():
      np.testing.assert_allclose(weights, reference[name], rtol=1e-4,
                                 atol=1e-4, err_msg=f"{name} c={scale}")


@pytest.mark.parametrize("dtype, expected", [
    (jnp.float64, jnp.float64), (jnp.float32, jnp.float32),
    (jnp.bfloat16, jnp.float32)])
def test_dtypes_are_kept(dtype, expected):
  # Under x64, a float32 Gramian is solved and returned in float32 (no
  # constant promotes it), float64 in float64, and below float32 in float32;
  # warm starts of another dtype are cast.
  rng = np.random.default_rng(8)
  jacobian = rng.normal(size=(4, 6))
  with jax.enable_x64(True):
    gramian = jnp.asarray(jacobian @ jacobian.T, dtype)
    guess = jnp.full((4,), 0.25, jnp.float32)
    for result in (
        solvers.solve_min_norm(gramian, warm_start=guess),
        solvers.solve_cagrad(gramian, 0.5, warm_start=guess),
        solvers.solve_dual_cone_qp(gramian, jnp.ones(4, dtype),
                                   warm_start=jnp.ones(4, jnp.float64)),
        solvers.solve_dual_cone_qp(gramian, jnp.eye(4, dtype=dtype)),
        solvers.solve_nash(gramian)):
      assert_result_types(result, expected)
    assert solvers.project_simplex(jnp.ones(3, dtype)).dtype == expected
    fields = solvers.state_fields(solvers.solve_nash(gramian))
    assert {k: v.dtype for k, v in fields.items()} == {
        "solver_iterations": jnp.int32, "solver_gap": jnp.float32,
        "solver_converged": jnp.bool_, "solver_outcome": jnp.int32}


def test_zero_gradient_tasks_get_exact_weights():
  jacobian = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 1.0],
                       [0.0, 0.0, 0.0]])
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  # MGDA: d = 0, the weight spread over the zero tasks.
  result = solvers.solve_min_norm(gramian)
  np.testing.assert_array_equal(result.weights, [0.0, 0.5, 0.0, 0.5])
  assert bool(result.converged) and int(result.iterations) == 0
  # Dual cone: the zero tasks keep v_k = u_k.
  lower = jnp.array([0.3, -0.7, 1.0, 0.25])
  result = solvers.solve_dual_cone_qp(gramian, lower)
  np.testing.assert_array_equal(np.asarray(result.weights)[[1, 3]],
                                np.asarray(lower)[[1, 3]])
  # Nash: α = 0 for the zero tasks, the others bargain among themselves.
  result = solvers.solve_nash(gramian)
  reduced = solvers.solve_nash(gramian[jnp.array([0, 2])][:, jnp.array([0,
                                                                       2])])
  np.testing.assert_array_equal(np.asarray(result.weights)[[1, 3]], 0.0)
  np.testing.assert_allclose(np.asarray(result.weights)[[0, 2]],
                             reduced.weights, rtol=1e-6)


def test_single_task_two_tasks_and_zero_gramian():
  one = solvers.solve_min_norm(jnp.ones((1, 1)))
  np.testing.assert_array_equal(one.weights, [1.0])
  two = solvers.solve_min_norm(jnp.array([[4.0, 1.0], [1.0, 1.0]]))
  # w_1 = (G_22 - G_12) / (G_11 + G_22 - 2 G_12) = 0 / 3.
  np.testing.assert_allclose(two.weights, [0.0, 1.0], atol=1e-7)
  assert int(two.iterations) == 0 and bool(two.converged)
  np.testing.assert_allclose(solvers.solve_min_norm(jnp.ones((2, 2))).weights,
                             [0.5, 0.5])
  zero = jnp.zeros((4, 4))
  result = solvers.solve_min_norm(zero)
  np.testing.assert_allclose(result.weights, np.full(4, 0.25))
  assert bool(result.converged)
  result = solvers.solve_dual_cone_qp(zero[:3, :3], jnp.array([1.0, -1.0, 0]))
  np.testing.assert_array_equal(result.weights, [1.0, -1.0, 0.0])
  assert bool(result.converged)
  result = solvers.solve_cagrad(zero[:3, :3], 0.5)
  np.testing.assert_allclose(result.weights, np.full(3, 1 / 3), rtol=1e-6)
  assert bool(result.converged)
  result = solvers.solve_nash(zero)
  np.testing.assert_array_equal(result.weights, 0.0)
  assert bool(result.converged)


# --------------------------------------------------------------------------
# converged is honest: no false positives, no false negatives at optima.
# --------------------------------------------------------------------------


def test_unfinished_solves_report_max_iters():
  rng = np.random.default_rng(9)
  jacobian = rng.normal(size=(16, 40)) * np.logspace(0, -3, 16)[:, None]
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  lower = jnp.asarray(rng.normal(size=16), jnp.float32)
  for result in (solvers.solve_min_norm(gramian, max_iters=1),
                 solvers.solve_dual_cone_qp(gramian, lower, max_iters=1),
                 solvers.solve_cagrad(gramian, 0.5, max_iters=1),
                 solvers.solve_nash(gramian, max_iters=1)):
    assert int(result.iterations) == 1
    assert not bool(result.converged)
    assert int(result.outcome) == solvers.Outcome.MAX_ITERS
    assert float(result.gap) > 1e-6


def test_reported_gaps_are_the_documented_relative_measures():
  # After one iteration from a poor start, each solver's gap is its
  # documented measure, relative to the problem's own scale (so that an
  # absolute test, met far from the optimum when the gradients are small,
  # would fail here).
  rng = np.random.default_rng(15)
  jacobian = rng.normal(size=(6, 9)) * np.logspace(0, -4, 6)[:, None]
  with jax.enable_x64(True):
    gramian = jacobian @ jacobian.T
    scaled = gramian / np.max(np.diag(gramian))
    result = solvers.solve_min_norm(jnp.asarray(gramian), max_iters=1)
    weights = np.asarray(result.weights)
    product = scaled @ weights
    value = weights @ product
    np.testing.assert_allclose(result.gap, 2 * (value - product.min()) / value,
                               rtol=1e-6)
    lower = np.eye(6)[0]
    result = solvers.solve_dual_cone_qp(jnp.asarray(gramian),
                                        jnp.asarray(lower), max_iters=1)
    norms = np.sqrt(np.diag(gramian))
    solution = np.asarray(result.weights)
    cosines = (jacobian @ (solution @ jacobian)) / norms  # ĝ_kᵀ d.
    slack = solution - lower
    violation = np.where(slack > 0, np.abs(cosines), np.maximum(-cosines, 0))
    np.testing.assert_allclose(
        result.gap, violation.max() / np.linalg.norm(solution @ jacobian),
        rtol=1e-6)
    result = solvers.solve_nash(jnp.asarray(gramian), max_iters=1)
    alpha = np.asarray(result.weights)
    np.testing.assert_allclose(result.gap,
                               np.max(np.abs(alpha * (gramian @ alpha) - 1)),
                               rtol=1e-6)


def test_a_warm_start_at_the_exact_optimum_is_certified_float64():
  # Warm-started from the exact SciPy solution, every solver certifies it
  # (converged, gap within tol) in at most two trips and stays there: the
  # stopping test does not miss optimal points. Not "in zero trips": on some
  # CPUs the summation order leaves the first certificate a few ε above tol.
  # (At tol = 1e-9: the references, by lstsq on ill-conditioned blocks, are
  # not exact to 1e-12.)
  tol = 1e-9
  with jax.enable_x64(True):
    for num_tasks, kind, _, gramian in instances(10, EXACT_SIZES):
      context = f"T={num_tasks} {kind}"
      lower = np.eye(num_tasks)[0]
      for name, exact, args in (
          ("solve_min_norm", exact_min_norm(gramian), ()),
          ("solve_dual_cone_qp", exact_dual_cone(gramian, lower),
           (jnp.asarray(lower),))):
        result = jitted(name, tol=tol)(jnp.asarray(gramian), *args,
                                       warm_start=jnp.asarray(exact))
        assert bool(result.converged), (context, name, result)
        assert float(result.gap) <= tol, (context, name, result)
        assert int(result.iterations) <= 2, (context, name, result)
        # It stays at the optimum: the objective ½wᵀGw exceeds the exact
        # one by at most tol relative, or by the round-off of the sum it
        # is (T·ε·½|w|ᵀ|G||w|; rank-deficient G has many optimal w).
        weights = np.asarray(result.weights)
        objective = lambda w: 0.5 * w @ gramian @ w
        round_off = (num_tasks * np.finfo(np.float64).eps * 0.5
                     * np.abs(weights) @ np.abs(gramian) @ np.abs(weights))
        assert objective(weights) <= (objective(exact) * (1 + tol)
                                      + round_off), (
            context, name, weights, exact)


@pytest.mark.parametrize("x64", [False, True])
def test_cagrad_certifies_pareto_stationary_optima(x64):
  # With 0 in the hull the optimum can have g_w = 0 (a kink of h); the
  # solver must certify it in a few iterations instead of running
  # max_iters, and the value must be the exact one.
  rng = np.random.default_rng(11)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    for num_tasks in (3, 4, 6):
      for trial in range(4):
        jacobian = rng.normal(size=(num_tasks, 10))
        jacobian[1] = -jacobian[0]
        if trial % 2:
          jacobian[2] = 0.0  # And a zero task.
        gramian = jacobian @ jacobian.T
        result = jitted("solve_cagrad")(jnp.asarray(gramian, dtype), 0.5)
        context = f"T={num_tasks} trial {trial}"
        assert bool(result.converged), (context, result)
        assert int(result.iterations) <= 20, (context, result)
        ours = cagrad_objective(gramian, 0.5, np.asarray(result.weights,
                                                         np.float64))
        best = exact_cagrad(gramian, 0.5)
        size = np.sqrt(np.diag(gramian)).max()**2
        assert abs(ours - best) <= (1e-9 if x64 else 1e-3) * size, context


def test_warm_starts_change_only_the_start():
  # From a perturbed, a random or a non-finite guess the answer is the
  # exact one; from the solver's own answer no iteration is left.
  rng = np.random.default_rng(12)
  with jax.enable_x64(True):
    for num_tasks, kind, jacobian, gramian in instances(12, (5, 16)):
      context = f"T={num_tasks} {kind}"
      lower = rng.normal(size=num_tasks)
      cold = {
          "min_norm": jitted("solve_min_norm")(jnp.asarray(gramian)),
          "cagrad": jitted("solve_cagrad")(jnp.asarray(gramian), 0.5),
          "dual_cone": jitted("solve_dual_cone_qp")(jnp.asarray(gramian),
                                                    jnp.asarray(lower))}
      for name, result in cold.items():
        guesses = {
            "own": np.asarray(result.weights),
            "perturbed": np.asarray(result.weights) * rng.uniform(
                0.5, 1.5, num_tasks),
            "random": rng.normal(size=num_tasks) + (
                lower if name == "dual_cone" else 0),
            "non-finite": np.full(num_tasks, np.nan)}
        for guess_name, guess in guesses.items():
          args = (lower,) if name == "dual_cone" else (
              (0.5,) if name == "cagrad" else ())
          solver = {"min_norm": "solve_min_norm", "cagrad": "solve_cagrad",
                    "dual_cone": "solve_dual_cone_qp"}[name]
          warm = jitted(solver)(jnp.asarray(gramian), *map(jnp.asarray, args),
                                warm_start=jnp.asarray(guess))
          where = f"{context} {name} {guess_name}"
          assert bool(warm.converged), (where, warm)
          if guess_name == "own":  # Certified again, in at most one trip.
            assert int(warm.iterations) <= 1, where
          if name == "min_norm":
            check_min_norm(jacobian, warm, where, rtol=2 * TOL_64,
                           floor=1e-13)
          elif name == "dual_cone":
            check_dual_cone(jacobian, lower, warm, where, rtol=1e-10)
          else:
            ours = cagrad_objective(gramian, 0.5, np.asarray(warm.weights))
            reference = cagrad_objective(gramian, 0.5,
                                         np.asarray(result.weights))
            size = np.sqrt(np.diag(gramian)).max()**2
            assert abs(ours - reference) <= 1e-9 * size, where


# --------------------------------------------------------------------------
# Outcomes, diagnostics, Nash-MTL's degenerate cases.
# --------------------------------------------------------------------------


def test_non_finite_gramian_reports_nonfinite():
  gramian = jnp.array([[1.0, jnp.nan, 0.0], [jnp.nan, 1.0, 0.0],
                       [0.0, 0.0, 1.0]])
  lower = jnp.array([1.0, 0.0, 0.0])
  for result, fallback in (
      (solvers.solve_min_norm(gramian), np.full(3, 1 / 3)),
      (solvers.solve_cagrad(gramian, 0.5), np.full(3, 1 / 3)),
      (solvers.solve_dual_cone_qp(gramian, lower), lower),
      (solvers.solve_nash(gramian), np.zeros(3))):
    assert int(result.outcome) == solvers.Outcome.NONFINITE
    assert not bool(result.converged)
    assert int(result.iterations) <= 1
    np.testing.assert_allclose(result.weights, fallback, rtol=1e-6)


@pytest.mark.parametrize("jacobian", [
    [[1.0, 0.0], [-1.0, 0.0]],  # Exactly opposite.
    [[1.0, 2.0, 0.0], [-2.0, -4.0, 0.0], [0.3, 0.1, 1.0]],  # And a third.
    [[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]],  # 0 in the hull of three.
])
def test_nash_without_a_bargaining_solution(jacobian):
  jacobian = np.asarray(jacobian)
  for dtype in (jnp.float32, jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
      result = solvers.solve_nash(jnp.asarray(jacobian @ jacobian.T, dtype))
      assert int(result.outcome) == solvers.Outcome.NO_SOLUTION
      assert not bool(result.converged)
      assert float(result.gap) == np.inf
      np.testing.assert_array_equal(result.weights, 0.0)
      assert int(result.iterations) < 100


def test_nash_near_opposite_gradients_still_has_a_solution():
  jacobian = np.array([[1.0, 0.0], [-1.0, 0.1]])
  with jax.enable_x64(True):
    gramian = jacobian @ jacobian.T
    result = solvers.solve_nash(jnp.asarray(gramian))
    assert bool(result.converged)
    np.testing.assert_allclose(result.weights, exact_nash(gramian), rtol=1e-9)


def test_state_fields_summarise_one_result_or_a_batch():
  gramian = jnp.array([[1.0, -0.5, 0.0], [-0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])
  single = solvers.solve_min_norm(gramian)
  fields = solvers.state_fields(single)
  assert set(fields) == {"solver_iterations", "solver_gap",
                         "solver_converged", "solver_outcome"}
  assert int(fields["solver_iterations"]) == int(single.iterations)
  assert int(fields["solver_outcome"]) == int(single.outcome)
  batch = solvers.solve_dual_cone_qp(gramian, jnp.eye(3), max_iters=1)
  fields = solvers.state_fields(batch)
  assert int(fields["solver_iterations"]) == int(jnp.max(batch.iterations))
  assert float(fields["solver_gap"]) == float(jnp.max(batch.gap))
  assert bool(fields["solver_converged"]) == bool(jnp.all(batch.converged))
  assert fields["solver_gap"].shape == ()
  # A batch reports its most severe outcome: NONFINITE, NO_SOLUTION,
  # STALLED, MAX_ITERS, SUCCESS, from the worst.
  outcome = solvers.Outcome
  for codes, worst in (
      ([outcome.SUCCESS, outcome.MAX_ITERS], outcome.MAX_ITERS),
      ([outcome.MAX_ITERS, outcome.STALLED], outcome.STALLED),
      ([outcome.STALLED, outcome.NO_SOLUTION], outcome.NO_SOLUTION),
      ([outcome.NO_SOLUTION, outcome.NONFINITE, outcome.SUCCESS],
       outcome.NONFINITE)):
    fake = batch._replace(outcome=jnp.asarray(codes, jnp.int32),
                          gap=jnp.zeros(len(codes)),
                          iterations=jnp.zeros(len(codes), jnp.int32),
                          converged=jnp.ones(len(codes), bool))
    assert int(solvers.state_fields(fake)["solver_outcome"]) == worst


def test_relative_gap_is_the_one_rule():
  gap = solvers.relative_gap(jnp.array([0.0, 1e-8, 1e-3, 1.0, 1.0]),
                             jnp.array([0.0, 1.0, 1.0, 0.0, 2.0]),
                             jnp.array([0.0, 1e-7, 1e-7, 0.0, 0.0]))
  np.testing.assert_allclose(gap, [0.0, 0.0, 1e-3, np.inf, 0.5])
  assert solvers.resolve_cutoff(jnp.float32, 10, 2.0) == pytest.approx(
      10 * 2 * np.finfo(np.float32).eps)
  assert solvers.default_tolerance(jnp.float32) == 1e-6
  assert solvers.default_tolerance(jnp.float64) == 1e-12
  for code in (solvers.Outcome.MAX_ITERS, solvers.Outcome.NONFINITE,
               solvers.Outcome.NO_SOLUTION, solvers.Outcome.STALLED):
    assert solvers.Outcome.message(code)
  assert solvers.Outcome.message(solvers.Outcome.SUCCESS) == ""


def test_helpers():
  np.testing.assert_array_equal(
      solvers.safe_divide(jnp.array([1.0, 2.0]), jnp.array([0.0, 4.0])),
      [0.0, 0.5])
  np.testing.assert_array_equal(
      solvers.gradient_norms(jnp.array([[4.0, 1.0], [1.0, -1e-9]])),
      [2.0, 0.0])
  np.testing.assert_array_equal(
      solvers.inverse_gradient_norms(
          jnp.array([[4.0, 0, 0], [0, 1e-6, 0], [0, 0, 0]]), 1e-2),
      [0.5, 0.0, 0.0])


@pytest.mark.parametrize("largest, exponent", [
    (3.0, 2), (4.0, 3), (0.75, 0), (2.0**-120, -119), (0.0, 1)])
def test_scale_by_power_of_two(largest, exponent):
  # 2^e is the power of two at or above the largest diagonal entry (strictly
  # above an exact power, as frexp puts the largest in [½, 1)); the division
  # is exact, and a zero Gramian stays zero.
  gramian = np.array([[largest, 0.3 * largest], [0.3 * largest, largest / 7]],
                     np.float32)
  scaled, found = solvers.scale_by_power_of_two(jnp.asarray(gramian))
  assert int(found) == exponent
  np.testing.assert_array_equal(scaled, gramian / np.float32(2.0**exponent))
  if largest > 0:
    assert 0.5 <= float(scaled[0, 0]) < 1.0


def test_permutation_invariance():
  rng = np.random.default_rng(13)
  jacobian = rng.normal(size=(5, 4))
  gramian = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
  lower = jnp.asarray(rng.normal(size=5), jnp.float32)
  order = rng.permutation(5)
  permuted = gramian[order][:, order]
  for name, args, permuted_args in (
      ("solve_min_norm", (), ()),
      ("solve_dual_cone_qp", (lower,), (lower[order],)),
      ("solve_cagrad", (0.5,), (0.5,)), ("solve_nash", (), ())):
    np.testing.assert_allclose(
        jitted(name)(permuted, *permuted_args).weights,
        jitted(name)(gramian, *args).weights[order], atol=2e-4, rtol=1e-4)


def test_project_simplex_matches_scipy():
  rng = np.random.default_rng(14)
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
    (lambda: solvers.solve_min_norm(jnp.eye(3), max_iters=2.5), "max_iters"),
    (lambda: solvers.solve_nash(jnp.eye(3), max_iters=True), "max_iters"),
    (lambda: solvers.solve_min_norm(jnp.eye(3), tol=-1.0), "tol"),
    (lambda: solvers.solve_cagrad(jnp.eye(3), 0.5, tol=float("nan")), "tol"),
    (lambda: solvers.solve_nash(jnp.eye(3), tol=float("inf")), "tol"),
    (lambda: solvers.solve_nash(jnp.eye(3), tol=True), "tol"),
    (lambda: solvers.solve_nash(jnp.eye(3), tol="1e-6"), "tol"),
    (lambda: solvers.solve_dual_cone_qp(jnp.eye(3), jnp.ones(2)), "lower"),
    (lambda: solvers.solve_dual_cone_qp(jnp.eye(3), jnp.ones(3),
                                        max_iters=True), "max_iters"),
    (lambda: solvers.solve_dual_cone_qp(jnp.eye(3), jnp.ones(3),
                                        warm_start=jnp.ones(2)), "warm_start"),
    (lambda: solvers.solve_dual_cone_qp(jnp.eye(3), jnp.ones((2, 3)),
                                        warm_start=jnp.ones(3)), "warm_start"),
    (lambda: solvers.solve_min_norm(jnp.eye(3), warm_start=jnp.ones(4)),
     "warm_start"),
    (lambda: solvers.solve_cagrad(jnp.eye(3), -0.5), "c"),
    (lambda: solvers.project_simplex(jnp.ones((2, 2))), "vector"),
])
def test_argument_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_numpy_scalars_are_accepted():
  gramian = jnp.eye(3)
  results = [
      solvers.solve_min_norm(gramian, max_iters=np.int32(5),
                             tol=np.float64(1e-4)),
      solvers.solve_dual_cone_qp(gramian, jnp.ones(3), max_iters=np.int64(5),
                                 tol=np.float32(1e-4)),
      solvers.solve_nash(gramian, max_iters=np.int16(5), tol=np.float32(0))]
  assert all(bool(result.converged) for result in results)


@pytest.mark.parametrize("factory, solver", [
    (optax_mtl.upgrad, solvers.solve_dual_cone_qp),
    (optax_mtl.dualproj, solvers.solve_dual_cone_qp),
    (optax_mtl.mgda, solvers.solve_min_norm),
    (optax_mtl.cagrad, solvers.solve_cagrad),
    (optax_mtl.nash_mtl, solvers.solve_nash),
    (optax_mtl.fairgrad, solvers.solve_alpha_fair),
    (optax_mtl.pcd, solvers.solve_priority_qp)])
def test_strategies_take_their_solvers_budget(factory, solver):
  # The budget closes the signature, keyword-only, with the solver's own
  # defaults (docs/guides/api_rules.md).
  ours = inspect.signature(factory).parameters
  theirs = inspect.signature(solver).parameters
  assert list(ours)[-2:] == ["max_iters", "tol"]
  for name in ("max_iters", "tol"):
    assert ours[name].kind == inspect.Parameter.KEYWORD_ONLY
    assert ours[name].default == theirs[name].default, name
