"""Aligned-MTL: align the principal components of the task gradients."""

from typing import NamedTuple, Optional, Sequence

import chex
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step

SCALE_MODES = ("min", "median", "rmse")


class AlignedMtlState(NamedTuple):
  """State of :func:`aligned_mtl`."""

  weights: chex.Array  # f32[T], the weights applied last (B ω).
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  rank: chex.Array  # i32[], eigenvalues of G kept (the rank R).
  condition_number: chex.Array  # f32[], λ_max / λ_R over the kept ones.


def _aligned_mtl_weights(gramian: chex.Array, preference: chex.Array,
                         eigenvalue_rtol: Optional[float],
                         scale_mode: str = "min"):
  """``(B ω, rank, λ_max / λ_R)`` from the Gramian, in its dtype."""
  num_tasks = gramian.shape[0]
  dtype = gramian.dtype
  if eigenvalue_rtol is None:
    eigenvalue_rtol = num_tasks * float(jnp.finfo(dtype).eps)
  symmetric, _ = solvers.scale_by_power_of_two(0.5 * (gramian + gramian.T))
  eigenvalues, eigenvectors = jnp.linalg.eigh(symmetric)
  largest = jnp.max(eigenvalues)
  kept = (eigenvalues > eigenvalue_rtol * largest) & (largest > 0)
  any_kept = jnp.any(kept)
  rank = jnp.sum(kept).astype(jnp.int32)
  ascending = jnp.sort(jnp.where(kept, eigenvalues, jnp.inf))
  smallest_kept = jnp.where(any_kept, ascending[0], 1)
  if scale_mode == "min":
    scale = smallest_kept
  elif scale_mode == "median":
    # The lower median, as torch.median in the authors' code.
    scale = ascending[jnp.maximum(rank - 1, 0) // 2]
  else:  # "rmse"
    scale = jnp.sum(jnp.where(kept, eigenvalues, 0)) / jnp.maximum(rank, 1)
  inv_sqrt = solvers.safe_divide(1.0, jnp.sqrt(jnp.where(kept, eigenvalues,
                                                         0)))
  sigma = jnp.where(any_kept, jnp.sqrt(jnp.where(any_kept, scale, 1)), 0)
  # B = σ V Λ^{-1/2} Vᵀ over the kept eigenpairs.
  b_matrix = sigma * (eigenvectors * inv_sqrt[None, :]) @ eigenvectors.T
  weights = b_matrix @ preference.astype(dtype)
  condition = jnp.where(any_kept, largest / smallest_kept, 1)
  return weights, rank, condition


@deprecation.renamed_arguments({"preferences": "preference"})
def aligned_mtl(
    num_tasks: int,
    preference: Optional[Sequence[float]] = None,
    *,
    scale_mode: str = "min",
    eigenvalue_rtol: Optional[float] = None,
) -> base.MultiTaskStrategy:
  r"""Aligned-MTL: a well-conditioned update from the aligned gradients.

  With the Gramian :math:`G = J J^\top = V \Lambda V^\top` (eigenvalues
  :math:`\lambda_1 \ge \dots \ge \lambda_R > 0` kept, :math:`R` the rank)
  and the preference vector :math:`\omega` (default all ones), Algorithm 1 of the
  paper is

  .. math::
    \sigma = \sqrt{\lambda_R}, \qquad
    B = \sigma\, V \Lambda^{-1/2} V^\top
      = \sigma\, V \operatorname{diag}\bigl(\lambda_1^{-1/2}, \dots,
        \lambda_R^{-1/2}\bigr) V^\top, \qquad
    \alpha = B \omega, \qquad d = J^\top \alpha.

  The aligned gradients :math:`\hat J = B J` are orthogonal with equal
  norms :math:`\sigma` (:math:`\hat J \hat J^\top = \sigma^2 V_R V_R^\top`),
  so the update :math:`d = \hat J^\top \omega` has condition number one
  along the span of the gradients. The weights do not change when all
  gradients are scaled by the same factor (G is first divided by a power
  of two, exactly), so the update scales with the gradients.

  Zero eigenvalues: an eigenvalue at or below ``eigenvalue_rtol`` times the
  largest is dropped, i.e. :math:`\Lambda^{-1/2}` is the pseudo-inverse
  square root and :math:`\lambda_R` the smallest kept one. The default
  :math:`T \varepsilon` (:math:`\varepsilon` of G's dtype) is the
  round-off of G itself, as computed from the gradients: a smaller
  eigenvalue carries no information, a larger one is a real direction
  (e.g. nearly parallel gradients) and is kept. ``state.rank`` and
  ``state.condition_number`` (:math:`\lambda_1 / \lambda_R`) report what
  was kept. All-zero gradients give :math:`\alpha = 0`.

  Options that reproduce the peers:

  * ``preference=[1/T] * T``: torchjd's ``AlignedMTL`` (its default
    preference vector is the mean, so its update is this one divided by
    T); the default all-ones is the paper's and LibMTL's
    (``alpha = B.sum(0)``).
  * ``scale_mode``: the authors' code (SamsungLabs/MTL, ``scale_mode``)
    chooses :math:`\sigma^2` as the smallest kept eigenvalue (``"min"``,
    the paper, LibMTL and torchjd), their lower median (``"median"``, as
    ``torch.median``) or their mean (``"rmse"``).

  Both peers keep the eigenvalues above :math:`T \varepsilon
  \lambda_{\max}` with float32's :math:`\varepsilon`, as here in float32.

  A step with a non-finite loss or Gramian is counted in ``num_skipped``;
  the previous weights are applied.

  Args:
    num_tasks: the number of tasks T.
    preference: the preference vector :math:`\omega` (T positive numbers),
      default all ones.
    scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``: which
      :math:`\sigma^2` the aligned gradients get (see above).
    eigenvalue_rtol: relative threshold at or below which an eigenvalue of
      G is treated as zero; None for :math:`T \varepsilon`.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.aligned_mtl(num_tasks=2)
    >>> task_grads = jnp.array([[4.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(w, 4) for w in state.weights.tolist()]
    [0.25, 1.0]
    >>> [round(u, 4) for u in update.tolist()]
    [1.0, 1.0]

  References:
    Senushkin et al., `Independent Component Alignment for Multi-Task
    Learning <https://arxiv.org/abs/2305.19000>`_, CVPR 2023.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  if preference is None:
    preference_values = np.ones((num_tasks,), np.float32)
  else:
    base.check_task_vector("preference", preference, num_tasks, 0.0,
                           low_inclusive=False, allow_scalar=False)
    preference_values = np.asarray(preference, np.float64)
  if eigenvalue_rtol is not None:
    eigenvalue_rtol = base.check_in_range(
        "eigenvalue_rtol", eigenvalue_rtol, 0.0, 1.0, high_inclusive=False)
  if scale_mode not in SCALE_MODES:
    raise ValueError(
        f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}.")

  def init():
    return AlignedMtlState(
        **base.common_state_fields(num_tasks, preference_values.astype(
            np.float32), gramian=True, gradients=True),
        rank=jnp.zeros([], jnp.int32),
        condition_number=jnp.ones([], jnp.float32))

  def rule(task_losses, state, gramian):
    del task_losses
    weights, rank, condition = _aligned_mtl_weights(
        gramian, jnp.asarray(preference_values, gramian.dtype),
        eigenvalue_rtol, scale_mode)
    return weights, state._replace(
        rank=rank, condition_number=condition.astype(jnp.float32))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False, gramian_degree=0))
