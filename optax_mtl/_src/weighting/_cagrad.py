"""CAGrad: the best worst-task improvement in a ball around the mean gradient."""

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import solvers
from optax_mtl._src import step


class CagradState(NamedTuple):
  """State of :func:`cagrad`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  solver_iterations: chex.Array  # i32[], Frank-Wolfe steps on the dual.
  solver_gap: chex.Array  # f32[], the dual's relative gap (f32 max: none).
  solver_converged: chex.Array  # bool[], that gap met tol in max_iters.
  solver_outcome: chex.Array  # i32[], the dual solve's Outcome code.
  solution: chex.Array  # f32[T], the dual's w of the last step (its warm
  #                       start; 1/T before the first).


RESCALE_MODES = (0, 1, 2)


def cagrad(
    num_tasks: int,
    c: float = 0.5,
    *,
    rescale: int = 0,
    max_iters: int = 1000,
    tol: Optional[float] = None,
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
  :func:`optax_mtl.solve_cagrad` (Liu et al. 2021, Eq. 4 and
  Algorithm 1), warm-started from the last step's ``w`` (kept in
  ``solution``). The returned weights are ``1/T + (√φ / ‖g_w‖) w_k``,
  divided according to ``rescale``. ``c = 0`` gives the mean gradient. When
  ``g_w`` is zero to the precision of G and of ``w`` (``‖g_w‖² ≤ T ε
  wᵀ|G|w``, the round-off of the quadratic form, on the weights above
  ``T ε max_k w_k``, those the simplex resolves: below it the norm is not
  resolved, let alone the direction; a Pareto-stationary point), Algorithm 1's ``g_w / ‖g_w‖`` is undefined and
  the weights are ``1/T``: ``d = g_0``. (torchjd's ``CAGrad`` returns zero
  weights there, below its absolute ``norm_eps``.) The ratio
  ``√φ / ‖g_w‖`` is scale-free and the solver divides ``G`` by a power of
  two (exactly), so the weights do not depend on the common scale of the
  gradients: the update scales with them.

  ``rescale`` reproduces LibMTL's ``CAGrad(rescale=...)`` (the authors'
  code): ``0`` the paper's update (the default here), ``1`` the update
  divided by ``1 + c²`` (LibMTL's default, which keeps its length
  comparable to ``g_0`` across values of ``c``), ``2`` divided by
  ``1 + c``. (LibMTL adds ``1e-8`` to ``‖g_0‖`` and to ``‖g_w‖``, absolute
  terms left out here.) ``True`` and ``False`` mean ``1`` and ``0``.

  A step with a non-finite loss or Gramian is counted in ``num_skipped`` and
  the previous weights are applied again; zero and negative losses are fine.

  Args:
    num_tasks: the number of tasks T.
    c: the radius of the ball around ``g_0``, relative to ``‖g_0‖``;
      ``c ≥ 0`` (the paper recommends ``c < 1`` for convergence).
    rescale: ``0``, ``1`` or ``2``, LibMTL's rescaling of the update (see
      above).
    max_iters: the most Frank-Wolfe iterations on the dual per step
      (:func:`optax_mtl.solve_cagrad`'s default).
    tol: the dual's relative duality gap at which to stop; None: the
      solver's default for the Gramian's dtype.

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
    Liu, Liu, Jin, Stone & Liu, `Conflict-Averse Gradient Descent for
    Multi-task Learning <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  c = base.check_in_range("c", c, 0.0)
  if isinstance(rescale, (bool, np.bool_)):
    rescale = int(rescale)
  if (not isinstance(rescale, (int, np.integer))
      or int(rescale) not in RESCALE_MODES):
    raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}.")
  rescale = int(rescale)
  max_iters, tol = base.check_solver_options(max_iters, tol)
  factor = {0: 1.0, 1: 1.0 / (1.0 + c**2), 2: 1.0 / (1.0 + c)}[rescale]

  def init():
    return CagradState(
        **base.common_state_fields(num_tasks, factor / num_tasks, gramian=True,
                                   solver=True, gradients=True),
        solution=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))

  def rule(task_losses, state, gramian):
    del task_losses
    dtype = gramian.dtype
    mean = jnp.full((num_tasks,), 1 / num_tasks, dtype)
    if isinstance(c, float) and c == 0.0:
      return mean * factor, state
    result = solvers.solve_cagrad(gramian, c, max_iters=max_iters, tol=tol,
                                  warm_start=state.solution)
    # The ratio √φ / ‖g_w‖ is scale-free: measure it on G / 2^e (exact).
    normalised, _ = solvers.scale_by_power_of_two(0.5 * (gramian + gramian.T))
    radius = c * jnp.sqrt(jnp.maximum(mean @ normalised @ mean, 0))
    solution = result.weights.astype(dtype)
    squared = solution @ normalised @ solution
    # ‖g_w‖² below its own round-off is not resolved: its direction is
    # noise (a Pareto-stationary point). Measured on the weights the simplex
    # resolves (above T ε max_k w_k; the rest is the solver's round-off),
    # against T ε wᵀ|G|w, the magnitudes the quadratic form sums there: a
    # w resting on small gradients is resolved however large the others are.
    resolved = jnp.where(
        solution > solvers.resolve_cutoff(dtype, num_tasks,
                                          jnp.max(solution)), solution, 0)
    positive = resolved @ normalised @ resolved > solvers.resolve_cutoff(
        dtype, num_tasks, resolved @ jnp.abs(normalised) @ resolved)
    norm = jnp.sqrt(jnp.where(positive, squared, 1))
    ratio = jnp.where(positive, radius / norm, 0)
    weights = factor * (mean + ratio * solution)
    return weights, state._replace(solution=solution.astype(jnp.float32),
                                   **solvers.state_fields(result))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False, gramian_degree=0))
