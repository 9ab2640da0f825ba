"""UPGrad: the average of the task gradients projected onto the dual cone."""

from typing import Any, NamedTuple, Optional, Sequence

import chex
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step


class UpgradState(NamedTuple):
  """State of :func:`upgrad`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  solver_iterations: chex.Array  # i32[], most active-set iterations of the T.
  solver_gap: chex.Array  # f32[], largest relative KKT residual of the T.
  solver_converged: chex.Array  # bool[], all T problems converged.
  solver_outcome: chex.Array  # i32[], the worst Outcome code of the T.
  solution: chex.Array  # f32[T, T], row i: v^(i) of the last step.
  solutions = deprecation.renamed_field("solution")


def check_dual_cone_options(
    num_tasks: Any, preference: Any, regularization: Any, max_iters: Any,
    tol: Any, *, low: Optional[float]) -> tuple[int, np.ndarray, Any, int,
                                                Any]:
  """The checked options of the dual-cone strategies (upgrad, dualproj).

  Returns ``(T, p, ρ, max_iters, tol)`` with ``p`` in float64 (``1/T`` each
  for None; cast to the Gramian's dtype by the rule); ``low`` is the
  preference's lower bound (None: any finite number).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  if preference is None:
    values = np.full((num_tasks,), 1.0 / num_tasks)
  else:
    base.check_task_vector("preference", preference, num_tasks, low,
                           allow_scalar=False)
    values = np.asarray(preference, np.float64)
  regularization = base.check_in_range("regularization", regularization, 0.0)
  return (num_tasks, values, regularization,
          *base.check_solver_options(max_iters, tol))


def regularized_gramian(gramian: chex.Array, regularization: Any):
  """``G / tr(G) + ρ I`` (torchjd's normalise-then-regularise), or ``G``.

  The trace normalisation does not change any solution of the dual-cone
  QP; it makes ``ρ`` relative to ``tr(G) = ‖J‖²_F``, i.e. ``G + ρ tr(G) I``
  up to a positive factor. A zero Gramian gives ``ρ I``.
  """
  if isinstance(regularization, float) and regularization == 0.0:
    return gramian
  normalised = solvers.safe_divide(gramian,
                                   jnp.maximum(jnp.trace(gramian), 0))
  return normalised + jnp.asarray(regularization, gramian.dtype) * jnp.eye(
      gramian.shape[0], dtype=gramian.dtype)


@deprecation.renamed_arguments({"preferences": "preference"})
def upgrad(
    num_tasks: int,
    preference: Optional[Sequence[float]] = None,
    *,
    regularization: float = 0.0,
    max_iters: int = 200,
    tol: Optional[float] = None,
) -> base.MultiTaskStrategy:
  r"""UPGrad: every task gradient projected onto the dual cone, combined.

  .. math::
    d = \sum_{i=1}^{T} p_i\, \Pi_{\{x : Jx \ge 0\}}(g_i)
      = J^\top w, \qquad
    w = \sum_{i=1}^{T} p_i v^{(i)}, \quad
    v^{(i)} = \operatorname*{argmin}_{v \ge e_i} v^\top G v,

  (Quinton & Rey 2024) with the preference vector ``p`` (default ``1/T``: the
  average of the projections). ``d`` conflicts with no task,
  ``J d = G w ≥ 0``; it equals ``Σ p_i g_i`` when no two gradients
  conflict; and it is linear under scaling: with the gradients scaled by
  ``c_i > 0``, ``d`` becomes ``Σ p_i c_i Π(g_i)`` (the solver divides
  ``G`` by a power of two, exactly, so the weights do not depend on a
  common scale and ``d`` scales with it). The T box-constrained QPs on the
  Gramian are solved as one batch by
  :func:`optax_mtl.solve_dual_cone_qp`, each warm-started
  from its solution of the previous step (kept in ``solution``): when the
  Gramian changes little, the active sets do not change and no iteration
  is needed. The diagnostics report the worst of the T problems.

  Options that reproduce torchjd's ``UPGrad(pref_vector, norm_eps,
  reg_eps)`` (and LibMTL's ``UPGrad``, which copies it):

  * ``preference``: torchjd's ``pref_vector`` (non-negative; a zero
    preference drops that task's projection, as torchjd's QP does).
  * ``regularization``: torchjd's ``reg_eps`` (1e-4 there, 0 here). torchjd
    solves the QPs on ``G / tr(G) + reg_eps · I``, and so does this with
    ``regularization = reg_eps``; ``J d ≥ 0`` then holds only up to the
    regularisation. Dividing by the trace makes the regularisation relative
    (``G + reg_eps · tr(G) · I``). torchjd's ``norm_eps`` is an absolute
    threshold: when ``tr(G) = ‖J‖²_F < norm_eps`` it replaces ``G`` by zero,
    and the QPs on ``reg_eps · I`` return ``v^{(i)} = e_i``, i.e. the
    plain mean of the gradients, without any projection, for every
    gradient of norm below about 1e-2. This happens in practice late in
    training, or with small losses. There is no such threshold here: only
    ``tr(G) = 0`` (all gradients zero) is special.

  A step with a non-finite loss or Gramian is counted in ``num_skipped`` and
  the previous weights are applied again; zero and negative losses are fine.

  Args:
    num_tasks: the number of tasks T.
    preference: ``p``, T non-negative numbers weighting the T projections;
      None for ``1/T`` each (their average).
    regularization: ``ρ ≥ 0``, a ridge: each of the T QPs is solved on
      ``G / tr(G) + ρ I`` (torchjd's ``reg_eps``); 0 for the exact
      projections.
    max_iters: the most active-set iterations of each of the T problems in
      a step (:func:`optax_mtl.solve_dual_cone_qp`'s default).
    tol: the relative KKT residual at which each of them stops; None: the
      solver's default, 1e-6 in float32 and 1e-12 in float64.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.upgrad(num_tasks=2)
    >>> task_grads = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(u, 4) for u in update.tolist()]
    [0.25, 0.75]

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024.
  """
  num_tasks, preference_values, regularization, max_iters, tol = (
      check_dual_cone_options(num_tasks, preference, regularization,
                              max_iters, tol, low=0.0))

  def init():
    return UpgradState(
        **base.common_state_fields(num_tasks, preference_values.astype(
            np.float32), gramian=True, solver=True, gradients=True),
        solution=jnp.eye(num_tasks, dtype=jnp.float32))

  def rule(task_losses, state, gramian):
    del task_losses
    dtype = gramian.dtype
    results = solvers.solve_dual_cone_qp(
        regularized_gramian(gramian, regularization),
        jnp.eye(num_tasks, dtype=dtype), max_iters=max_iters, tol=tol,
        warm_start=state.solution)
    # v ≥ p_i e_i is solved by p_i v^(i) (p_i > 0) and by 0 (p_i = 0).
    solution = results.weights.astype(dtype)
    weights = jnp.asarray(preference_values, dtype) @ solution
    return weights, state._replace(solution=solution.astype(jnp.float32),
                                   **solvers.state_fields(results))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False, gramian_degree=0))
