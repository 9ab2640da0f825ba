"""DualProj: the mean gradient projected onto the dual cone of the gradients."""

from typing import NamedTuple, Optional, Sequence

import chex
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.weighting import _upgrad


class DualprojState(NamedTuple):
  """State of :func:`dualproj`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  solver_iterations: chex.Array  # i32[], active-set iterations used.
  solver_gap: chex.Array  # f32[], final relative KKT residual.
  solver_converged: chex.Array  # bool[], gap <= tol within max_iters.
  solver_outcome: chex.Array  # i32[], the solve's Outcome code.


@deprecation.renamed_arguments({"preferences": "preference"})
def dualproj(num_tasks: int, preference: Optional[Sequence[float]] = None, *,
             regularization: float = 0.0, max_iters: int = 200,
             tol: Optional[float] = None) -> base.MultiTaskStrategy:
  r"""DualProj: a combination of the gradients projected onto the dual cone.

  .. math::
    d = \Pi_{\{x : Jx \ge 0\}}\bigl(J^\top p\bigr)
      = J^\top w, \qquad
    w = \operatorname*{argmin}_{v \ge p} v^\top G v,

  with the preference vector ``p`` (default ``1/T``: the mean gradient): the
  closest direction to ``Jᵀp`` that conflicts with no task, ``J d = G w ≥ 0``
  (Quinton & Rey 2024). The box-constrained QP on the Gramian is solved by
  :func:`optax_mtl.solve_dual_cone_qp`, warm-started from the
  previous step's weights (its previous solution). The solver divides
  ``G`` by a power of two (exactly), so scaling every gradient by the same
  factor scales ``d`` by it (the weights do not change).

  Options that reproduce torchjd's ``DualProj(pref_vector, norm_eps,
  reg_eps)``:

  * ``preference``: torchjd's ``pref_vector`` (any finite vector).
  * ``regularization``: torchjd's ``reg_eps`` (1e-4 there, 0 here): the QP
    is solved on ``G / tr(G) + reg_eps · I``, which is relative to
    ``tr(G) = ‖J‖²_F``; ``J d ≥ 0`` then holds only up to the
    regularisation. torchjd's absolute ``norm_eps`` replaces ``G`` by zero
    when ``tr(G) < norm_eps``, so for gradients of norm below about 1e-2 it
    returns ``Jᵀp`` unprojected; there is no such threshold here.

  A step with a non-finite loss or Gramian is counted in ``num_skipped`` and
  the previous weights are applied again; zero and negative losses are fine.

  Args:
    num_tasks: the number of tasks T.
    preference: ``p``, T finite numbers (of any sign), the combination
      ``Jᵀp`` to project; None for ``1/T`` each (the mean gradient).
    regularization: ``ρ ≥ 0``, a ridge: the one QP is solved on
      ``G / tr(G) + ρ I`` (torchjd's ``reg_eps``); 0 for the exact
      projection.
    max_iters: the most active-set iterations of the step's QP
      (:func:`optax_mtl.solve_dual_cone_qp`'s default).
    tol: the relative KKT residual at which it stops; None: the solver's
      default for the Gramian's dtype.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy` (the dual-cone projection of one
    combination, where :func:`optax_mtl.upgrad` projects every gradient).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.dualproj(num_tasks=2)
    >>> task_grads = jnp.array([[2.0, 1.0], [-3.0, 0.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(u, 4) for u in update.tolist()]  # The mean is (-0.5, 0.5).
    [-0.3, 0.6]

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024.
  """
  num_tasks, preference_values, regularization, max_iters, tol = (
      _upgrad.check_dual_cone_options(num_tasks, preference, regularization,
                                      max_iters, tol, low=None))

  def init():
    return DualprojState(**base.common_state_fields(
        num_tasks, preference_values.astype(np.float32), gramian=True,
        solver=True, gradients=True))

  def rule(task_losses, state, gramian):
    del task_losses
    result = solvers.solve_dual_cone_qp(
        _upgrad.regularized_gramian(gramian, regularization),
        jnp.asarray(preference_values, gramian.dtype), max_iters=max_iters,
        tol=tol, warm_start=state.weights)
    return result.weights.astype(gramian.dtype), state._replace(
        **solvers.state_fields(result))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False, gramian_degree=0))
