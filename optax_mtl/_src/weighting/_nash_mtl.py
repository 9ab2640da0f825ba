"""Nash-MTL: the Nash bargaining solution among the task gradients."""

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import step

# Step sizes tried by the line search, as fractions of the largest one.
_NUM_STEP_SIZES = 24


class NashMtlState(NamedTuple):
  """State of :func:`nash_mtl`."""

  weights: chex.Array  # f32[T], the weights applied last (α, after max_norm).
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  solver_iterations: chex.Array  # i32[], Newton steps of the last solve.
  solver_gap: chex.Array  # f32[], relative residual of Gα = 1/α (see doc).
  solver_converged: chex.Array  # bool[], solver_gap <= tol.


class NashSolution(NamedTuple):
  """What :func:`_solve_nash` returns (arrays in the Gramian's dtype)."""

  weights: chex.Array  # [T], α (0 for zero-gradient tasks).
  iterations: chex.Array  # i32[].
  gap: chex.Array  # [], relative residual of Gα = 1/α.
  converged: chex.Array  # bool[].


def _relative_residual(beta, cosines, active):
  """``max_i |β_i (Cβ)_i − 1| / max(1, β_i (|C| β)_i)`` over active tasks."""
  residual = beta * (cosines @ beta) - 1.0
  magnitude = beta * (jnp.abs(cosines) @ beta)
  relative = jnp.abs(residual) / jnp.maximum(magnitude, 1.0)
  return jnp.max(jnp.where(active, relative, 0.0))


def _solve_nash(gramian: chex.Array, max_iters: int,
                tol: float) -> NashSolution:
  """Solves ``Gα = 1/α``, α > 0, by damped Newton on a convex objective.

  The tasks are rescaled to unit gradients, ``α_i = β_i / ‖g_i‖`` and
  ``C = N G N`` (unit diagonal), and Newton's method minimises the
  self-concordant ``F(β) = ½ βᵀ(C + μI)β − Σ log β_i`` whose stationary
  point is ``β ⊙ Cβ = 1`` (up to the ridge ``μ = ε`` of the dtype, the
  precision to which C is known). Newton's method is affine invariant, so
  the rescaling changes nothing but rounding. In the variables ``β ⊙ (1 +
  δ)`` the Newton system is ``(BCB + I) δ = 1 − β ⊙ Cβ`` with ``B =
  diag(β)``, whose eigenvalues are at least one. A backtracking (Armijo)
  line search keeps β > 0; within the quadratic region (Newton decrement
  below ½) the full step is taken.

  Zero-gradient tasks get α = 0 and are left out of the problem.

  Args:
    gramian: [T, T], any float dtype (float64 under ``enable_x64``).
    max_iters: the largest number of Newton steps.
    tol: stop once the relative residual is at most this.

  Returns:
    A :class:`NashSolution`.
  """
  num_tasks = gramian.shape[0]
  dtype = gramian.dtype
  eye = jnp.eye(num_tasks, dtype=dtype)
  gramian = 0.5 * (gramian + gramian.T)
  diag = jnp.diag(gramian)
  active = diag > 0
  inv_norms = jnp.where(active, 1.0 / jnp.sqrt(jnp.where(active, diag, 1.0)),
                        0.0)
  both_active = active[:, None] & active[None, :]
  # Scaled entry by entry (not via the outer product of the norms, which can
  # underflow for tiny gradients).
  cosines = (gramian * inv_norms[:, None]) * inv_norms[None, :]
  cosines = jnp.where(both_active, cosines, eye)
  ridge = jnp.finfo(dtype).eps
  regularized = cosines + ridge * eye

  def objective(beta):
    return 0.5 * beta @ (regularized @ beta) - jnp.sum(jnp.log(beta))

  def newton_step(carry):
    iteration, beta, _ = carry
    residual = beta * (regularized @ beta) - 1.0
    system = beta[:, None] * regularized * beta[None, :] + eye
    factor = jax.scipy.linalg.cho_factor(system, lower=True)
    delta = jax.scipy.linalg.cho_solve(factor, -residual)
    decrement2 = jnp.maximum(-residual @ delta, 0.0)  # λ².
    # The largest step keeping β (1 + t δ) > 0, then halvings of it.
    most_negative = jnp.max(-delta)
    t_max = jnp.where(most_negative > 0,
                      jnp.minimum(1.0, 0.99 / jnp.where(most_negative > 0,
                                                        most_negative, 1.0)),
                      1.0)
    sizes = t_max * 0.5**jnp.arange(_NUM_STEP_SIZES, dtype=dtype)
    current = objective(beta)
    trial = jax.vmap(lambda t: objective(beta * (1.0 + t * delta)))(sizes)
    armijo = trial <= current - 0.25 * sizes * decrement2
    first_ok = jnp.argmax(armijo)
    # The damped step 1/(1 + λ) always decreases a self-concordant F and
    # keeps β > 0: the fallback when rounding defeats the line search.
    damped = 1.0 / (1.0 + jnp.sqrt(decrement2))
    size = jnp.where(jnp.any(armijo), sizes[first_ok], damped)
    size = jnp.where(decrement2 <= 0.25, 1.0, size)
    new_beta = beta * (1.0 + size * delta)
    new_beta = jnp.where(active, new_beta, 1.0)
    gap = _relative_residual(new_beta, regularized, active)
    return iteration + 1, new_beta, gap

  def not_done(carry):
    iteration, _, gap = carry
    return (iteration < max_iters) & (gap > tol)

  beta0 = jnp.ones((num_tasks,), dtype)
  gap0 = _relative_residual(beta0, regularized, active)
  iterations, beta, _ = jax.lax.while_loop(
      not_done, newton_step, (jnp.zeros([], jnp.int32), beta0, gap0))
  gap = _relative_residual(beta, cosines, active)
  return NashSolution(
      weights=jnp.where(active, beta * inv_norms, 0.0),
      iterations=iterations,
      gap=gap,
      converged=gap <= tol)


def nash_mtl(
    num_tasks: int,
    max_iters: int = 50,
    tol: float = 1e-5,
    max_norm: Optional[float] = None,
) -> base.MultiTaskStrategy:
  r"""Nash-MTL: the update as the Nash bargaining solution of the tasks.

  The weights :math:`\alpha > 0` solve

  .. math::
    G \alpha = 1 / \alpha \quad (\text{elementwise}), \qquad
    d = \sum_{i=1}^{T} \alpha_i g_i,

  so that every task's utility :math:`g_i \cdot d = 1 / \alpha_i` and
  :math:`\lVert d \rVert^2 = \alpha^\top G \alpha = T`. The paper solves
  this by a sequence of convex programs (cvxpy); here it is the stationary
  point of the convex :math:`F(\alpha) = \tfrac12 \alpha^\top G \alpha -
  \sum_i \log \alpha_i`, found by damped Newton steps with a line search
  (``lax.while_loop``, at most ``max_iters`` steps), in the unit-gradient
  scaling :math:`\beta_i = \alpha_i \sqrt{G_{ii}}`, which makes the solver
  insensitive to the scale of the gradients. ``solver_gap`` is the relative
  residual :math:`\max_i |\alpha_i (G\alpha)_i - 1| / \max(1, \alpha_i
  (|G| \alpha)_i)` (a backward error: rounding makes it about
  :math:`T\varepsilon`, whatever the conditioning); ``solver_converged``
  says it is at most ``tol``.

  Degenerate cases. A task with a zero gradient cannot be bargained with
  (:math:`G_{ii} = 0`): it gets :math:`\alpha_i = 0` and the others are
  solved among themselves. When the gradients are linearly dependent the
  solution still exists unless some positive combination of them is zero
  (e.g. two exactly opposite gradients: no direction helps both). Then
  :math:`F` is unbounded below and the weights grow along that combination
  while the relative residual decays like :math:`1/\beta^2`: the solver
  stops once it is below ``tol``, with finite weights of order
  :math:`\text{tol}^{-1/2} / \lVert g_i \rVert` and an update close to
  zero. A ridge of one rounding unit (:math:`\varepsilon I` on the
  unit-diagonal Gramian, the precision G is known to) keeps the Newton
  system positive definite and bounds the weights even for a tiny ``tol``.

  ``max_norm`` (the authors' code clips the combined gradient to 1.0): when
  :math:`\sqrt{\alpha^\top G \alpha} > \text{max\_norm}` the weights are
  scaled by :math:`\text{max\_norm} / \sqrt{\alpha^\top G \alpha}`. Unlike
  this exact solve, the authors' code divides G by its Frobenius norm first,
  so its update grows with the gradients; here :math:`\lVert d \rVert =
  \sqrt{T}` whatever their scale.

  A step with a non-finite loss or Gramian is counted in ``num_skipped``;
  the previous weights and solver diagnostics are kept.

  Args:
    num_tasks: the number of tasks T.
    max_iters: the largest number of Newton steps per solve.
    tol: the relative residual at which the solver stops.
    max_norm: optional bound on the norm of the combined update (on the
      parameters of the Gramian); None for no bound.

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
    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  base.check_positive_int("max_iters", max_iters)
  tol = base.check_in_range("tol", tol, 0.0, 1.0, low_inclusive=False,
                            high_inclusive=False)
  if max_norm is not None:
    max_norm = base.check_in_range("max_norm", max_norm, 0.0,
                                   low_inclusive=False)

  def init():
    return NashMtlState(**base.common_state_fields(
        num_tasks, gramian=True, solver=True))

  def rule(task_losses, state, gramian):
    del task_losses
    solution = _solve_nash(gramian, max_iters, tol)
    weights = solution.weights
    if max_norm is not None:
      norm = jnp.sqrt(jnp.clip(weights @ (gramian @ weights), min=0.0))
      weights = jnp.where(norm > max_norm,
                          weights * (max_norm / jnp.where(norm > 0, norm, 1.0)),
                          weights)
    return weights, state._replace(
        solver_iterations=solution.iterations,
        solver_gap=solution.gap.astype(jnp.float32),
        solver_converged=solution.converged)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False))
