"""Geometric-mean loss: the gradient of the product of the task losses."""

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import loss_history


class GeometricMeanState(NamedTuple):
  """State of :func:`geometric_mean`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], steps rejected as a whole.
  num_rejected_losses: chex.Array  # i32[T], each task's rejected losses.


def geometric_mean(
    num_tasks: int,
    gamma: Optional[float] = None,
    *,
    max_weight: Optional[float] = None,
) -> base.MultiTaskStrategy:
  r"""Geometric-mean loss: the gradient of the product of the task losses.

  .. math::
    L = \Bigl(\prod_{k=1}^{T} L_k\Bigr)^{1/\gamma}, \qquad
    w_k = \frac{\partial L}{\partial L_k}
        = \frac{\bigl(\prod_{j} L_j\bigr)^{1/\gamma}}{\gamma\, L_k}
        = \frac{1}{\gamma} \exp\Bigl(\frac{1}{\gamma}\sum_{j} \log L_j
          - \log L_k\Bigr).

  With the default ``gamma = T`` the loss is the geometric mean of the task
  losses. The weights are computed in log space (the last form above), so
  the product of many losses neither overflows nor underflows: with
  ``gamma = T``, ``w_k ≤ max L / (T · L_k)``. Since
  ``w_k L_k`` is the same for every task, every task contributes its relative
  change ``∇L_k / L_k`` with one common factor ``L / γ``.

  With ``gamma = T`` the weights do not grow when all the losses fall
  together (``w_k = 1/T`` at equal losses), but a task whose loss falls far
  below the others gets a weight up to ``max L / (T min L)``. Adam and other
  scale-invariant optimizers cancel the overall scale; with plain SGD (or
  momentum) bound the weights with ``max_weight``. Every weight is at most
  1e30 in any case (clipped in log space), so it is never infinite.

  A non-finite or non-positive loss of one task (its log is taken) excludes
  that task only: its factor is left out of the product (taken as 1, with
  ``γ`` unchanged), it keeps its previous weight (``1/γ``, the weights at
  unit losses, before its first accepted loss) and
  ``num_rejected_losses[k]`` counts it; the other tasks get the weights of
  the product of their own losses. Only a step with no valid loss is
  rejected as a whole (``num_skipped``).

  Args:
    num_tasks: the number of tasks T.
    gamma: the root taken of the product, ``> 0``; None means ``num_tasks``.
    max_weight: None, or a bound > 0 each weight is clipped at.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.geometric_mean(num_tasks=2)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.array([1.0, 4.0]))
    >>> [round(u, 4) for u in update.tolist()]  # sqrt(1 * 4) / (2 L_k)
    [1.0, 0.25]

  References:
    Chennupati et al., `MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning
    <https://arxiv.org/abs/1904.08492>`_, CVPR Workshops 2019.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  if gamma is None:
    gamma = float(num_tasks)
  gamma = base.check_in_range("gamma", gamma, 0.0, low_inclusive=False)
  _, max_weight = loss_history.check_weight_options(False, max_weight)

  def init():
    return GeometricMeanState(**base.common_state_fields(
        num_tasks, loss_history.finish_weights(
            jnp.full((num_tasks,), 1.0 / jnp.asarray(gamma, jnp.float32)),
            None, False, max_weight), per_task=True))

  def rule(task_losses, state, gramian, valid=None):
    # An excluded task's loss arrives as 1.0: its factor drops out of the
    # product (log 1 = 0), and the guard keeps its previous weight.
    del gramian, valid
    log_losses = jnp.log(task_losses)
    log_weights = (jnp.sum(log_losses) / gamma
                   - jnp.log(jnp.asarray(gamma, jnp.float32)) - log_losses)
    weights = jnp.exp(jnp.minimum(log_weights, loss_history.LOG_MAX_WEIGHT))
    return loss_history.finish_weights(weights, None, False,
                                        max_weight), state

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=True, per_task=True))
