"""MGDA: the min-norm point of the convex hull of the task gradients."""

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MgdaState(NamedTuple):
  """State of :func:`mgda`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  solver_iterations: chex.Array  # i32[], Frank-Wolfe iterations used.
  solver_gap: chex.Array  # f32[], final relative duality gap (f32 max: none).
  solver_converged: chex.Array  # bool[], gap <= tol within max_iters.
  solver_outcome: chex.Array  # i32[], the solve's Outcome code.
  solution: chex.Array  # f32[T], the min-norm α* of the last step (its
  #                       warm start; 1/T before the first).


@deprecation.renamed_arguments({"eps": "min_relative_norm"})
def mgda(
    num_tasks: int,
    *,
    normalization: str = "none",
    min_relative_norm: float = 1e-12,
    max_iters: int = 1000,
    tol: Optional[float] = None,
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
  :func:`optax_mtl.solve_min_norm` (closed form for two tasks,
  pairwise Frank-Wolfe with exact line search otherwise, warm-started from
  the last step's solution, kept in ``solution``). A gradient of norm
  at most ``min_relative_norm`` times the largest gets ``s_k = 0`` under
  the ``l2`` normalisations.

  Scale: the solver divides ``G`` by a power of two (exactly), so with
  ``"none"`` and ``"loss"`` the weights do not depend on the common scale
  of the gradients and the update scales with them; with ``"l2"`` and
  ``"loss+"`` the update is a combination of unit gradients and does not
  change when they are all scaled (the weights scale as ``1/c``).

  torchjd's ``MGDA(epsilon=1e-3, max_iters=100)`` runs plain Frank-Wolfe
  (Sener & Koltun's Algorithm 2) and stops once a step size falls below
  ``epsilon``: a looser, scale-dependent stop that the solver here does
  not offer. Its fixed point is the same min-norm point; ``tol`` here
  bounds the direction's error, ``‖d − d*‖ ≤ √tol ‖d‖``.

  With the Gramian of the gradients with respect to a shared representation
  (``optax_mtl.value_and_grad(..., encoder_fn=...)``) this is MGDA-UB.

  A step with a non-finite loss or Gramian (or, for ``"loss"`` and
  ``"loss+"``, a non-positive loss) is counted in ``num_skipped`` and the
  previous weights are applied again.

  Args:
    num_tasks: the number of tasks T.
    normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``.
    min_relative_norm: gradient norms at or below ``min_relative_norm``
      times the largest count as zero (``l2``, ``loss+``).
    max_iters: the most Frank-Wolfe iterations per step
      (:func:`optax_mtl.solve_min_norm`'s default).
    tol: the relative duality gap at which the min-norm solve stops; None:
      the solver's default for the Gramian's dtype.

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
    `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  max_iters, tol = base.check_solver_options(max_iters, tol)
  if normalization not in NORMALIZATIONS:
    raise ValueError(
        f"normalization must be one of {NORMALIZATIONS}, got "
        f"{normalization!r}.")
  min_relative_norm = base.check_in_range(
      "min_relative_norm", min_relative_norm, 0.0, 1.0, high_inclusive=False)

  def init():
    return MgdaState(
        **base.common_state_fields(num_tasks, 1.0 / num_tasks, gramian=True,
                                   solver=True, gradients=True),
        solution=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))

  def rule(task_losses, state, gramian):
    scales = task_scales(normalization, task_losses, gramian,
                         min_relative_norm)
    scaled = scales[:, None] * gramian * scales[None, :]
    result = solvers.solve_min_norm(scaled, max_iters=max_iters, tol=tol,
                                    warm_start=state.solution)
    return result.weights * scales, state._replace(
        solution=result.weights.astype(jnp.float32),
        **solvers.state_fields(result))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=normalization in ("loss", "loss+"),
      # The min-norm point is scale-free; 1/‖g_k‖ scales as c^{-1/2}.
      gramian_degree=-0.5 if normalization in ("l2", "loss+") else 0))


def task_scales(normalization: str, task_losses: chex.Array,
                gramian: chex.Array, min_relative_norm: float) -> chex.Array:
  """The diagonal ``s`` of the normalisation ``D = diag(s)`` of :func:`mgda`."""
  inverse_norms = solvers.inverse_gradient_norms(gramian, min_relative_norm)
  losses = task_losses.astype(gramian.dtype)
  if normalization == "l2":
    return inverse_norms
  if normalization == "loss":
    return 1 / losses
  if normalization == "loss+":
    return inverse_norms / losses
  return jnp.ones_like(inverse_norms)

