"""PCD: the first task's gradient, bent just enough to help every other."""

from typing import Any, NamedTuple, Sequence, Union

import chex
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step


class PcdState(NamedTuple):
  """State of :func:`pcd`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  solver_iterations: chex.Array  # i32[], active-set iterations used.
  solver_gap: chex.Array  # f32[], final relative violation (max f32 when
  #                         the constraints were infeasible).
  solver_converged: chex.Array  # bool[], gap <= tol (False: infeasible).
  solver_outcome: chex.Array  # i32[], the solve's Outcome code.
  # f32[T], the moving average of ‖g_k‖² (not bias-corrected).
  squared_norm_average: chex.Array
  num_steps: chex.Array  # i32[], accepted steps (for the bias correction).
  solution: chex.Array  # f32[T], the QP's (1, μ) of the last step: its
  #                       active set warm-starts the next solve.


def _check_taus(tau: Any, num_tasks: int) -> Union[float, np.ndarray, Any]:
  """``tau``: a number in [0, 1] (or a scalar array), or T − 1 of them."""
  if np.ndim(tau) == 0 or isinstance(tau, (int, float)):
    return base.check_in_range("tau", tau, 0.0, 1.0)
  try:
    values = np.asarray(tau, np.float64)
  except (TypeError, ValueError) as error:
    raise ValueError(f"tau must be a number in [0, 1] or {num_tasks - 1} of "
                     f"them, got {tau!r}.") from error
  if values.shape != (num_tasks - 1,) or not np.all(
      (values >= 0) & (values <= 1)):
    raise ValueError(
        f"tau must be a number in [0, 1] or {num_tasks - 1} numbers in "
        f"[0, 1] (one per secondary task), got {tau!r}.")
  return values


def pcd_weights(gramian: chex.Array, squared_norm_average: chex.Array,
                num_steps: chex.Array, tau: Any, decay: Any, eps: Any, *,
                max_iters: int, tol: Any, warm_start: Any = None):
  """PCD's weights from the Gramian and the moving average (one step).

  Returns:
    ``(weights [T], new average f32[T], solver result)``.
  """
  num_tasks = gramian.shape[0]
  dtype = gramian.dtype
  squared_norms = jnp.maximum(jnp.diagonal(gramian), 0)
  # 1 − β from a Python β in float64 (1 − float32(0.999) is off by 1e-5),
  # and 1 − βⁿ = −expm1(n log1p(−(1 − β))), accurate to float32 round-off.
  one_minus_decay = (jnp.float32(1.0 - decay) if isinstance(decay, float)
                     else 1 - jnp.asarray(decay, jnp.float32))
  average = squared_norm_average + one_minus_decay * (
      squared_norms.astype(jnp.float32) - squared_norm_average)
  correction = -jnp.expm1(num_steps.astype(jnp.float32)
                          * jnp.log1p(-one_minus_decay))
  debiased = average / correction
  denominators = jnp.sqrt(debiased + jnp.asarray(eps, jnp.float32))
  # A zero average: the gradient was always zero, its scale does not matter.
  scales = solvers.safe_divide(1.0, denominators).astype(dtype)
  normalised = (gramian * scales[:, None]) * scales[None, :]
  taus = jnp.broadcast_to(jnp.asarray(tau, dtype), (num_tasks - 1,))
  result = solvers.solve_priority_qp(normalised, taus, max_iters=max_iters,
                                     tol=tol, warm_start=warm_start)
  combination = result.weights.astype(dtype)  # (1, μ) on the g̃_k.
  direction_sq = combination @ normalised @ combination  # ‖d̃‖².
  magnitude = (jnp.abs(combination) @ solvers.gradient_norms(normalised))**2
  # d̃ rescaled to ‖g_1‖; zero when g_1 = 0 or d̃ = 0 within round-off.
  nonzero = (squared_norms[0] > 0) & (
      direction_sq > solvers.resolve_cutoff(dtype, num_tasks, magnitude))
  factor = jnp.sqrt(solvers.safe_divide(squared_norms[0],
                                        jnp.where(nonzero, direction_sq, 1)))
  weights = jnp.where(nonzero, combination * scales * factor, 0)
  return weights, average, result


@deprecation.renamed_arguments({"beta": "decay"})
def pcd(
    num_tasks: int,
    tau: Union[float, Sequence[float]] = 0.02,
    decay: float = 0.999,
    *,
    eps: float = 1e-8,
    max_iters: int = 200,
    tol: Union[None, float] = None,
) -> base.MultiTaskStrategy:
  r"""PCD: priority-constrained descent (task 0 first, progress for all).

  The first task is the primary one. The update follows its gradient as
  closely as possible, subject to every other task receiving at least a
  fraction ``τ`` of the first-order progress that a step along its own
  (normalised) gradient would give:

  .. math::
    \tilde d = \operatorname*{argmin}_d \tfrac12
      \lVert d - \tilde g_1 \rVert^2
    \quad\text{s.t.}\quad \tilde g_j^\top d \ge \tau_j
      \lVert \tilde g_j \rVert^2, \quad j = 2, \dots, T,
    \qquad d = \frac{\lVert g_1 \rVert}{\lVert \tilde d \rVert}\,\tilde d,

  with the normalised gradients ``g̃_k = s_k g_k``, ``s_k = 1/√(v̂_k + ε)``
  and ``v̂_k`` the bias-corrected moving average of ``‖g_k‖²`` (decay
  ``β``, the old average's weight) over the steps. The QP is solved exactly
  through its dual on the Gramian (:func:`optax_mtl.solve_priority_qp`):
  ``d̃ = g̃_1
  + Σ_j μ_j g̃_j`` with the multipliers ``μ ≥ 0``, so the weights are
  ``w = (1, μ) ∘ s · ‖g_1‖/‖d̃‖``. Each solve starts from the previous
  step's active set (kept in ``solution``): in steady training it is
  already optimal and the solver makes no iteration. Special cases (Varam et al.; torchjd's
  ``PCD``): ``g_1 = 0`` gives ``d = 0``; constraints that cannot hold
  together (e.g. two opposed secondary gradients, ``T ≥ 3``) are dropped,
  ``d = g_1`` (``solver_converged`` is then False and ``solver_gap`` the
  largest float32); ``d̃ = 0`` within round-off gives ``d = 0``.

  Thanks to the normalisation, ``τ`` is scale-free: multiplying a secondary
  task's gradient by a constant at every step leaves ``d`` unchanged (up to
  ``ε``), and ``d`` scales with the primary gradient. The strategy is not
  symmetric in the tasks: order them with the primary first.

  Defaults ``tau = 0.02``, ``decay = 0.999``, ``eps = 1e-8`` are torchjd's
  (``PCD(tau, beta, eps)``, whose ``beta`` is ``decay`` here, the name of
  an old average's weight; this reproduces it); ``tau`` may also give
  one fraction per secondary task. Differences from torchjd: it solves in
  float64 on the CPU, this in the Gramian's dtype (float32; float64 under
  ``jax_enable_x64``, the way to match it to round-off); it treats a
  gradient as a combination of the active ones below a relative ``‖z‖²``
  of ``max(1e-9, 10 ε)``, this below ``√ε``
  (the priority solver's dependence cut-off); and on a
  non-finite input it returns NaN, where this rejects the step.

  A step with a non-finite loss or Gramian is counted in ``num_skipped``:
  the previous weights are applied again and the moving average is kept.
  Zero and negative losses are fine (the losses are not read).

  Args:
    num_tasks: the number of tasks T; task 0 is the primary one.
    tau: ``τ`` in ``[0, 1]``, or T − 1 such numbers (tasks 1, ..., T − 1).
    decay: ``β`` in ``[0, 1)``, the weight of the old average in the moving
      average of ``‖g_k‖²``, ``v ← β v + (1 − β) ‖g_k‖²``.
    eps: ``ε >= 0``, added to the average before its inverse square root.
    max_iters: the most dual active-set iterations of the step's QP
      (:func:`optax_mtl.solve_priority_qp`'s default).
    tol: the relative constraint violation at which that QP stops; None:
      the solver's default for the Gramian's dtype.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy` that favours task 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.pcd(num_tasks=2, tau=0.5)
    >>> task_grads = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # They conflict.
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> # d̃ = g̃₁ + μ g̃₂ with g̃₂ᵀd̃ = ½‖g̃₂‖², rescaled to ‖g₁‖ = 1.
    >>> [round(u, 4) for u in update.tolist()]
    [0.1691, 0.9856]

  References:
    Varam et al., "Not All Objectives Are Born Equal: Priority-Constrained
    Descent for Hierarchical Multi-Objective Optimization", TMLR 2026,
    https://openreview.net/forum?id=HT01yGHLEt; torchjd's ``PCD``.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  tau = _check_taus(tau, num_tasks)
  decay = base.check_in_range("decay", decay, 0.0, 1.0, high_inclusive=False)
  eps = base.check_in_range("eps", eps, 0.0)
  max_iters, tol = base.check_solver_options(max_iters, tol)

  def init():
    return PcdState(
        **base.common_state_fields(num_tasks, gramian=True, solver=True,
                                   gradients=True),
        squared_norm_average=jnp.zeros((num_tasks,), jnp.float32),
        num_steps=jnp.zeros([], jnp.int32),
        solution=jnp.zeros((num_tasks,), jnp.float32).at[0].set(1))

  def rule(task_losses, state, gramian):
    del task_losses
    num_steps = optax.safe_increment(state.num_steps)
    weights, average, result = pcd_weights(
        gramian, state.squared_norm_average, num_steps, tau, decay, eps,
        max_iters=max_iters, tol=tol, warm_start=state.solution)
    return weights, state._replace(
        squared_norm_average=average, num_steps=num_steps,
        solution=result.weights.astype(jnp.float32),
        **solvers.state_fields(result))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False))
