"""Dynamic (log) loss normalisation: the gradient of the sum of log-losses."""

from typing import NamedTuple, Optional

import chex

from optax_mtl._src import base
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import loss_history


class LogLossState(NamedTuple):
  """State of :func:`log_loss`."""

  weights: chex.Array  # f32[T], the weights applied last: 1 / L_k.
  num_skipped: chex.Array  # i32[], steps rejected as a whole.
  num_rejected_losses: chex.Array  # i32[T], each task's rejected losses.


def log_loss(
    num_tasks: int,
    *,
    normalize: bool = False,
    max_weight: Optional[float] = None,
) -> base.MultiTaskStrategy:
  r"""Dynamic loss normalisation: the gradient of the sum of the log-losses.

  .. math::
    L = \sum_{k=1}^{T} \frac{L_k}{\operatorname{sg}(L_k)}, \qquad
    \nabla L = \nabla \sum_{k=1}^{T} \log L_k, \qquad w_k = \frac{1}{L_k},

  where ``sg`` is the stop-gradient. Every task contributes its *relative*
  change, so the update does not change when a task's loss is measured in
  other units (multiplied by a constant ``c > 0``).

  The weights grow as the losses fall: their overall scale is a
  learning-rate multiplier. Scale-invariant optimizers (Adam, RMSProp,
  Adafactor...) cancel it and need nothing more; with plain SGD (or
  momentum) the step grows without bound as the losses approach 0, so bound
  the weights with ``normalize=True`` (they sum to ``T``) or
  ``max_weight``. Every weight is at most 1e30 in any case (reached only for
  a loss below 1e-30), so it is never infinite.

  A non-finite or non-positive loss of one task (the logarithm needs
  ``L_k > 0``) excludes that task only: it keeps its previous weight (one
  before its first accepted loss), ``num_rejected_losses[k]`` counts it,
  and the other tasks get ``1/L_k`` as usual (with ``normalize=True`` they
  share the rest of ``T``: the weights still sum to ``T``). Only a step with
  no valid loss is rejected as a whole (``num_skipped``).

  Args:
    num_tasks: the number of tasks T.
    normalize: rescale the weights to sum to ``T``,
      :math:`w_k = T L_k^{-1} / \sum_i L_i^{-1}`.
    max_weight: None, or a bound > 0 each weight is clipped at (after
      ``normalize``).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.log_loss(num_tasks=2)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.array([0.5, 4.0]))
    >>> update.tolist()
    [2.0, 0.25]

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game
    <https://arxiv.org/abs/2202.01017>`_, ICML 2022 (the scale-invariant
    baseline ``Σ log L_k``); Lin et al., `Dual-Balancing for Multi-Task
    Learning <https://arxiv.org/abs/2308.12029>`_, 2023 (the log
    transformation of the losses).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  normalize, max_weight = loss_history.check_weight_options(normalize,
                                                             max_weight)

  def init():
    return LogLossState(**base.common_state_fields(num_tasks, per_task=True))

  def rule(task_losses, state, gramian, valid=None):
    del gramian
    weights = loss_history.finish_weights(
        loss_history.bounded_ratio(1.0, task_losses),
        -loss_history.log_positive(task_losses), normalize, max_weight,
        valid, state.weights)
    return weights, state

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=True, per_task=True))
