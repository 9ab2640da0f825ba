"""PCD's quadratic program, by the dual active-set method of Goldfarb and
Idnani written on the Gramian."""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src.solvers import _common

# The default max_iters of solve_priority_qp: an iteration adds or drops
# one constraint, and a solve takes about one per active constraint.
DEFAULT_MAX_ITERS = 200


class _Carry(NamedTuple):
  multipliers: chex.Array  # [T−1] μ ≥ 0.
  active: chex.Array  # bool[T−1], the constraints held with equality.
  adding: chex.Array  # i32[], the violated constraint being added.
  in_step: chex.Array  # bool[], a constraint is being added (after a drop).
  done: chex.Array  # bool[], optimal or infeasible.
  infeasible: chex.Array  # bool[].
  iterations: chex.Array  # i32[].


class _Problem(NamedTuple):
  secondary: chex.Array  # [T−1, T−1] A = G̃_SS.
  target: chex.Array  # [T−1] b = τ diag(A) − G̃_S1: slack = Aμ − b.
  norms: chex.Array  # [T−1] ‖g̃_j‖.
  primary: chex.Array  # [] ‖g̃_1‖².
  cross: chex.Array  # [T−1] G̃_S1.


def _slacks(problem: _Problem, multipliers: chex.Array) -> chex.Array:
  """``g̃_jᵀd − τ_j‖g̃_j‖²`` for ``d = g̃_1 + Σ μ_j g̃_j``."""
  return _common.matvec(problem.secondary, multipliers) - problem.target


def _gap(problem: _Problem, multipliers: chex.Array, active: chex.Array, *,
         held: bool = False) -> chex.Array:
  r"""The largest violation ``max(−slack_j, 0) / ‖g̃_j‖`` relative to ``‖d‖``.

  The cosine by which ``d`` misses a constraint that is not active (the
  active ones hold with equality, up to round-off), with the floor
  ``T ε max_j (|A||μ| + |b|)_j / ‖g̃_j‖`` (the round-off of the slacks).
  ``held``: the largest ``|slack_j| / ‖g̃_j‖`` of the *active* constraints
  instead, by how much they miss holding with equality.
  """
  num_tasks = multipliers.shape[0] + 1
  slacks = _slacks(problem, multipliers)
  missed = jnp.where(held, jnp.abs(slacks), jnp.maximum(-slacks, 0))
  violation = jnp.where(active == held, _common.safe_divide(
      missed, problem.norms), 0)
  direction_sq = (problem.primary + 2 * _common.dot(multipliers, problem.cross)
                  + _common.dot(multipliers, _common.matvec(
                      problem.secondary, multipliers)))
  magnitudes = _common.safe_divide(
      _common.matvec(jnp.abs(problem.secondary), jnp.abs(multipliers))
      + jnp.abs(problem.target), problem.norms)
  floor = _common.resolve_cutoff(multipliers.dtype, num_tasks,
                                 jnp.max(magnitudes))
  return _common.relative_gap(jnp.max(violation),
                              jnp.sqrt(jnp.maximum(direction_sq, 0)), floor)


def _warm_start(problem: _Problem, guess: chex.Array,
                tol) -> tuple[chex.Array, chex.Array]:
  r"""``(μ, active)`` to start from, given a guess of ``μ`` [T−1].

  The guessed active set ``A = {j : μ_j > T ε max|μ|}`` (the previous
  step's, say) is held with equality: ``A_AA μ_A = b_A``, the minimum of
  the QP with those constraints as equalities. Goldfarb and Idnani's loop
  may start there where ``μ_A > 0``, the equalities hold to ``tol`` and
  the active gradients are independent (each pivot of the unit-diagonal
  block above :func:`dependence_cutoff`): the state its own iterations
  keep; it then adds what is violated. Tried, the last that qualifies
  kept: ``A`` less its negative multipliers, ``A`` itself, and ``A`` less
  them plus the constraints violated there (a primal-dual active-set
  round, all changes at once); none: the cold start (``μ = 0``, nothing
  active).
  """
  size = guess.shape[0]
  finite = jnp.isfinite(guess)
  largest = jnp.max(jnp.where(finite, jnp.abs(guess), 0))
  active = finite & (guess > _common.resolve_cutoff(guess.dtype, size + 1,
                                                    largest))
  scales = _common.safe_divide(1.0, problem.norms)
  unit = (problem.secondary * scales[:, None]) * scales[None, :]

  def held(active):
    """μ on ``active`` held with equality, and whether the loop may start
    there."""
    multipliers = _common.solve_on_support(problem.secondary, active,
                                           problem.target)
    # Independent active gradients, as the loop keeps them: every pivot of
    # the unit-diagonal block above dependence_cutoff (else μ is noise).
    pivots = jnp.diagonal(jax.lax.linalg.cholesky(
        _common.masked_matrix(unit, active, 0.0), symmetrize_input=False))
    usable = (jnp.all(jnp.where(active, (multipliers > 0) & (
        pivots**2 > dependence_cutoff(jnp.ones_like(pivots))), True))
              & jnp.all(jnp.isfinite(multipliers))
              & (_gap(problem, multipliers, active, held=True) <= tol))
    return usable, multipliers, active

  guessed = held(active)
  kept = active & (guessed[1] > 0)  # Its negative multipliers dropped,
  # and then also the violated constraints added (a primal-dual round).
  candidates = (held(kept), guessed, held(jnp.where(
      active, kept, _slacks(problem, guessed[1]) < 0)))
  start = (jnp.zeros_like(guess), jnp.zeros_like(active))
  for usable, multipliers, active in candidates:  # The last usable one.
    start = (jnp.where(usable, multipliers, start[0]),
             jnp.where(usable, active, start[1]))
  return start


def dependence_cutoff(scale: chex.Array) -> chex.Array:
  r"""``√ε · scale``: below it, ``‖z‖²`` is round-off, not a direction.

  ``‖z‖² = A_pp − A_pA A_AA⁻¹ A_Ap`` is a difference of Gramian entries,
  each known to ``ε`` relative at best, amplified by the conditioning of
  the active block; a gradient at an angle below about ``ε^{1/4}`` radians
  (1° in float32, 0.007° in float64) from the span of the active ones
  cannot be told from one inside it. ``scale`` is ``A_pp + |A_pA||r|``,
  the size of the terms of the difference.
  """
  return jnp.sqrt(jnp.finfo(scale.dtype).eps) * scale


def _add_or_drop(problem: _Problem, carry: _Carry,
                 slacks: chex.Array) -> _Carry:
  r"""One step towards holding constraint ``p`` (``carry.adding``).

  ``r = A_AA⁻¹ A_Ap`` and ``z = g̃_p − Σ_{j∈A} r_j g̃_j`` (``‖z‖² = A_pp −
  A_pAr``): moving ``μ_p`` by ``t`` and ``μ_A`` by ``−t r`` keeps the active
  constraints held and raises slack ``p`` by ``t‖z‖²``. The full step
  ``t = −slack_p/‖z‖²`` adds ``p``; a shorter one, where an active
  multiplier reaches zero first, drops that constraint. ``z = 0`` (``g̃_p``
  a combination of the active gradients, within round-off) with no
  multiplier to decrease: the constraints are infeasible. "Within
  round-off" is :func:`dependence_cutoff`.
  """
  size = carry.multipliers.shape[0]
  num_tasks = size + 1
  p = carry.adding
  column = problem.secondary[:, p]
  coefficients = _common.solve_on_support(problem.secondary, carry.active,
                                          column)
  orthogonal_sq = column[p] - _common.dot(column, coefficients)
  independent = orthogonal_sq > dependence_cutoff(
      column[p] + _common.dot(jnp.abs(column), jnp.abs(coefficients)))
  full = jnp.where(independent,
                   -slacks[p] / jnp.where(independent, orthogonal_sq, 1),
                   jnp.inf)
  decreasing = carry.active & (coefficients > 0)
  ratios = jnp.where(decreasing, carry.multipliers
                     / jnp.where(decreasing, coefficients, 1), jnp.inf)
  leaving = jnp.argmin(ratios)
  partial = ratios[leaving]
  step = jnp.minimum(full, partial)
  infeasible = jnp.isinf(step)
  adds = full <= partial
  step = jnp.where(infeasible, 0, step)
  multipliers = carry.multipliers - step * coefficients
  multipliers = multipliers.at[p].add(step)
  index = jnp.arange(size)
  multipliers = jnp.where(carry.active | (index == p),
                          jnp.maximum(multipliers, 0), 0)
  multipliers = jnp.where(~adds & (index == leaving), 0, multipliers)
  active = jnp.where(adds, carry.active | (index == p),
                     carry.active & (index != leaving))
  return carry._replace(
      multipliers=jnp.where(infeasible, carry.multipliers, multipliers),
      active=jnp.where(infeasible, carry.active, active),
      in_step=~adds & ~infeasible, infeasible=infeasible,
      done=infeasible, iterations=carry.iterations + 1)


def solve_priority_qp(
    gramian: chex.Array,
    taus: chex.Array,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
    tol: Optional[float] = None,
    warm_start: Optional[chex.Array] = None,
) -> _common.SolverResult:
  r"""PCD's QP: follow ``g_1`` subject to progress on every other task.

  .. math::
    d^\star = \operatorname*{argmin}_d \tfrac12 \lVert d - g_1 \rVert^2
    \quad\text{s.t.}\quad g_j^\top d \ge \tau_j \lVert g_j \rVert^2,
    \ j = 2, \dots, T,
    \qquad d^\star = J^\top w, \quad w = (1, \mu_2, \dots, \mu_T),

  with ``μ ≥ 0`` the multipliers of the constraints (stationarity: ``d =
  g_1 + Σ_j μ_j g_j``). Solved exactly by the dual active-set method of
  Goldfarb & Idnani (1983) for the identity Hessian: from the unconstrained
  minimum ``d = g_1`` (``μ = 0``), the most violated constraint is added;
  on the way, an active constraint whose multiplier would turn negative is
  dropped. Every inner product the method needs is an entry of ``G`` or of
  ``Gμ``, so it runs on the T×T Gramian; each iteration solves on the
  active block (:func:`_common.solve_on_support`, ``O(T³)``, for the small
  T of multi-task learning). When a violated constraint's gradient is a
  combination of the active ones (within round-off) and no multiplier can
  decrease, the constraints cannot hold together: the solver returns
  ``w = e_1`` (``d = g_1``, the constraints dropped) with outcome
  ``NO_SOLUTION``. A zero ``g_j`` has the constraint ``0 ≥ 0``. A
  gradient whose component orthogonal to the active ones has a squared
  norm below ``√ε`` of its own (:func:`dependence_cutoff`; an angle below
  about 1° in float32) counts as their combination: below that the
  Gramian cannot tell, and a step on that component would blow the
  multipliers up by ``1/‖z‖²``.

  ``G`` is scaled by a power of two first (exact); ``μ`` does not depend on
  a common scale of the gradients.

  Stopping test (:func:`_common.relative_gap`): the largest violation
  ``max(τ_j‖g_j‖² − g_jᵀd, 0) / ‖g_j‖`` relative to ``‖d‖`` (the cosine by
  which ``d`` misses a constraint), with the floor ``T ε max_j (|G_SS||μ| +
  |b|)_j / ‖g_j‖``, the round-off of the slacks. The active constraints
  hold with equality by construction.

  Args:
    gramian: ``G``, shape [T, T], symmetric positive semi-definite; row 0
      is the primary task.
    taus: ``τ``, shape [T − 1], in ``[0, 1]``.
    max_iters: the most iterations (one adds or drops a constraint).
    tol: the relative violation to reach; None: 1e-6 in float32, 1e-12 in
      float64.
    warm_start: None, or a guess of the weights ``(1, μ)`` [T] (the previous
      step's, say): its active set ``{j : μ_j > 0}``, held with equality,
      is where the iterations start when its multipliers are positive
      (:func:`_warm_start`); else the cold start. It changes where the
      search starts, never the test it has to pass.

  Returns:
    A :class:`SolverResult` with ``weights = (1, μ)``, or ``e_1`` when the
    constraints are infeasible (``NO_SOLUTION``) or ``G`` is not finite
    (``NONFINITE``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_mtl._src import solvers
    >>> gramian = jnp.array([[1.0, -1.0], [-1.0, 4.0]])  # g₁ᵀg₂ = −1.
    >>> result = solvers.solve_priority_qp(gramian, jnp.array([0.0]))
    >>> [round(w, 4) for w in result.weights.tolist()]  # g₂ᵀ(g₁ + μg₂) = 0.
    [1.0, 0.25]

  References:
    Goldfarb & Idnani, "A numerically stable dual method for solving
    strictly convex quadratic programs", Mathematical Programming 27, 1983;
    Varam et al., "Not All Objectives Are Born Equal: Priority-Constrained
    Descent for Hierarchical Multi-Objective Optimization", TMLR 2026.
  """
  prepared = _common.prepare_gramian(gramian)
  matrix, num_tasks, dtype = (prepared.matrix, prepared.num_tasks,
                              prepared.dtype)
  max_iters = _common.check_max_iters(max_iters)
  tol = _common.check_tolerance(tol, dtype)
  fallback = jnp.zeros((num_tasks,), dtype).at[0].set(1)
  if num_tasks == 1:
    return _common.finish(fallback, 0, jnp.zeros([], dtype), tol,
                          finite=prepared.finite)
  taus = jnp.asarray(taus).astype(dtype)
  if taus.shape != (num_tasks - 1,):
    raise ValueError(f"taus must have shape ({num_tasks - 1},), got "
                     f"{taus.shape}.")
  secondary = matrix[1:, 1:]
  diagonal = jnp.maximum(jnp.diagonal(secondary), 0)
  problem = _Problem(secondary=secondary,
                     target=taus * diagonal - matrix[1:, 0],
                     norms=jnp.sqrt(diagonal),
                     primary=jnp.maximum(matrix[0, 0], 0),
                     cross=matrix[1:, 0])
  size = num_tasks - 1

  def cond(carry):
    return ~carry.done & (carry.iterations < max_iters)

  def body(carry):
    slacks = _slacks(problem, carry.multipliers)
    # The most violated constraint, unless one is being added already.
    candidates = jnp.where(carry.active, jnp.inf,
                           _common.safe_divide(slacks, problem.norms))
    violated = jnp.argmin(candidates).astype(jnp.int32)
    optimal = ~carry.in_step & (
        (_gap(problem, carry.multipliers, carry.active) <= tol)
        | (candidates[violated] >= 0))
    carry = carry._replace(adding=jnp.where(carry.in_step, carry.adding,
                                            violated))
    stepped = _add_or_drop(problem, carry, slacks)
    return jax.tree.map(lambda old, new: jnp.where(optimal, old, new),
                        carry._replace(done=jnp.asarray(True)), stepped)

  if warm_start is None:
    multipliers, active = jnp.zeros((size,), dtype), jnp.zeros((size,), bool)
  else:
    warm_start = _common.check_vector("warm_start", warm_start, num_tasks,
                                      dtype)
    multipliers, active = _warm_start(problem, warm_start[1:], tol)
  start = _Carry(
      multipliers=multipliers, active=active,
      adding=jnp.zeros([], jnp.int32), in_step=jnp.asarray(False),
      done=jnp.asarray(False), infeasible=jnp.asarray(False),
      iterations=jnp.zeros([], jnp.int32))
  carry = jax.lax.while_loop(cond, body, start)
  weights = jnp.concatenate([jnp.ones((1,), dtype), carry.multipliers])
  weights = jnp.where(carry.infeasible, fallback, weights)
  gap = jnp.where(carry.infeasible, jnp.zeros([], dtype),
                  _gap(problem, carry.multipliers, carry.active))
  return _common.finish(weights, carry.iterations, gap, tol,
                        finite=prepared.finite,
                        no_solution=carry.infeasible, fallback=fallback)
