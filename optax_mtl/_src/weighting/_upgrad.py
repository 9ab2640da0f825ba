"""UPGrad: the average of the task gradients projected onto the dual cone."""

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import solvers
from optax_mtl._src import step


class UpgradState(NamedTuple):
  """State of :func:`upgrad`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  solver_iterations: chex.Array  # i32[], most active-set iterations of the T.
  solver_gap: chex.Array  # f32[], largest final residual of the T problems.
  solver_converged: chex.Array  # bool[], all T problems converged.
  solutions: chex.Array  # f32[T, T], row i: v^(i) of the last step.


def upgrad(
    num_tasks: int,
    *,
    max_iters: int = 200,
    tol: Optional[float] = 1e-6,
) -> base.MultiTaskStrategy:
  r"""UPGrad: every task gradient projected onto the dual cone, averaged.

  .. math::
    d = \frac{1}{T} \sum_{i=1}^{T} \Pi_{\{x : Jx \ge 0\}}(g_i)
      = J^\top w, \qquad
    w = \frac{1}{T} \sum_{i=1}^{T} v^{(i)}, \quad
    v^{(i)} = \operatorname*{argmin}_{v \ge e_i} v^\top G v,

  (Quinton & Rey 2024). ``d`` conflicts with no task, ``J d = G w ≥ 0``; it
  equals the mean gradient when no two gradients conflict; and it is linear
  under scaling: with the gradients scaled by ``c_i > 0``, ``d`` becomes
  ``(1/T) Σ c_i Π(g_i)``. The T box-constrained QPs on the Gramian are solved
  together (``vmap``) by :func:`~optax_mtl._src.solvers.solve_dual_cone_qp`,
  each warm-started from its solution of the previous step (kept in
  ``solutions``): when the Gramian changes little, the active sets do not
  change and no iteration is needed. The diagnostics report the worst of the
  T problems.

  A step with a non-finite loss or Gramian is counted in ``num_skipped`` and
  the previous weights are applied again; zero and negative losses are fine.

  Args:
    num_tasks: the number of tasks T.
    max_iters: the most active-set iterations per problem and step.
    tol: the projected-gradient residual at which to stop, on the Gramian
      divided by its largest diagonal entry (None: 1e-6 in float32).

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
    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  max_iters, tol = base.check_solver_options(max_iters, tol)

  def init():
    return UpgradState(
        **base.common_state_fields(num_tasks, 1.0 / num_tasks, gramian=True,
                                   solver=True),
        solutions=jnp.eye(num_tasks, dtype=jnp.float32))

  def rule(task_losses, state, gramian):
    del task_losses
    results = jax.vmap(
        lambda lower, guess: solvers.solve_dual_cone_qp(
            gramian, lower, max_iters=max_iters, tol=tol, warm_start=guess))(
                jnp.eye(num_tasks, dtype=gramian.dtype), state.solutions)
    weights = jnp.mean(results.weights, axis=0)
    return weights.astype(jnp.float32), state._replace(
        solutions=results.weights.astype(jnp.float32),
        solver_iterations=jnp.max(results.iterations).astype(jnp.int32),
        solver_gap=jnp.max(results.gap).astype(jnp.float32),
        solver_converged=jnp.all(results.converged))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False))
