"""Dynamic Weight Average (DWA): favour the tasks whose loss falls slowest."""

from typing import NamedTuple, Optional

import chex

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import loss_history


class DwaState(NamedTuple):
  """State of :func:`dwa`."""

  weights: chex.Array  # f32[T], the weights applied last (ones at init).
  num_skipped: chex.Array  # i32[], steps rejected as a whole.
  num_rejected_losses: chex.Array  # i32[T], each task's rejected losses.
  loss_ratios: loss_history.LossRatioState  # L(t−1), L(t−2) (f32[T] each).


@deprecation.renamed_arguments(
    old_positional=("num_tasks", "temperature", "steps_per_epoch"))
def dwa(
    num_tasks: int,
    temperature: float = 2.0,
    *,
    steps_per_epoch: Optional[int] = None,
) -> base.MultiTaskStrategy:
  r"""Dynamic Weight Average: weights from the rate at which each loss falls.

  .. math::
    w_k(t) = \frac{T \exp(r_k(t-1) / \tau)}
                  {\sum_{i=1}^{T} \exp(r_i(t-1) / \tau)},
    \qquad r_k(t-1) = \frac{L_k(t-1)}{L_k(t-2)},

  and :math:`w_k = 1` until the rates exist. With ``steps_per_epoch=None``
  (default) ``t`` counts steps and :math:`L_k(t-1), L_k(t-2)` are the losses
  of the two previous steps (weights 1 on the first two steps). With
  ``steps_per_epoch=n``, as in the paper, ``t`` counts epochs of ``n`` steps
  and :math:`L_k` is the mean loss over an epoch: every step of epoch ``e``
  uses the means of epochs ``e−1`` and ``e−2`` (weights 1 during the first
  two epochs). The weights sum to ``T``, so they stay bounded however small
  the losses get (any optimizer, plain SGD included). A ratio above 1e30
  (a loss that jumps from 1e-30 to 1e9) and ``r/τ`` are clipped at 1e30, so
  the weights are finite whatever the losses.

  A bad loss of one task (non-finite, zero or negative: the ratio divides
  by it) excludes that task only: it never enters the task's loss history,
  the task keeps its previous weight, ``num_rejected_losses[k]`` counts it,
  and the other tasks share the rest of ``T`` (the weights still sum to
  ``T``) in the proportions of the softmax. Steps and epochs are counted per
  task in accepted losses, so a task's epoch is ``n`` of its accepted losses
  (with rejected losses its epochs end later than the data loader's); a task
  whose ratio does not exist yet enters the softmax with ``r = 1``. Only a
  step with no valid loss is rejected as a whole (``num_skipped``; the
  previous weights).

  Args:
    num_tasks: the number of tasks T.
    temperature: the softmax temperature τ > 0 (larger is closer to equal
      weights; the paper uses 2).
    steps_per_epoch: None for per-step rates, or the number of steps per
      epoch (an integer >= 1) for the paper's per-epoch rates.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.dwa(num_tasks=2, temperature=1.0)
    >>> task_grads = jnp.eye(2)
    >>> state = strategy.init(None)
    >>> for losses in ([1.0, 1.0], [1.0, 2.0], [5.0, 5.0]):
    ...   update, state = strategy.update(
    ...       task_grads, state, task_losses=jnp.array(losses))
    >>> [round(w, 4) for w in state.weights.tolist()]  # 2·softmax([1, 2])
    [0.5379, 1.4621]

  References:
    Liu, Johns & Davison, `End-to-End Multi-Task Learning with Attention
    <https://arxiv.org/abs/1803.10704>`_, CVPR 2019 (Eq. 7).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  temperature = base.check_in_range("temperature", temperature, 0.0,
                                    low_inclusive=False)
  steps_per_epoch = base.check_positive_int("steps_per_epoch", steps_per_epoch,
                                            allow_none=True)
  steps_per_period = 1 if steps_per_epoch is None else steps_per_epoch

  def init():
    return DwaState(
        **base.common_state_fields(num_tasks, per_task=True),
        loss_ratios=loss_history.init_loss_ratios(num_tasks))

  def rule(task_losses, state, gramian, valid=None):
    del gramian
    weights = loss_history.dwa_coefficients(
        state.loss_ratios, temperature, valid,
        None if valid is None else state.weights)
    return weights, state._replace(
        loss_ratios=loss_history.record_losses(
            state.loss_ratios, task_losses, steps_per_period, valid))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=True, per_task=True))
