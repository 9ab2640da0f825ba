"""EMA loss weighting: each loss divided by its exponential moving average."""

from typing import NamedTuple

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import step
from optax_mtl._src.weighting import _loss_history


class EmaState(NamedTuple):
  """State of :func:`ema`."""

  weights: chex.Array  # f32[T], the weights applied last (ones at init).
  num_skipped: chex.Array  # i32[], rejected steps.
  loss_average: _loss_history.LossAverageState  # L̃ (f32[T]), steps (i32[]).


def ema(num_tasks: int, beta: float = 0.1) -> base.MultiTaskStrategy:
  r"""EMA loss weighting: every loss scaled by its exponential moving average.

  .. math::
    \tilde L_k(t) = \beta\, L_k(t) + (1 - \beta)\, \tilde L_k(t-1),
    \qquad w_k(t) = \frac{1}{\tilde L_k(t)},

  with :math:`\tilde L_k(1) = L_k(1)`, so the first weights are
  :math:`1 / L_k(1)`. Every task then contributes a loss of order one, and
  the combined update does not change when one task's loss (and gradient)
  is multiplied by a constant.

  A rejected step (a non-finite, zero or negative loss) never enters the
  average: the previous state is kept, ``num_skipped`` is incremented and the
  previous weights are applied again (ones if no step was accepted yet).
  "The first step" is the first *accepted* step.

  Args:
    num_tasks: the number of tasks T.
    beta: the weight of the newest loss in the average, in (0, 1]
      (``beta=1`` gives :math:`w_k = 1/L_k(t)`).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.ema(num_tasks=2, beta=0.5)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> state = strategy.init(None)
    >>> update, state = strategy.update(
    ...     task_grads, state, task_losses=jnp.array([2.0, 4.0]))
    >>> state.weights.tolist()
    [0.5, 0.25]
    >>> update, state = strategy.update(
    ...     task_grads, state, task_losses=jnp.array([4.0, 4.0]))
    >>> state.weights.tolist()  # 1 / (0.5·4 + 0.5·2), 1 / 4
    [0.3333333432674408, 0.25]

  References:
    Lakkapragada, Sleiman, Surabhi & Wall, "Mitigating Negative Transfer in
    Multi-Task Learning with Exponential Moving Average Loss Weighting
    Strategies", AAAI 2023 student abstract, arXiv:2211.12999 (Eq. 1).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  beta = base.check_in_range("beta", beta, 0.0, 1.0, low_inclusive=False)

  def init():
    return EmaState(
        **base.common_state_fields(num_tasks),
        loss_average=_loss_history.init_loss_average(num_tasks))

  def rule(task_losses, state, gramian):
    del gramian
    loss_average = _loss_history.update_loss_average(
        state.loss_average, task_losses, beta)
    weights = 1.0 / loss_average.average
    return weights, state._replace(loss_average=loss_average)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=True))
