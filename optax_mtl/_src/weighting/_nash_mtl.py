"""Nash-MTL: the Nash bargaining solution among the task gradients."""

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.solvers import _alpha_fair


class NashMtlState(NamedTuple):
  """State of :func:`nash_mtl`."""

  weights: chex.Array  # f32[T], the weights applied last (α, after max_norm).
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  solver_iterations: chex.Array  # i32[], Newton steps of the last solve.
  solver_gap: chex.Array  # f32[], relative residual of Gα = 1/α (see doc).
  solver_converged: chex.Array  # bool[], solver_gap <= tol.
  solver_outcome: chex.Array  # i32[], an optax_mtl.Outcome code (see doc).
  solution: chex.Array  # f32[T], β = α ⊙ ‖g‖ of the last solve (its warm
  #                       start; 0 before the first: a cold start).


@deprecation.renamed_arguments(
    old_positional=("num_tasks", "max_iters", "tol", "max_norm"))
def nash_mtl(
    num_tasks: int,
    *,
    max_norm: Optional[float] = None,
    max_iters: int = 50,
    tol: Optional[float] = None,
) -> base.MultiTaskStrategy:
  r"""Nash-MTL: the update as the Nash bargaining solution of the tasks.

  The weights :math:`\alpha > 0` solve

  .. math::
    G \alpha = 1 / \alpha \quad (\text{elementwise}), \qquad
    d = \sum_{i=1}^{T} \alpha_i g_i,

  so that every task's utility :math:`g_i \cdot d = 1 / \alpha_i` and
  :math:`\lVert d \rVert^2 = \alpha^\top G \alpha = T`: the update does
  not depend on the scale of the gradients (scaling them all by
  :math:`c > 0` scales :math:`\alpha` by :math:`1/c` and leaves :math:`d`
  unchanged). The paper solves this by a sequence of convex programs
  (cvxpy); here :func:`optax_mtl.solve_nash` finds the
  stationary point of the convex :math:`F(\alpha) = \tfrac12 \alpha^\top
  G \alpha - \sum_i \log \alpha_i` by damped Newton steps
  (``lax.while_loop``, at most ``max_iters``), in the unit-gradient
  scaling. ``solver_gap`` is the relative residual
  :math:`\max_i |\alpha_i (G\alpha)_i - 1|` (a backward error, zero once
  below round-off); ``solver_converged`` says it is at most ``tol``
  (default: 1e-6 in float32, 1e-12 in float64).

  Degenerate cases. A task with a zero gradient cannot be bargained with
  (:math:`G_{ii} = 0`): it gets :math:`\alpha_i = 0` and the others are
  solved among themselves. When some positive combination of the unit
  gradients is zero (e.g. two exactly opposite gradients: no direction
  helps both) there is no solution: :math:`F` is unbounded below. The
  solver stops as soon as that combination cancels to round-off, before
  the weights overflow, and the strategy applies the documented fallback
  :math:`\alpha = 0`, a zero update: the disagreement point of the
  bargaining game, as MGDA's update is zero at such a Pareto-stationary
  point. The step is accepted (not counted in ``num_skipped``) and
  reported: ``solver_outcome = optax_mtl.Outcome.NO_SOLUTION`` (3),
  ``solver_converged = False`` and ``solver_gap`` the largest float32.
  Otherwise ``solver_outcome`` is ``SUCCESS`` (0), ``MAX_ITERS`` (1) or
  ``STALLED`` (4).

  ``max_norm``: when :math:`\sqrt{\alpha^\top G \alpha} > \text{max\_norm}`
  the weights are scaled by :math:`\text{max\_norm} / \sqrt{\alpha^\top G
  \alpha}`. ``max_norm=1.0`` reproduces both peers' default: torchjd's
  ``NashMTL(max_norm=1.0)`` rescales the weights exactly so; LibMTL's
  ``Nash_MTL`` (the authors' code) applies ``clip_grad_norm_(max_norm)`` to
  the shared parameters' gradient, the same up to the ``1e-6`` it adds to
  the norm. Since :math:`\lVert d \rVert = \sqrt{T} > 1` for
  :math:`T \ge 2`, both peers' default update is the unit-norm
  :math:`d / \sqrt{T}`. Both peers divide G by its Frobenius norm before
  solving, but their constraint :math:`\log(\alpha_i \lVert G \rVert_F) +
  \log((G \alpha)_i / \lVert G \rVert_F) \ge 0` multiplies it back: their
  fixed point is the same :math:`G \alpha = 1/\alpha`, with
  :math:`\lVert d \rVert = \sqrt{T}` at every scale, as here.

  Each solve is warm-started from the previous step's solution, kept in
  the state as the scale-free ``solution`` :math:`\beta = \alpha \odot
  \lVert g \rVert` (the cosines change little from step to step, so one or
  two Newton steps usually suffice); the solution does not depend on the
  start. The first step, and the step after a fallback, start cold.

  A step with a non-finite loss or Gramian is counted in ``num_skipped``;
  the previous weights, solver diagnostics and ``solution`` are kept.

  Args:
    num_tasks: the number of tasks T.
    max_norm: optional bound on the norm of the combined update (on the
      parameters of the Gramian); None for no bound, 1.0 for the peers'.
    max_iters: the largest number of Newton steps per solve
      (:func:`optax_mtl.solve_nash`'s default).
    tol: the relative residual at which the solver stops (>= 0); None for
      1e-6 in float32, 1e-12 in float64.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.nash_mtl(num_tasks=2)
    >>> task_grads = jnp.array([[2.0, 0.0], [0.0, 0.5]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(w, 4) for w in state.weights.tolist()]
    [0.5, 2.0]
    >>> bool(state.solver_converged)
    True

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game
    <https://arxiv.org/abs/2202.01017>`_, ICML 2022.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  max_iters, tol = base.check_solver_options(max_iters, tol)
  if max_norm is not None:
    max_norm = base.check_in_range("max_norm", max_norm, 0.0,
                                   low_inclusive=False)

  def init():
    return NashMtlState(
        **base.common_state_fields(num_tasks, gramian=True, solver=True,
                                   gradients=True),
        solution=jnp.zeros((num_tasks,), jnp.float32))

  def rule(task_losses, state, gramian):
    del task_losses
    result = solvers.solve_nash(gramian, max_iters=max_iters, tol=tol,
                                warm_start=state.solution)
    weights = result.weights
    solution = _alpha_fair.scale_free_solution(weights, gramian, 1.0)
    if max_norm is not None:
      norm = jnp.sqrt(jnp.clip(weights @ (gramian @ weights), min=0))
      weights = jnp.where(norm > max_norm,
                          weights * solvers.safe_divide(max_norm, norm),
                          weights)
    return weights, state._replace(
        solution=solution.astype(jnp.float32),
        **solvers.state_fields(result))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False,
      # α for c·G is c^{-1/2} α; max_norm caps ‖d‖ at a fixed size, which
      # does not scale with G.
      gramian_degree=-0.5 if max_norm is None else None))
