"""FairGrad: α-fair allocation of the update among the tasks."""

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.solvers import _alpha_fair


class FairgradState(NamedTuple):
  """State of :func:`fairgrad`."""

  weights: chex.Array  # f32[T], the weights applied last (w).
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  solver_iterations: chex.Array  # i32[], Newton steps used.
  solver_gap: chex.Array  # f32[], final relative residual.
  solver_converged: chex.Array  # bool[], solver_gap <= tol.
  solver_outcome: chex.Array  # i32[], the solve's Outcome code.
  solution: chex.Array  # f32[T], u = w ⊙ diag(G)^{α/(α+1)} of the last
  #                       solve (its warm start; 0 before the first: cold).


def fairgrad(
    num_tasks: int,
    alpha: float = 2.0,
    *,
    max_iters: int = 100,
    tol: Optional[float] = None,
) -> base.MultiTaskStrategy:
  r"""FairGrad: the update that allocates progress α-fairly among the tasks.

  The update :math:`d = \sum_k w_k g_k` maximises the α-fair utility
  :math:`\sum_k (g_k^\top d)^{1-\alpha} / (1 - \alpha)` of the tasks'
  first-order progress, whose optimality condition is

  .. math::
    G w = w^{-1/\alpha} \quad (\text{elementwise}, w > 0),

  solved in the compiled step by damped Newton steps
  (:func:`optax_mtl.solve_alpha_fair`). α = 1 gives Nash-MTL's
  bargaining solution (proportional fairness), α → ∞ max-min fairness,
  α → 0 the plain sum. The weights of gradients scaled by c are
  :math:`c^{-\alpha/(\alpha+1)}` times the weights, so the update scales as
  :math:`c^{1/(\alpha+1)}`.

  When no solution exists (a non-negative combination of the task gradients
  is zero, e.g. two opposite gradients), the solver reports it
  (``solver_converged`` False) and the weights are 0: a zero update, as at a
  Pareto-stationary point. A zero-gradient task gets weight 0. Each solve
  is warm-started from the previous step's solution, kept in the state
  without the gradients' scale (``solution`` :math:`u = w \odot
  \operatorname{diag}(G)^{\alpha/(\alpha+1)}`, which follows the norms of
  the gradients from step to step): one or two Newton steps usually
  suffice in training. The solution does not depend on the start; the
  first step starts cold.
  A step with a non-finite loss or Gramian is counted in ``num_skipped``
  and the previous weights applied (the state, ``solution`` included, is
  kept); zero and negative losses are ordinary values.

  Args:
    num_tasks: the number of tasks T.
    alpha: α > 0 (default 2.0, the value of the authors' scripts).
    max_iters: the most Newton steps per step
      (:func:`optax_mtl.solve_alpha_fair`'s default).
    tol: the solver's relative residual (None: the dtype's default).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.fairgrad(num_tasks=2, alpha=1.0)
    >>> task_grads = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(w, 4) for w in state.weights.tolist()]  # w_k = 1/‖g_k‖.
    [0.5, 1.0]

  References:
    Ban & Ji, `Fair Resource Allocation in Multi-Task Learning
    <https://arxiv.org/abs/2402.15638>`_, ICML 2024.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  alpha = base.check_in_range("alpha", alpha, 0.0, low_inclusive=False)
  if not isinstance(alpha, float):
    raise ValueError(
        f"alpha must be a Python number (it shapes the solver), got {alpha!r}.")
  max_iters, tol = base.check_solver_options(max_iters, tol)

  def init():
    return FairgradState(
        **base.common_state_fields(num_tasks, gramian=True, solver=True,
                                   gradients=True),
        solution=jnp.zeros((num_tasks,), jnp.float32))

  def rule(task_losses, state, gramian):
    del task_losses
    result = solvers.solve_alpha_fair(gramian, alpha, max_iters=max_iters,
                                     tol=tol, warm_start=state.solution)
    return result.weights, state._replace(
        solution=_alpha_fair.scale_free_solution(
            result.weights, gramian, alpha).astype(jnp.float32),
        **solvers.state_fields(result))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False,
      # c G w' = w'^{-1/α} is solved by w' = c^{-α/(α+1)} w.
      gramian_degree=-alpha / (alpha + 1)))
