"""IMTL-G: the update with equal projections on every unit task gradient."""

from typing import NamedTuple

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step


class ImtlGState(NamedTuple):
  """State of :func:`imtl_g`."""

  weights: chex.Array  # f32[T], the weights applied last (α, Σ α = 1).
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.


def _imtl_g_weights(gramian: chex.Array,
                    min_relative_norm: float) -> chex.Array:
  """The IMTL-G weights ``α = G⁺n / 1ᵀG⁺n`` from the Gramian (its dtype).

  ``n_k = ‖g_k‖``. A task with ``‖g_k‖ ≤ min_relative_norm · max_j ‖g_j‖``
  is left out
  (α_k = 0). The pseudo-inverse drops the eigenvalues of G at or below
  ``T ε λ_max``, the round-off of G itself.
  """
  num_tasks = gramian.shape[0]
  dtype = gramian.dtype
  gramian, _ = solvers.scale_by_power_of_two(0.5 * (gramian + gramian.T))
  norms = solvers.gradient_norms(gramian)
  active = (norms > min_relative_norm * jnp.max(norms)) & (norms > 0)
  both = active[:, None] & active[None, :]
  gramian = jnp.where(both, gramian, jnp.zeros((), dtype))
  eigenvalues, eigenvectors = jnp.linalg.eigh(gramian)
  cutoff = solvers.resolve_cutoff(dtype, num_tasks, jnp.max(eigenvalues))
  kept = eigenvalues > cutoff
  inverse = solvers.safe_divide(1.0, jnp.where(kept, eigenvalues, 0))
  norms = jnp.where(active, norms, 0)
  # v = G⁺ n over the kept eigenpairs.
  solution = eigenvectors @ (inverse * (eigenvectors.T @ norms))
  solution = jnp.where(active, solution, 0)
  total = jnp.sum(solution)
  # Σ v cancels to round-off: no direction with equal positive projections
  # (e.g. unit gradients summing to zero); α = 0.
  cancels = jnp.abs(total) <= solvers.resolve_cutoff(
      dtype, num_tasks, jnp.sum(jnp.abs(solution)))
  return solvers.safe_divide(solution, jnp.where(cancels, 0, total))


@deprecation.renamed_arguments({"eps": "min_relative_norm"})
def imtl_g(
    num_tasks: int,
    *,
    min_relative_norm: float = 1e-8,
) -> base.MultiTaskStrategy:
  r"""IMTL-G: the update whose projections on all unit gradients are equal.

  With :math:`G = J J^\top` and :math:`n = (\lVert g_1 \rVert, \dots,
  \lVert g_T \rVert)`,

  .. math::
    \alpha = \frac{G^{+} n}{\mathbf 1^\top G^{+} n}, \qquad
    d = \sum_{i=1}^{T} \alpha_i g_i = J^\top \alpha,

  the definition of torchjd's ``IMTLG`` (Quinton & Rey 2024). When the
  gradients are linearly independent, :math:`G \alpha \propto n` says that
  :math:`d \cdot u_i` (:math:`u_i = g_i / \lVert g_i \rVert`) is the same
  for every task, and :math:`\alpha` is the paper's
  :math:`\alpha_{2:T} = g_1 U^\top (D U^\top)^{-1}`,
  :math:`\alpha_1 = 1 - \sum_{i \ge 2} \alpha_i` (Liu et al. 2021). When
  they are not (duplicated tasks, more tasks than dimensions), equal
  projections may not exist and the paper's system is singular; with the
  pseudo-inverse, :math:`d \propto J^{+} n` is the least-norm
  least-squares solution of :math:`g_i \cdot d = \lVert g_i \rVert`, i.e.
  of :math:`u_i \cdot d = 1`, with rows weighted by the gradient norms.
  Duplicated tasks share their weight.

  Numerics. The pseudo-inverse keeps the eigenvalues of G above
  :math:`T \varepsilon \lambda_{\max}` (:math:`\varepsilon` of G's dtype):
  below that an eigenvalue is the round-off of computing G, so a
  direction is kept only where G resolves it. G is first divided by a
  power of two, so the weights do not depend on the common scale of the
  gradients: the update scales with them. A task whose gradient norm is at
  most ``min_relative_norm`` times the largest is left out
  (:math:`\alpha_i = 0`). When
  :math:`\mathbf 1^\top G^{+} n` cancels to round-off (no direction has
  equal positive projections, e.g. unit gradients that sum to zero), and
  for all-zero gradients, :math:`\alpha = 0`.

  A step with a non-finite loss or Gramian is counted in ``num_skipped``;
  the previous weights are applied.

  Args:
    num_tasks: the number of tasks T.
    min_relative_norm: gradient norms at or below ``min_relative_norm``
      times the largest count as zero.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.imtl_g(num_tasks=2)
    >>> task_grads = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(w, 4) for w in state.weights.tolist()]
    [0.3333, 0.6667]
    >>> [round(u, 4) for u in update.tolist()]
    [0.6667, 0.6667]

  References:
    Liu et al., `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021; Quinton &
    Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024 (the pseudo-inverse form,
    torchjd's ``IMTLG``).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  min_relative_norm = base.check_in_range(
      "min_relative_norm", min_relative_norm, 0.0, 1.0, high_inclusive=False)

  def init():
    return ImtlGState(**base.common_state_fields(
        num_tasks, 1.0 / num_tasks, gramian=True, gradients=True))

  def rule(task_losses, state, gramian):
    del task_losses
    return _imtl_g_weights(gramian, min_relative_norm), state

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False, gramian_degree=0))
