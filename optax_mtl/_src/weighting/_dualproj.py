"""DualProj: the mean gradient projected onto the dual cone of the gradients."""

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import solvers
from optax_mtl._src import step


class DualprojState(NamedTuple):
  """State of :func:`dualproj`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  solver_iterations: chex.Array  # i32[], active-set iterations used.
  solver_gap: chex.Array  # f32[], final projected-gradient residual.
  solver_converged: chex.Array  # bool[], gap <= tol within max_iters.


def dualproj(
    num_tasks: int,
    *,
    max_iters: int = 200,
    tol: Optional[float] = 1e-6,
) -> base.MultiTaskStrategy:
  r"""DualProj: the mean gradient projected onto the dual cone of the rows.

  .. math::
    d = \Pi_{\{x : Jx \ge 0\}}\Bigl(\tfrac{1}{T} J^\top \mathbf 1\Bigr)
      = J^\top w, \qquad
    w = \operatorname*{argmin}_{v \ge \mathbf 1 / T} v^\top G v,

  the closest direction to the mean gradient that conflicts with no task:
  ``J d = G w ≥ 0`` (Quinton & Rey 2024). The box-constrained QP on the
  Gramian is solved by
  :func:`~optax_mtl._src.solvers.solve_dual_cone_qp`, warm-started from the
  previous step's weights (its previous solution). Scaling every gradient
  by the same factor scales ``d`` by it (the weights do not change).

  A step with a non-finite loss or Gramian is counted in ``num_skipped`` and
  the previous weights are applied again; zero and negative losses are fine.

  Args:
    num_tasks: the number of tasks T.
    max_iters: the most active-set iterations per step.
    tol: the projected-gradient residual at which to stop, on the Gramian
      divided by its largest diagonal entry (None: 1e-6 in float32).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

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
    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  max_iters, tol = base.check_solver_options(max_iters, tol)

  def init():
    return DualprojState(**base.common_state_fields(
        num_tasks, 1.0 / num_tasks, gramian=True, solver=True))

  def rule(task_losses, state, gramian):
    del task_losses
    mean = jnp.full((num_tasks,), 1.0 / num_tasks, gramian.dtype)
    result = solvers.solve_dual_cone_qp(gramian, mean, max_iters=max_iters,
                                        tol=tol, warm_start=state.weights)
    return result.weights.astype(jnp.float32), state._replace(
        solver_iterations=result.iterations.astype(jnp.int32),
        solver_gap=result.gap.astype(jnp.float32),
        solver_converged=result.converged)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False))
