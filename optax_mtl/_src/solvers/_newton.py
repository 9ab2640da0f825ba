"""Nash-MTL's bargaining problem, by damped Newton steps."""

from __future__ import annotations

from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src.solvers import _common

# The default max_iters of solve_nash (and of nash_mtl). Damped Newton on a
# self-concordant function: a few damped steps, then quadratic convergence;
# 4 to 12 steps on the tests' problems (T up to 256, ill-conditioned and
# rank-deficient included), about 10 to detect a problem without a solution.
DEFAULT_MAX_ITERS = 50

# Step sizes tried by the line search: the largest feasible one, halved.
_NUM_STEP_SIZES = 24


def solve_nash(
    gramian: chex.Array,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
    tol: Optional[float] = None,
    warm_start: Optional[chex.Array] = None,
) -> _common.SolverResult:
  r"""The Nash bargaining weights: ``G α = 1 / α``, ``α > 0`` (elementwise).

  .. math::
    \alpha_i\, (G\alpha)_i = 1 \quad (i = 1 \dots T),
    \qquad d = \sum_i \alpha_i g_i,\quad g_i^\top d = 1/\alpha_i,
    \quad \lVert d \rVert^2 = T,

  (Navon et al. 2022, Eq. 2). In the unit-gradient scaling
  ``α_i = β_i / ‖g_i‖``, ``C = N G N`` (``N = diag(1/‖g_i‖)``, unit
  diagonal) it is the stationary point ``β ⊙ Cβ = 1`` of the convex,
  self-concordant ``F(β) = ½ βᵀCβ − Σ log β_i``. Newton's method is affine
  invariant, so the scaling changes nothing but rounding, and the weights
  do not change when ``G`` is multiplied by any ``c > 0``. In the variables
  ``β ⊙ (1 + δ)`` the Newton system is ``(BCB + I) δ = 1 − β ⊙ Cβ``
  (``B = diag(β)``), whose eigenvalues are at least one; a backtracking
  (Armijo) line search keeps ``β > 0`` (:func:`feasible_step_size`, shared
  with :func:`optax_mtl.solve_alpha_fair`; when round-off defeats it, the
  damped step ``1/(1 + λ)``, which decreases a self-concordant ``F``), and
  within the quadratic region (Newton decrement below ½) the full step is
  taken, followed by a second correction with the same factorisation
  (:func:`chord_step`). ``solve_alpha_fair(G, 1.0)`` solves the same
  problem (equal to round-off, not bit for bit: it works on ``G`` rather
  than on ``C``, with another fallback and test for no solution).

  Stopping test (the solvers' relative gap): the residual
  ``max_i |β_i (Cβ)_i − 1|`` (relative to the target 1, a backward error),
  with the floor ``T ε max_i β_i (|C|β)_i``, the round-off of the products.

  Degenerate cases.

  * A task with a zero gradient (``G_ii = 0``) cannot be bargained with:
    it gets ``α_i = 0`` exactly and the others are solved among themselves
    (all zero: ``α = 0``, converged).
  * No solution: when some non-negative combination of the unit gradients
    is zero (two exactly opposite gradients, or more generally 0 in the
    convex hull of the ``ĝ_i``), ``F`` is unbounded below and ``β`` grows
    without bound along that combination, each task's utility
    ``β_i (Cβ)_i`` becoming the difference of ever larger terms. The
    solver stops as soon as their round-off, the floor above, reaches ½
    (the equation is no longer resolved at this precision; ``β`` is then
    about ``(T ε)^{-1/2}``, far from overflow), and reports
    ``Outcome.NO_SOLUTION`` with the fallback ``α = 0``: the disagreement
    point of the bargaining game, an update of zero, as at a
    Pareto-stationary point. ``gap`` is then ``inf`` and ``converged``
    False. A problem whose solution has weights that large (gradients
    within about ``√(T ε)`` of cancelling) is reported the same way: it is
    not solvable in that dtype.

  Warm start: ``warm_start`` is a guess of the scale-free solution
  ``β_i = α_i ‖g_i‖`` (for instance the previous training step's, which
  does not move when the gradients' norms do). Its entries that are
  positive and finite replace the cold start's ``β_i = 1``; the others
  (a zero-gradient task's 0, the fallback 0 of a problem without a
  solution) keep 1. ``F`` is strictly convex and the damped Newton steps
  converge from any ``β > 0``, so the solution is the same; from a nearby
  guess, within the quadratic region, the first full step is taken and one
  or two steps meet ``tol``.

  Defaults: ``max_iters = 50`` (4 to 12 steps are typical, about 10 to
  detect a problem without a solution), ``tol``: 1e-6 in float32, 1e-12
  in float64.

  Args:
    gramian: ``G``, shape [T, T], symmetric positive semi-definite; solved
      in its dtype (float64 stays float64; below float32, float32).
    max_iters: the most Newton steps.
    tol: the relative residual to reach; None: the default above.
    warm_start: None (a cold start), or a guess of ``β = α ⊙ ‖g‖``, shape
      [T] (see above; ``_alpha_fair.scale_free_solution(α, G, 1.0)``).

  Returns:
    A :class:`SolverResult` with ``weights = α`` (0 for zero-gradient
    tasks; all 0 with ``Outcome.NO_SOLUTION``); ``iterations`` is 0 when
    the warm start already met ``tol``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> result = optax_mtl.solve_nash(jnp.array([[4.0, 0.0], [0.0, 0.25]]))
    >>> [round(a, 4) for a in result.weights.tolist()], bool(result.converged)
    ([0.5, 2.0], True)
    >>> opposite = optax_mtl.solve_nash(jnp.array([[1.0, -1.0], [-1.0, 1.0]]))
    >>> opposite.weights.tolist(), int(opposite.outcome)
    ([0.0, 0.0], 3)

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game
    <https://arxiv.org/abs/2202.01017>`_, ICML 2022;
    Nesterov & Nemirovskii, "Interior-Point Polynomial Algorithms in Convex
    Programming", 1994 (self-concordant functions, the damped Newton step).
  """
  prepared = _common.prepare_gramian(gramian)
  gramian, num_tasks, dtype = (prepared.matrix, prepared.num_tasks,
                               prepared.dtype)
  max_iters = _common.check_max_iters(max_iters)
  tol = _common.check_tolerance(tol, dtype)
  eye = jnp.eye(num_tasks, dtype=dtype)
  inverse_norms = _common.inverse_gradient_norms(gramian, 0.0)
  active = inverse_norms > 0
  # Scaled entry by entry (the outer product of the norms could underflow).
  cosines = (gramian * inverse_norms[:, None]) * inverse_norms[None, :]
  cosines = jnp.where(active[:, None] & active[None, :], cosines, eye)
  magnitudes = jnp.abs(cosines)

  def residual_gap(beta):
    """The relative gap, and whether β ⊙ Cβ is unresolvable."""
    product = _common.matvec(cosines, beta)
    absolute = jnp.max(jnp.where(active, jnp.abs(beta * product - 1), 0))
    floor = _common.resolve_cutoff(
        dtype, num_tasks,
        jnp.max(jnp.where(active, beta * _common.matvec(magnitudes, beta), 0)))
    # The products β_i (Cβ)_i, whose target is 1, carry a round-off of
    # ``floor``: from ½ on the equation is not resolved at this precision.
    return (_common.relative_gap(absolute, jnp.ones([], dtype), floor),
            floor >= 0.5)

  def objective(beta):
    return (0.5 * _common.dot(beta, _common.matvec(cosines, beta))
            - jnp.sum(jnp.where(active, jnp.log(beta), 0)))

  def newton_step(beta):
    residual = jnp.where(active, beta * _common.matvec(cosines, beta) - 1, 0)
    system = beta[:, None] * cosines * beta[None, :] + eye
    solve = _common.cholesky_solver(system)
    delta = solve(-residual)
    decrement_squared = jnp.maximum(-_common.dot(residual, delta), 0)  # λ².
    # The damped step 1/(1 + λ) always decreases a self-concordant F and
    # keeps β > 0: the fallback when round-off defeats the line search.
    size, _ = feasible_step_size(
        objective, beta, delta, decrement_squared,
        fallback=1 / (1 + jnp.sqrt(decrement_squared)))
    size = jnp.where(decrement_squared <= 0.25, 1, size)
    stepped = jnp.where(active, beta * (1 + size * delta), 1)
    # In the quadratic region, a second correction with the same factor.
    return chord_step(
        solve, lambda new: jnp.where(
            active, beta * _common.matvec(cosines, new) - beta / new, 0),
        lambda new: residual_gap(new)[0], objective, beta, stepped, delta,
        full=size == 1, quadratic=decrement_squared <= 0.25)

  start = jnp.where(active, positive_start(warm_start, num_tasks, dtype), 1)
  beta, iterations, gap, no_solution = iterate(
      newton_step, residual_gap, start, max_iters=max_iters, tol=tol)
  # α_i = β_i / ‖g_i‖ on the input's scale (2^e times the scaled one's).
  input_norms = _common.gradient_norms(jnp.ldexp(gramian, prepared.exponent))
  weights = _common.safe_divide(beta, jnp.where(active & ~no_solution,
                                                input_norms, 0))
  return _common.finish(weights, iterations, gap, tol,
                        finite=prepared.finite, no_solution=no_solution,
                        fallback=0)


def feasible_step_size(objective: Callable[[chex.Array], chex.Array],
                       point: chex.Array, delta: chex.Array,
                       decrement_squared: chex.Array, *,
                       fallback: Optional[chex.Array] = None
                       ) -> tuple[chex.Array, chex.Array]:
  r"""The backtracking (Armijo) step of a multiplicative Newton step.

  The step from ``x`` (``point``) is ``x ⊙ (1 + t δ)``. The sizes tried are
  the largest ``t ≤ 1`` that keeps every entry positive (0.99 of the way to
  the boundary), then its halvings (24 in all), evaluated at once; the first
  with ``F(x ⊙ (1 + tδ)) ≤ F(x) − ¼ t λ²`` (``λ² = decrement_squared``, the
  squared Newton decrement) is taken. When round-off defeats every test,
  ``fallback`` (None: the smallest size tried). The one line search of
  :func:`solve_nash` and :func:`~optax_mtl.solve_alpha_fair`.

  Args:
    objective: ``x ↦ F(x)``.
    point: ``x`` > 0.
    delta: the Newton direction ``δ`` (in the multiplicative variables).
    decrement_squared: ``λ² = −∇Fᵀδ ≥ 0``.
    fallback: the size to take when no size passes.

  Returns:
    ``(t, t_max)``: the size, and the largest feasible one tried.

  References:
    Nocedal & Wright, "Numerical Optimization", 2nd ed., Springer 2006,
    §3.1 (backtracking, the Armijo condition).
  """
  most_negative = jnp.max(-delta)
  largest = jnp.minimum(1, _common.safe_divide(
      0.99, jnp.where(most_negative > 0, most_negative, 0)))
  largest = jnp.where(most_negative > 0, largest, 1)
  sizes = largest * 0.5**jnp.arange(_NUM_STEP_SIZES, dtype=point.dtype)
  trial = jax.vmap(lambda t: objective(point * (1 + t * delta)))(sizes)
  armijo = trial <= objective(point) - 0.25 * sizes * decrement_squared
  fallback = sizes[-1] if fallback is None else fallback
  return (jnp.where(jnp.any(armijo), sizes[jnp.argmax(armijo)], fallback),
          largest)


def iterate(newton_step: Callable[[chex.Array], chex.Array],
            measure: Callable[[chex.Array], tuple[chex.Array, chex.Array]],
            start: chex.Array, *, max_iters: int, tol: chex.Array):
  """Newton steps from ``start`` in a ``lax.while_loop``.

  ``measure(x) -> (gap, no_solution)``; the loop stops once ``gap <= tol``,
  ``no_solution`` or ``max_iters`` steps.

  Returns:
    ``(x, iterations, gap, no_solution)``.
  """

  def cond(carry):
    _, iteration, gap, no_solution = carry
    return (iteration < max_iters) & (gap > tol) & ~no_solution

  def body(carry):
    point, iteration, _, _ = carry
    point = newton_step(point)
    return (point, iteration + 1, *measure(point))

  return jax.lax.while_loop(
      cond, body, (start, jnp.zeros([], jnp.int32), *measure(start)))


def positive_start(warm_start: Optional[chex.Array], num_tasks: int,
                   dtype) -> chex.Array:
  """The first iterate of a multiplicative Newton solve, [T] in ``dtype``.

  Ones (the cold start), or the entries of ``warm_start`` that are positive
  and finite, with 1 for the others.

  Raises:
    ValueError: ``warm_start`` is not of shape [T].
  """
  ones = jnp.ones((num_tasks,), dtype)
  if warm_start is None:
    return ones
  guess = _common.check_vector("warm_start", warm_start, num_tasks, dtype)
  usable = jnp.isfinite(guess) & (guess > 0)
  return jnp.where(usable, guess, ones)



def chord_step(solve: Callable[[chex.Array], chex.Array],
               gradient: Callable[[chex.Array], chex.Array],
               residual: Callable[[chex.Array], chex.Array],
               objective: Callable[[chex.Array], chex.Array],
               base: chex.Array, stepped: chex.Array, delta: chex.Array,
               *, full: chex.Array, quadratic: chex.Array) -> chex.Array:
  r"""A second Newton correction with the first one's factorisation.

  In the variables ``x = x_0 ⊙ (1 + δ)`` of a multiplicative Newton step
  from ``x_0`` (``base``), after the full step ``δ_1`` (``delta``, giving
  ``stepped``), the chord correction ``δ_2 = δ_1 − H_0^{-1} ∇_δF(x_1)``
  reuses ``H_0``'s factorisation (``solve``): two triangular solves, no new
  factorisation. Newton then chord is Shamanskii's method, of order three
  near the solution (an error ``e`` becomes about ``e³``), so that a warm
  start needs one or two trips where plain Newton needs two or three. The
  correction is kept only after a full step (``full``), where ``x_2 > 0``,
  its residual is smaller than ``x_1``'s and, outside the quadratic region
  (``quadratic``, where round-off in ``F`` defeats the comparison), ``F``
  is not larger: the iterates still decrease ``F``, the damped method's
  guarantee of convergence. Otherwise ``x_1``.

  Args:
    solve: ``r ↦ H_0^{-1} r``.
    gradient: ``x ↦ ∇_δF`` at ``x``, in the variables around ``x_0``
      (zero on inactive tasks).
    residual: ``x ↦`` the solver's stopping measure (a scalar).
    objective: ``x ↦ F(x)``.
    base: ``x_0``.
    stepped: ``x_1 = x_0 ⊙ (1 + δ_1)``.
    delta: ``δ_1``.
    full: bool[], whether ``x_1`` is the full step.
    quadratic: bool[], whether ``x_0`` is in the quadratic region.

  Returns:
    ``x_2`` or ``x_1``.

  References:
    Kelley, "Iterative Methods for Linear and Nonlinear Equations", SIAM
    1995, §5.4 (the chord and Shamanskii methods).
  """
  second = delta - solve(gradient(stepped))
  corrected = base * (1 + second)
  safe = jnp.where(corrected > 0, corrected, 1)
  better = (full & jnp.all(1 + second > 0)
            & (residual(safe) < residual(stepped))
            & (quadratic | (objective(safe) <= objective(stepped))))
  return jnp.where(better, safe, stepped)
