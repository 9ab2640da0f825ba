"""FairGrad's α-fair allocation ``G w = w^{-1/α}``, by damped Newton steps."""

from __future__ import annotations

from typing import Optional

import chex
import jax.numpy as jnp

from optax_mtl._src.solvers import _common
from optax_mtl._src.solvers import _newton

# The default max_iters of solve_alpha_fair (and of fairgrad).
DEFAULT_MAX_ITERS = 100


def solve_alpha_fair(
    gramian: chex.Array,
    alpha: float,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
    tol: Optional[float] = None,
    warm_start: Optional[chex.Array] = None,
) -> _common.SolverResult:
  r"""The α-fair weights: ``G w = w^{-1/α}``, ``w > 0`` (elementwise).

  .. math::
    (G w)_i = w_i^{-1/\alpha}, \qquad d = \sum_i w_i g_i, \qquad
    g_i^\top d = w_i^{-1/\alpha},

  the optimality condition of FairGrad's α-fair utility (Ban & Ji 2024);
  ``α = 1`` is Nash-MTL's bargaining solution. It is the stationary point of
  the strictly convex ``F(w) = ½ wᵀGw − Σ_i h(w_i)`` on ``w > 0``, with
  ``h(w) = log w`` for α = 1 and ``w^{1−1/α} / (1 − 1/α)`` otherwise.
  Damped Newton steps in the multiplicative form ``w ⊙ (1 + δ)`` with an
  Armijo line search that keeps ``w > 0``; near the solution the full step,
  then a second correction with the same factorisation
  (:func:`_newton.chord_step`).

  Scale: ``G`` is first divided by a power of two ``2^e`` (exact); the
  weights of ``c G`` are ``c^{-α/(α+1)}`` times those of ``G``, so the
  answer does not depend on the gradients' scale beyond that law.

  Stopping test: the relative residual ``max_i |(Gw)_i w_i^{1/α} − 1|``
  (the solvers' relative gap), floored at the round-off of the products.
  A zero-gradient task gets ``w_i = 0``; when some non-negative combination
  of the task gradients cancels (no solution: ``F`` is unbounded below),
  the solver stops before the weights overflow and reports
  ``Outcome.NO_SOLUTION`` with the fallback ``w = 0``.

  Warm start: ``warm_start`` is a guess of the scale-free solution
  ``u_i = w_i G_ii^{α/(α+1)}`` (:func:`scale_free_solution`; for instance the
  previous training step's). It is exact when every gradient's norm
  changes and the gradients are orthogonal, and for any G when all norms
  change by the same factor (``G_ii^{-α/(α+1)}`` is the solution of a
  diagonal G), so that it follows the gradients' norms from step to step;
  ``α = 1`` gives Nash-MTL's ``β``. Its entries that are positive and finite
  replace the cold start's ``w_i = 1`` (on the scaled problem); the others
  (a zero-gradient task's 0, the fallback 0) keep it. ``F`` is strictly
  convex, so the solution is the same; from a nearby guess one or two
  Newton steps meet ``tol``.

  Args:
    gramian: ``G``, [T, T], symmetric positive semi-definite.
    alpha: α > 0.
    max_iters: the most Newton steps.
    tol: the relative residual to reach (None: the dtype's default).
    warm_start: None (a cold start), or a guess of ``u = w ⊙
      diag(G)^{α/(α+1)}``, shape [T] (see above).

  Returns:
    A :class:`SolverResult` with ``weights = w``; ``iterations`` is 0 when
    the warm start already met ``tol``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> result = optax_mtl.solve_alpha_fair(jnp.array([[4.0, 0.0],
    ...                                                [0.0, 1.0]]), alpha=2.0)
    >>> [round(w, 4) for w in result.weights.tolist()]  # w = G_ii^{-2/3}.
    [0.3969, 1.0]

  References:
    Ban & Ji, `Fair Resource Allocation in Multi-Task Learning
    <https://arxiv.org/abs/2402.15638>`_, ICML 2024; Mo & Walrand, "Fair
    end-to-end window-based congestion control", IEEE/ACM Transactions on
    Networking 2000 (α-fairness).
  """
  prepared = _common.prepare_gramian(gramian)
  num_tasks, dtype = prepared.num_tasks, prepared.dtype
  max_iters = _common.check_max_iters(max_iters)
  tol = _common.check_tolerance(tol, dtype)
  inverse_alpha = jnp.asarray(1.0 / alpha, dtype)
  eye = jnp.eye(num_tasks, dtype=dtype)
  active = jnp.diagonal(prepared.matrix) > 0
  both = active[:, None] & active[None, :]
  matrix = jnp.where(both, prepared.matrix, eye)
  magnitudes = jnp.abs(matrix)

  def objective(weights):
    utility = (jnp.log(weights) if alpha == 1.0 else
               _power(weights, 1 - inverse_alpha) / (1 - inverse_alpha))
    return (0.5 * _common.dot(weights, _common.matvec(matrix, weights))
            - jnp.sum(jnp.where(active, utility, 0)))

  def residual_gap(weights):
    # Each task's relative residual against its own round-off, T ε
    # (|G|w)_k w_k^{1/α}: a task of large gradients must not excuse the
    # residual of a task of small ones.
    scale = _power(weights, inverse_alpha)
    absolute = jnp.where(
        active, jnp.abs(_common.matvec(matrix, weights) * scale - 1), 0)
    floor = _common.resolve_cutoff(
        dtype, num_tasks, _common.matvec(magnitudes, weights) * scale)
    return jnp.max(_common.relative_gap(absolute, jnp.ones([], dtype),
                                        floor))

  def measure(weights):
    """The gap, and whether Σ w_k g_k cancels (no solution)."""
    masked = jnp.where(active, weights, 0)
    value = _common.dot(masked, _common.matvec(matrix, masked))
    size = _common.dot(masked, _common.matvec(magnitudes, masked))
    return residual_gap(weights), jnp.any(active) & (
        value <= _common.resolve_cutoff(dtype, num_tasks, size))

  def newton_step(weights):
    gradient = jnp.where(active, weights * _common.matvec(matrix, weights)
                         - _power(weights, 1 - inverse_alpha), 0)
    system = jnp.where(both, weights[:, None] * matrix * weights[None, :]
                       + jnp.diag(inverse_alpha
                                  * _power(weights, 1 - inverse_alpha)), eye)
    solve = _common.cholesky_solver(system)
    delta = solve(-gradient)
    decrease = jnp.maximum(-_common.dot(gradient, delta), 0)
    size, largest = _newton.feasible_step_size(objective, weights, delta,
                                               decrease)
    # Near the solution round-off in F defeats the line search: take the
    # full (feasible) Newton step, which converges quadratically there.
    quadratic = (decrease <= 1e-2) & (largest == 1)
    size = jnp.where(quadratic, 1, size)
    stepped = jnp.where(active, weights * (1 + size * delta), 1)
    return _newton.chord_step(
        solve, lambda new: jnp.where(active, weights * (
            _common.matvec(matrix, new) - _power(new, -inverse_alpha)), 0),
        residual_gap, objective, weights, stepped, delta, full=size == 1,
        quadratic=quadratic)

  # The guess u = w ⊙ diag(G)^{α/(α+1)} is w ⊙ diag(M)^{α/(α+1)} on M.
  start = _newton.positive_start(
      None if warm_start is None else
      _common.check_vector("warm_start", warm_start, num_tasks, dtype)
      * jnp.power(jnp.diagonal(prepared.matrix), -alpha / (alpha + 1)),
      num_tasks, dtype)
  weights, iterations, gap, no_solution = _newton.iterate(
      newton_step, measure, jnp.where(active, start, 1),
      max_iters=max_iters, tol=tol)
  # A solution has (G w)_i = w_i^{-1/α} > 0 for every task: iterates that
  # drift along a cancelling combination without meeting the test above
  # (round-off keeps its value just above the cut-off) fail this instead.
  no_solution |= jnp.any(active & (_common.matvec(matrix, weights) <= 0))
  # Back to the input's scale: G = 2^e M gives w = 2^{-e α/(α+1)} w̃.
  scale = jnp.exp2(-prepared.exponent.astype(dtype) * alpha / (alpha + 1))
  weights = jnp.where(active & ~no_solution, weights * scale, 0)
  return _common.finish(weights, iterations, gap, tol,
                        finite=prepared.finite, no_solution=no_solution)


def _power(values: chex.Array, exponent: chex.Array) -> chex.Array:
  """``values ** exponent`` for positive values, as ``exp(e log v)``."""
  return jnp.exp(exponent * jnp.log(values))


def scale_free_solution(weights: chex.Array, gramian: chex.Array,
                        alpha: float) -> chex.Array:
  r"""``u = w ⊙ diag(G)^{α/(α+1)}``: the α-fair weights without their scale.

  What a strategy keeps to warm-start the next step's solve
  (:func:`solve_alpha_fair`'s ``warm_start``); for ``α = 1`` it is
  ``α_i ‖g_i‖``, :func:`solve_nash`'s ``β``. A zero-gradient task's
  ``u_i`` is 0.

  Args:
    weights: ``w``, shape [T].
    gramian: ``G``, shape [T, T].
    alpha: α > 0.

  Returns:
    ``u``, shape [T], in the dtype of ``weights``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_mtl._src.solvers import _alpha_fair
    >>> gramian = jnp.array([[4.0, 0.0], [0.0, 0.25]])
    >>> weights = _alpha_fair.solve_alpha_fair(gramian, 1.0).weights
    >>> [round(u, 4) for u in _alpha_fair.scale_free_solution(
    ...     weights, gramian, 1.0).tolist()]
    [1.0, 1.0]
  """
  diagonal = jnp.clip(jnp.diagonal(gramian), min=0).astype(weights.dtype)
  return weights * jnp.power(diagonal, alpha / (alpha + 1))
