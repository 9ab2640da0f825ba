"""MGDA: the min-norm point of the convex hull of the task gradients."""

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import solvers
from optax_mtl._src import step

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MgdaState(NamedTuple):
  """State of :func:`mgda`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  solver_iterations: chex.Array  # i32[], Frank-Wolfe iterations used.
  solver_gap: chex.Array  # f32[], final Frank-Wolfe duality gap.
  solver_converged: chex.Array  # bool[], gap <= tol within max_iters.
  solution: chex.Array  # f32[T], the solver's w* of the last step.


def mgda(
    num_tasks: int,
    *,
    max_iters: int = 1000,
    tol: Optional[float] = 1e-6,
    normalization: str = "none",
    eps: float = 1e-12,
) -> base.MultiTaskStrategy:
  r"""MGDA: the min-norm point of the convex hull of the task gradients.

  .. math::
    \alpha^\star = \operatorname*{argmin}_{\alpha \in \Delta}
      \Bigl\lVert \sum_{k=1}^{T} \alpha_k s_k g_k \Bigr\rVert^2
      = \operatorname*{argmin}_{\alpha \in \Delta} \alpha^\top D G D \alpha,
    \qquad d = \sum_k \underbrace{\alpha^\star_k s_k}_{w_k} g_k,

  with ``D = diag(s)`` the task normalisation of Sener & Koltun's code:
  ``s_k = 1`` (``"none"``: ``d`` is the min-norm point itself and the weights
  sum to 1), ``1/‖g_k‖`` (``"l2"``), ``1/L_k`` (``"loss"``) or
  ``1/(L_k ‖g_k‖)`` (``"loss+"``). ``d`` is a common descent direction of all
  tasks unless it is zero (a Pareto-stationary point): ``g_kᵀ d ≥ ‖d‖²`` for
  every task with ``α_k > 0`` (KKT). The problem is solved by
  :func:`~optax_mtl._src.solvers.solve_min_norm` (closed form for two tasks,
  pairwise Frank-Wolfe with exact line search otherwise, warm-started from
  the last step's solution, kept in ``solution``). A gradient of norm
  at most ``eps`` gets ``s_k = 0`` under the ``l2`` normalisations.

  With the Gramian of the gradients with respect to a shared representation
  (``optax_mtl.value_and_grad(..., encoder_fn=...)``) this is MGDA-UB.

  A step with a non-finite loss or Gramian (or, for ``"loss"`` and
  ``"loss+"``, a non-positive loss) is counted in ``num_skipped`` and the
  previous weights are applied again.

  Args:
    num_tasks: the number of tasks T.
    max_iters: the most Frank-Wolfe iterations per step.
    tol: the Frank-Wolfe duality gap at which to stop, measured on the
      Gramian divided by its largest diagonal entry (None: 1e-6 in float32).
    normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``.
    eps: gradient norms at or below this count as zero (``l2``, ``loss+``).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.mgda(num_tasks=2)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(u, 4) for u in update.tolist()]
    [0.8, 0.4]
    >>> [round(w, 4) for w in state.weights.tolist()]
    [0.8, 0.2]

  References:
    Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization", Comptes Rendus Mathematique 2012; Sener & Koltun,
    "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  max_iters, tol = base.check_solver_options(max_iters, tol)
  if normalization not in NORMALIZATIONS:
    raise ValueError(
        f"normalization must be one of {NORMALIZATIONS}, got "
        f"{normalization!r}.")
  eps = base.check_in_range("eps", eps, 0.0)

  def init():
    return MgdaState(
        **base.common_state_fields(num_tasks, 1.0 / num_tasks, gramian=True,
                                   solver=True),
        solution=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))

  def rule(task_losses, state, gramian):
    scales = task_scales(normalization, task_losses, gramian, eps)
    scaled = scales[:, None] * gramian * scales[None, :]
    result = solvers.solve_min_norm(scaled, max_iters=max_iters, tol=tol,
                                    warm_start=state.solution)
    weights = (result.weights * scales).astype(jnp.float32)
    return weights, state._replace(
        solution=result.weights.astype(jnp.float32),
        solver_iterations=result.iterations.astype(jnp.int32),
        solver_gap=result.gap.astype(jnp.float32),
        solver_converged=result.converged)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=normalization in ("loss", "loss+")))


def task_scales(normalization: str, task_losses: chex.Array,
                gramian: chex.Array, eps: float) -> chex.Array:
  """The diagonal ``s`` of the normalisation ``D = diag(s)`` of :func:`mgda`."""
  norms = jnp.sqrt(jnp.clip(jnp.diag(gramian), min=0.0))
  inverse_norms = jnp.where(norms > eps,
                            1.0 / jnp.where(norms > eps, norms, 1.0), 0.0)
  if normalization == "l2":
    return inverse_norms
  if normalization == "loss":
    return 1.0 / task_losses
  if normalization == "loss+":
    return inverse_norms / task_losses
  return jnp.ones_like(norms)
