"""CAGrad: the best worst-task improvement in a ball around the mean gradient."""

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import solvers
from optax_mtl._src import step


class CagradState(NamedTuple):
  """State of :func:`cagrad`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  solver_iterations: chex.Array  # i32[], Frank-Wolfe iterations used.
  solver_gap: chex.Array  # f32[], final Frank-Wolfe duality gap.
  solver_converged: chex.Array  # bool[], gap <= tol within max_iters.
  solution: chex.Array  # f32[T], the solver's w* of the last step.


def cagrad(
    num_tasks: int,
    *,
    c: float = 0.5,
    rescale: bool = False,
    max_iters: int = 1000,
    tol: Optional[float] = 1e-6,
) -> base.MultiTaskStrategy:
  r"""CAGrad: conflict-averse gradient descent.

  .. math::
    \max_{d} \min_{k} g_k^\top d \ \text{ s.t. }
      \lVert d - g_0 \rVert \le c \lVert g_0 \rVert
    \quad\Longrightarrow\quad
    d = g_0 + \frac{\sqrt{\phi}}{\lVert g_{w} \rVert} g_{w},

  with ``g_0 = (1/T) Σ_k g_k`` the mean gradient, ``φ = c² ‖g_0‖²``,
  ``g_w = Σ_k w_k g_k`` and ``w`` the solution of the dual problem
  ``min_{w ∈ Δ} g_wᵀ g_0 + √φ ‖g_w‖``, solved on the Gramian by
  :func:`~optax_mtl._src.solvers.solve_cagrad` (Liu et al. 2021, Eq. 4 and
  Algorithm 1), warm-started from the last step's ``w`` (kept in
  ``solution``). The returned weights are ``1/T + (√φ / ‖g_w‖) w_k``, divided
  by ``1 + c²`` with ``rescale=True``. The default (``rescale=False``) is the
  paper's update; ``rescale=True`` is the authors' code (their ``rescale=1``),
  which keeps the update's length comparable to ``g_0`` across values of
  ``c``. ``c = 0`` gives the mean gradient. When ``g_w = 0`` (a
  Pareto-stationary point) the weights are ``1/T``.

  A step with a non-finite loss or Gramian is counted in ``num_skipped`` and
  the previous weights are applied again; zero and negative losses are fine.

  Args:
    num_tasks: the number of tasks T.
    c: the radius of the ball around ``g_0``, relative to ``‖g_0‖``;
      ``c ≥ 0`` (the paper recommends ``c < 1`` for convergence).
    rescale: divide the update by ``1 + c²`` as in the authors' code.
    max_iters: the most Frank-Wolfe iterations per step.
    tol: the Frank-Wolfe duality gap at which to stop, on the Gramian
      divided by its largest diagonal entry (None: 1e-6 in float32).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.cagrad(num_tasks=2, c=0.5)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(u, 4) for u in update.tolist()]
    [0.75, 0.75]

  References:
    Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  c = base.check_in_range("c", c, 0.0)
  if not isinstance(rescale, bool):
    raise ValueError(f"rescale must be a bool, got {rescale!r}.")
  max_iters, tol = base.check_solver_options(max_iters, tol)
  factor = 1.0 / (1.0 + c**2) if rescale else 1.0

  def init():
    return CagradState(
        **base.common_state_fields(num_tasks, factor / num_tasks, gramian=True,
                                   solver=True),
        solution=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))

  def rule(task_losses, state, gramian):
    del task_losses
    mean = jnp.full((num_tasks,), 1.0 / num_tasks, gramian.dtype)
    if c == 0.0:
      return (mean * factor).astype(jnp.float32), state
    result = solvers.solve_cagrad(gramian, c, max_iters=max_iters, tol=tol,
                                  warm_start=state.solution)
    # The ratio √φ / ‖g_w‖ is scale-free: measure it on G / max_k G_kk.
    scale = jnp.max(jnp.diag(gramian))
    normalised = gramian / jnp.where(scale > 0, scale, 1.0)
    radius = c * jnp.sqrt(jnp.maximum(mean @ normalised @ mean, 0.0))
    norm = jnp.sqrt(jnp.maximum(
        result.weights @ normalised @ result.weights, 0.0))
    positive = norm > 0
    ratio = jnp.where(positive, radius / jnp.where(positive, norm, 1.0), 0.0)
    weights = factor * (mean + ratio * result.weights)
    return weights.astype(jnp.float32), state._replace(
        solution=result.weights.astype(jnp.float32),
        solver_iterations=result.iterations.astype(jnp.int32),
        solver_gap=result.gap.astype(jnp.float32),
        solver_converged=result.converged)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False))
