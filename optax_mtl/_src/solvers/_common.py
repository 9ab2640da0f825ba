"""What every solver shares: the result type, the outcome codes, the one
convergence rule, the argument checks and the small numerical helpers."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src import base

_HIGHEST = jax.lax.Precision.HIGHEST


class Outcome:
  """How a solve ended: the ``outcome`` code of a :class:`SolverResult`.

  Under ``jit`` a solver cannot raise on a value, so it reports what
  happened as an int32 code (as optimistix's ``RESULTS`` does). Exactly one
  code applies; they are checked in the order NONFINITE, NO_SOLUTION,
  SUCCESS, STALLED, MAX_ITERS.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> result = optax_mtl.solve_min_norm(jnp.eye(3))
    >>> int(result.outcome) == optax_mtl.Outcome.SUCCESS
    True
    >>> optax_mtl.Outcome.message(optax_mtl.Outcome.MAX_ITERS)[:29]
    'max_iters iterations were run'
  """

  SUCCESS = 0
  """The returned point meets the requested tolerance (``converged``)."""

  MAX_ITERS = 1
  """``max_iters`` iterations were run and the tolerance was not met; the
  weights are the last iterate (feasible, usually close: see ``gap``)."""

  NONFINITE = 2
  """The Gramian (or another input) held a NaN or an infinity, or the solve
  produced one. The weights are the solver's documented fallback (the
  uniform weights, ``u``, or zeros), not a solution."""

  NO_SOLUTION = 3
  """The problem has no solution within the dtype's resolution (Nash-MTL
  when some convex combination of the unit task gradients is zero). The
  weights are the solver's documented fallback."""

  STALLED = 4
  """The iterate stopped changing before the tolerance was met: round-off
  stops any further progress (the problem is too ill-conditioned for the
  dtype). The weights are the last iterate."""

  _MESSAGES = {
      SUCCESS: "",
      MAX_ITERS: "max_iters iterations were run without meeting tol.",
      NONFINITE: "a NaN or an infinity was met; the weights are a fallback.",
      NO_SOLUTION: "the problem has no solution at this precision; the "
                   "weights are a fallback.",
      STALLED: "round-off stopped the iterations before tol was met.",
  }

  @classmethod
  def message(cls, code: int) -> str:
    """A one-line description of an outcome code ("" for SUCCESS)."""
    return cls._MESSAGES[int(code)]


class SolverResult(NamedTuple):
  """What every solver returns (one problem; a batch adds a leading axis).

  ``converged`` is ``gap <= tol``, exactly: ``gap`` is the solver's
  optimality measure relative to the problem's own scale, set to 0 once it
  is below the rounding floor of the dtype (see :func:`relative_gap`).
  """

  weights: chex.Array  # [T] in the working dtype (see each solver).
  iterations: chex.Array  # i32[], iterations used (0: closed form, or the
  #                         warm start already met tol).
  gap: chex.Array  # [] working dtype, the relative optimality measure.
  converged: chex.Array  # bool[], gap <= tol (outcome == SUCCESS).
  outcome: chex.Array  # i32[], an :class:`Outcome` code.


# The severity of each outcome code (indexed by the code), to summarise a
# batch by its worst member: NONFINITE, NO_SOLUTION, STALLED, MAX_ITERS,
# SUCCESS, from the worst.
_SEVERITY = (0, 1, 4, 3, 2)


def state_fields(result: SolverResult) -> dict[str, jax.Array]:
  """The conventional solver fields of a strategy's state, from a result.

  Used as ``state._replace(**solvers.state_fields(result))``. A batch of
  results (UPGrad's T problems) is summarised by its worst member: the
  most iterations, the largest gap, converged only if all converged, and
  the most severe outcome (NONFINITE, NO_SOLUTION, STALLED, MAX_ITERS,
  SUCCESS, from the worst).
  The dtypes are fixed (the state's dtypes never change between steps), so
  a float64 solve still stores a float32 gap.

  Args:
    result: a :class:`SolverResult`, of one problem or of a batch.

  Returns:
    ``dict(solver_iterations=i32[], solver_gap=f32[],
    solver_converged=bool[], solver_outcome=i32[])``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> from optax_mtl._src import solvers
    >>> fields = solvers.state_fields(optax_mtl.solve_min_norm(jnp.eye(2)))
    >>> {k: v.dtype.name for k, v in fields.items()}
    {'solver_iterations': 'int32', 'solver_gap': 'float32', \
'solver_converged': 'bool', 'solver_outcome': 'int32'}
  """
  # An infinite gap (no solution, a NaN met) is stored as the largest
  # float32: a state stays finite, so the guard accepts the solver's
  # documented fallback instead of rejecting the step.
  gap = jnp.minimum(jnp.max(result.gap).astype(jnp.float32),
                    jnp.finfo(jnp.float32).max)
  outcomes = jnp.ravel(result.outcome).astype(jnp.int32)
  worst = jnp.argmax(jnp.asarray(_SEVERITY, jnp.int32)[outcomes])
  return dict(
      solver_iterations=jnp.max(result.iterations).astype(jnp.int32),
      solver_gap=jnp.where(jnp.isnan(gap), jnp.finfo(jnp.float32).max, gap),
      solver_converged=jnp.all(result.converged),
      solver_outcome=outcomes[worst])


# --------------------------------------------------------------------------
# The one convergence rule.
# --------------------------------------------------------------------------


def default_tolerance(dtype) -> float:
  """The default ``tol`` of every solver: 1e-6 in float32, 1e-12 in float64.

  ``tol`` is relative (see :func:`relative_gap`), so these are about
  ``8 ε`` and ``4500 ε``: float32 leaves little room above the floor.
  """
  return 1e-12 if jnp.finfo(dtype).bits >= 64 else 1e-6


def resolve_cutoff(dtype, num_tasks: int, scale: chex.Array) -> chex.Array:
  r"""The round-off floor of a sum of ``num_tasks`` terms of size ``scale``.

  .. math::
    \text{cutoff} = T \, \varepsilon_{\text{dtype}} \, \text{scale},

  the bound on the rounding error of a length-``T`` inner product whose
  terms are at most ``scale`` in magnitude (Higham 2002, §3.1). It is the
  one place where the solvers choose an "ε × size" threshold: the floor of
  every convergence test, the ridge that lets a singular block factorise,
  the test for a numerically zero combination.

  Args:
    dtype: the working dtype.
    num_tasks: ``T``.
    scale: the magnitude of the terms (an array or a number).

  Returns:
    ``T ε scale``, in ``dtype``.
  """
  eps = jnp.finfo(dtype).eps
  return jnp.asarray(num_tasks * eps, dtype) * jnp.asarray(scale, dtype)


def relative_gap(absolute: chex.Array, scale: chex.Array,
                 floor: chex.Array) -> chex.Array:
  r"""The optimality measure every solver reports, relative to its scale.

  .. math::
    \text{gap} = \begin{cases} 0 & \text{absolute} \le \text{floor} \\
      \text{absolute} / \text{scale} & \text{otherwise,}\end{cases}
    \qquad \text{converged} \iff \text{gap} \le \text{tol}
    \iff \text{absolute} \le \max(\text{tol} \cdot \text{scale},
    \text{floor}).

  ``absolute`` is the solver's certificate (a duality gap or a KKT
  residual), ``scale`` the size of the problem's own terms (the objective
  value, ``‖d‖``), and ``floor`` the round-off in computing ``absolute``
  (from :func:`resolve_cutoff`). So the test does not change when ``G`` is
  multiplied by any ``c > 0``; it asks for relative accuracy ``tol``; and a
  point whose certificate is below round-off counts as converged for any
  ``tol`` (a zero optimum such as a Pareto-stationary point can only be
  certified that way). A zero ``scale`` above the floor gives ``inf``.

  Args:
    absolute: the certificate, ``>= 0``.
    scale: ``>= 0``.
    floor: ``>= 0``.

  Returns:
    The relative gap, in the dtype of ``absolute``.
  """
  absolute = jnp.asarray(absolute)
  ratio = jnp.where(scale > 0, safe_divide(absolute, scale), jnp.inf)
  return jnp.where(absolute <= floor, jnp.zeros_like(absolute),
                   ratio.astype(absolute.dtype))


def finish(weights: chex.Array, iterations: chex.Array, gap: chex.Array,
           tol: float, *, finite: chex.Array = True,
           stalled: chex.Array = False,
           no_solution: chex.Array = False,
           fallback: Any = None) -> SolverResult:
  """Assembles a :class:`SolverResult` and its outcome (the one rule).

  ``converged = gap <= tol`` (``gap`` from :func:`relative_gap`), then the
  outcome in the order of :class:`Outcome`: NONFINITE when an input or the
  weights are not finite (the weights are then replaced by ``fallback``,
  when given), NO_SOLUTION, SUCCESS when converged, STALLED, MAX_ITERS.
  ``converged`` is False unless the outcome is SUCCESS.
  """
  finite = jnp.asarray(finite) & jnp.all(jnp.isfinite(weights), axis=-1)
  if fallback is not None:
    weights = jnp.where(finite[..., None], weights,
                        jnp.broadcast_to(fallback, weights.shape))
  no_solution = jnp.asarray(no_solution) & finite
  gap = jnp.where(finite & ~no_solution, gap, jnp.inf).astype(gap.dtype)
  converged = gap <= tol
  outcome = jnp.where(
      ~finite, Outcome.NONFINITE,
      jnp.where(no_solution, Outcome.NO_SOLUTION,
                jnp.where(converged, Outcome.SUCCESS,
                          jnp.where(stalled, Outcome.STALLED,
                                    Outcome.MAX_ITERS))))
  return SolverResult(weights, jnp.asarray(iterations, jnp.int32), gap,
                      converged, outcome.astype(jnp.int32))


# --------------------------------------------------------------------------
# Small numerical helpers.
# --------------------------------------------------------------------------


def safe_divide(numerator: chex.Array, denominator: chex.Array) -> chex.Array:
  """``numerator / denominator``, and 0 where the denominator is 0.

  The double ``where`` keeps the unused branch finite, so that neither the
  value nor a gradient through it is NaN.
  """
  nonzero = denominator != 0
  return jnp.where(nonzero,
                   numerator / jnp.where(nonzero, denominator, 1), 0)


def gradient_norms(gramian: chex.Array) -> chex.Array:
  """``‖g_k‖ = sqrt(max(G_kk, 0))``, the task gradients' norms, shape [T]."""
  return jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0))


def inverse_gradient_norms(gramian: chex.Array,
                           min_relative_norm: Any) -> chex.Array:
  """``1/‖g_k‖`` from ``diag(G)``, [T]; 0 for a gradient whose norm is at
  or below ``min_relative_norm`` times the largest (or zero)."""
  norms = gradient_norms(gramian)
  keep = (norms > min_relative_norm * jnp.max(norms)) & (norms > 0)
  return safe_divide(1.0, jnp.where(keep, norms, 0))


def dot(first: chex.Array, second: chex.Array) -> chex.Array:
  """``first · second`` at full precision (no TF32/bf16 passes on GPU)."""
  return jnp.dot(first, second, precision=_HIGHEST)


def matvec(matrix: chex.Array, vector: chex.Array) -> chex.Array:
  """``matrix @ vector`` at full precision (no TF32/bf16 passes on GPU)."""
  return jnp.matmul(matrix, vector, precision=_HIGHEST)


def matmul_rows(vectors: chex.Array, matrix: chex.Array) -> chex.Array:
  """``vectors @ matrix`` ([B, T] @ [T, T]) at full precision."""
  return jnp.matmul(vectors, matrix, precision=_HIGHEST)


def working_dtype(dtype) -> jnp.dtype:
  """The dtype a solver works in: the input's, at least float32.

  float64 stays float64 (under ``jax_enable_x64``), float32 stays float32;
  float16, bfloat16 and integer Gramians are solved in float32.
  """
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.dtype(jnp.float32)
  return jnp.promote_types(dtype, jnp.float32)


class Gramian(NamedTuple):
  """A Gramian prepared for a solver (see :func:`prepare_gramian`)."""

  matrix: chex.Array  # [T, T] working dtype, symmetric, 2^-e G.
  num_tasks: int  # T, static.
  dtype: Any  # the working dtype.
  finite: chex.Array  # bool[], the input was finite.
  exponent: chex.Array  # i32[], e: the input is 2^e times ``matrix``.


def scale_by_power_of_two(
    gramian: chex.Array) -> tuple[chex.Array, chex.Array]:
  """``(G / 2^e, e)``: ``2^e`` the smallest power of two above ``G``'s
  largest diagonal entry, so that the largest is in ``[½, 1)`` (``e = 1``
  for a zero diagonal).

  Dividing by a power of two is exact: what is computed from ``G / 2^e``
  does not depend on the common scale of the gradients, from the smallest
  to the largest normal number, and nothing underflows or overflows on
  the way.
  """
  largest = jnp.max(jnp.diagonal(gramian))
  _, exponent = jnp.frexp(jnp.where(largest > 0, largest,
                                    jnp.ones_like(largest)))
  return jnp.ldexp(gramian, -exponent), exponent


def prepare_gramian(gramian: chex.Array) -> Gramian:
  """Checks ``G``, symmetrises it and scales it by a power of two.

  ``G`` is cast to :func:`working_dtype` and replaced by ``½(G + Gᵀ)``
  divided by ``2^e`` (:func:`scale_by_power_of_two`: the largest diagonal
  entry is then in ``[½, 1)``). Multiplying by a power of two is
  exact, so this introduces no rounding: every solver's problem is
  invariant under ``G → cG``, and it sees the same matrix whatever the
  scale of the gradients, from the smallest to the largest normal number.
  A non-finite ``G`` is replaced by zeros (so that the loops end at once)
  and reported in ``finite``.

  Raises:
    ValueError: if ``gramian`` is not a square [T, T] matrix with T >= 1.
  """
  shape = jnp.shape(gramian)
  if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
    raise ValueError(f"gramian must be a square [T, T] matrix, got shape "
                     f"{shape}.")
  gramian = jnp.asarray(gramian)
  dtype = working_dtype(gramian.dtype)
  gramian = gramian.astype(dtype)
  finite = jnp.all(jnp.isfinite(gramian))
  gramian = jnp.where(finite, gramian, jnp.zeros_like(gramian))
  scaled, exponent = scale_by_power_of_two(0.5 * (gramian + gramian.T))
  return Gramian(scaled, shape[0], dtype, finite, exponent)


# --------------------------------------------------------------------------
# Argument checks (eager): the budget's checks are base's, the package's one
# home for them; these resolve what only a solver knows (the dtype's tol).
# --------------------------------------------------------------------------


def check_max_iters(max_iters: Any) -> int:
  """``max_iters`` as a Python int >= 1 (:func:`base.check_positive_int`).

  Raises:
    ValueError: naming ``max_iters`` and the value received.
  """
  return base.check_positive_int("max_iters", max_iters)


def check_tolerance(tol: Any, dtype) -> Any:
  """``tol`` checked (>= 0, :func:`base.check_in_range`), or the default.

  None gives :func:`default_tolerance` of ``dtype``; a scalar JAX array is
  checked when its value is known and passes through under ``jit`` (e.g.
  ``optax.inject_hyperparams``).

  Raises:
    ValueError: naming ``tol`` and the value received.
  """
  if tol is None:
    return default_tolerance(dtype)
  return base.check_in_range("tol", tol, 0.0)


def check_vector(name: str, vector: Any, num_tasks: int, dtype,
                 *, batched: bool = False) -> chex.Array:
  """``vector`` cast to ``dtype``, of shape [T] (or [B, T] when ``batched``).

  Raises:
    ValueError: naming the argument and the shape received.
  """
  vector = jnp.asarray(vector).astype(dtype)
  shape = vector.shape
  good = shape == (num_tasks,) or (
      batched and len(shape) == 2 and shape[1] == num_tasks)
  if not good:
    expected = f"({num_tasks},)" + (f" or (B, {num_tasks})" if batched
                                    else "")
    raise ValueError(f"{name} must have shape {expected}, got {shape}.")
  return vector


def cholesky_solver(matrix: chex.Array):
  """A solve ``x ↦ matrix⁻¹ x`` by one Cholesky factorisation ([..., T, T])."""
  factor = jax.lax.linalg.cholesky(matrix, symmetrize_input=False)

  def solve(rhs):
    rhs = rhs[..., None]
    half = jax.lax.linalg.triangular_solve(factor, rhs, left_side=True,
                                           lower=True)
    return jax.lax.linalg.triangular_solve(
        factor, half, left_side=True, lower=True, transpose_a=True)[..., 0]

  return solve


def solve_on_support(matrix: chex.Array, support: chex.Array,
                     rhs: chex.Array, *, refinements: int = 2) -> chex.Array:
  r"""``x_S = M_SS⁻¹ r_S`` (0 off ``S``) for a PSD ``M``, accurately, cheaply.

  The block is scaled to a unit diagonal first (``D M_SS D``,
  ``D = diag(M_kk^{-1/2})``), so that tasks of very different gradient
  norms do not enter its conditioning; a ridge ``T ε`` on that unit
  diagonal (:func:`resolve_cutoff`) lets a singular block (duplicated or
  dependent gradients) factorise, and ``refinements`` steps of iterative
  refinement against the exact block remove the ridge's bias where the
  block is well conditioned. Where it is singular, the result is close to
  the minimum-norm solution.

  Args:
    matrix: ``M`` [T, T], symmetric positive semi-definite.
    support: bool[T], ``S``.
    rhs: ``r`` [T].
    refinements: refinement steps.

  Returns:
    ``x`` [T], zero off ``S``.
  """
  num_tasks = matrix.shape[-1]
  diagonal = jnp.diagonal(matrix)
  scales = jnp.where(diagonal > 0, jax.lax.rsqrt(jnp.where(diagonal > 0,
                                                           diagonal, 1)), 1)
  scaled = (matrix * scales[:, None]) * scales[None, :]
  both = support[:, None] & support[None, :]
  block = jnp.where(both, scaled, 0)
  solve = cholesky_solver(masked_matrix(
      scaled, support, resolve_cutoff(matrix.dtype, num_tasks, 1)))
  target = jnp.where(support, rhs * scales, 0)
  solution = solve(target)
  for _ in range(refinements):
    solution = solution + solve(target - matvec(block, solution))
  return jnp.where(support, solution * scales, 0)


def masked_matrix(gramian: chex.Array, support: chex.Array,
                  ridge: chex.Array) -> chex.Array:
  """``G_SS + ridge I`` on the support ``S`` and the identity off it."""
  both = support[..., :, None] & support[..., None, :]
  eye = jnp.eye(support.shape[-1], dtype=gramian.dtype)
  return (jnp.where(both, gramian, jnp.zeros((), gramian.dtype))
          + eye * jnp.where(support, ridge, jnp.ones((), gramian.dtype))[
              ..., None])

