"""Gradient normalisation: the sum of the unit-norm task gradients."""

from typing import NamedTuple

import chex

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step


class NormalizedGradientsState(NamedTuple):
  """State of :func:`normalized_gradients`."""

  weights: chex.Array  # f32[T], the weights applied last: 1/‖g_k‖.
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.


@deprecation.renamed_arguments({"eps": "min_relative_norm"})
def normalized_gradients(
    num_tasks: int,
    *,
    min_relative_norm: float = 1e-12,
) -> base.MultiTaskStrategy:
  r"""Gradient normalisation: every task gradient scaled to unit norm.

  .. math::
    d = \sum_{k=1}^{T} \frac{g_k}{\lVert g_k \rVert},
    \qquad w_k = \frac{1}{\sqrt{G_{kk}}}, \quad G = J J^\top.

  A task whose gradient norm is at most ``min_relative_norm`` times the
  largest gets
  weight 0 (its gradient is zero, or negligible, so nothing is lost). The
  threshold is relative so that the update does not depend on the scale
  of the gradients: scaling them all by any ``c > 0`` leaves ``d``
  unchanged (the weights scale as ``1/c``). A step with a non-finite loss
  or Gramian is counted in ``num_skipped`` and the previous weights are
  applied.

  Args:
    num_tasks: the number of tasks T.
    min_relative_norm: norms at or below ``min_relative_norm`` times the
      largest are treated as zero.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.normalized_gradients(num_tasks=2)
    >>> task_grads = jnp.array([[3.0, 4.0], [0.0, 2.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(u, 4) for u in update.tolist()]
    [0.6, 1.8]

  References:
    Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks <https://arxiv.org/abs/1711.02257>`_,
    ICML 2018 (the "gradient normalisation" baseline); Sener & Koltun,
    `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018 (the ``l2``
    normalisation).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  min_relative_norm = base.check_in_range(
      "min_relative_norm", min_relative_norm, 0.0, 1.0, high_inclusive=False)

  def init():
    return NormalizedGradientsState(
        **base.common_state_fields(num_tasks, gramian=True,
                                   gradients=True))

  def rule(task_losses, state, gramian):
    del task_losses
    return solvers.inverse_gradient_norms(gramian, min_relative_norm), state

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False, gramian_degree=-0.5))
