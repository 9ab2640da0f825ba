"""EMA loss weighting: each loss divided by its exponential moving average."""

from typing import NamedTuple, Optional

import chex

from optax_mtl._src import base
from optax_mtl._src.weighting._helpers import loss_history


class LossEmaState(NamedTuple):
  """State of :func:`loss_ema` (named ``EmaState`` before optax_mtl 0.2)."""

  weights: chex.Array  # f32[T], the weights applied last (ones at init).
  num_skipped: chex.Array  # i32[], steps rejected as a whole.
  num_rejected_losses: chex.Array  # i32[T], each task's rejected losses.
  loss_average: loss_history.LossAverageState  # L̃ (f32[T]), steps (i32[T]).


def loss_ema(
    num_tasks: int,
    beta: float = 0.1,
    *,
    normalize: bool = False,
    max_weight: Optional[float] = None,
) -> base.MultiTaskStrategy:
  r"""EMA loss weighting: every loss scaled by its exponential moving average.

  Named ``ema`` before optax_mtl 0.2 (``optax.ema`` is a different thing: an
  average of the parameters' updates); the old name still works, with a
  ``DeprecationWarning``.

  .. math::
    \tilde L_k(t) = \beta\, L_k(t) + (1 - \beta)\, \tilde L_k(t-1),
    \qquad w_k(t) = \frac{1}{\tilde L_k(t)},

  with :math:`\tilde L_k(1) = L_k(1)`, so the first weights are
  :math:`1 / L_k(1)`. Every task then contributes a loss of order one, and
  the combined update does not change when one task's loss (and gradient)
  is multiplied by a constant.

  The weights grow as the losses fall (``1/L̃``): their overall scale is a
  learning-rate multiplier. Scale-invariant optimizers (Adam, RMSProp,
  Adafactor...) cancel it and need nothing more; with plain SGD (or
  momentum) the step grows as the losses fall, so bound the weights with
  ``normalize=True`` (only the relative weights change; they sum to ``T``)
  or ``max_weight``. Every weight is at most 1e30 in any case (reached only
  when ``L̃`` falls below 1e-30), so it is never infinite.

  A bad loss of one task (non-finite, zero or negative: ``1/L̃`` needs a
  positive average) excludes that task only: its average is kept, it keeps
  its previous weight, ``num_rejected_losses[k]`` counts it, and the other
  tasks' averages update as usual. Each task's average starts at its own
  first accepted loss (a task first seen at step 5 starts at step 5). With
  ``normalize=True`` the weights still sum to ``T``: an excluded task keeps
  its previous weight and the others share the rest. Only a step with no
  valid loss is rejected as a whole (``num_skipped``; previous weights,
  ones if none was accepted yet).

  Args:
    num_tasks: the number of tasks T.
    beta: the weight of the newest loss in the average, in (0, 1]
      (``beta=1`` gives :math:`w_k = 1/L_k(t)`).
    normalize: rescale the weights to sum to ``T``,
      :math:`w_k = T \tilde L_k^{-1} / \sum_i \tilde L_i^{-1}`.
    max_weight: None, or a bound > 0 on each weight :math:`1/\tilde L_k`
      (applied after ``normalize``).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.loss_ema(num_tasks=2, beta=0.5)
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

    For plain SGD, weights that sum to T:

    >>> strategy = optax_mtl.loss_ema(num_tasks=2, beta=0.5, normalize=True)
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.array([1.0, 3.0]))
    >>> [round(w, 4) for w in state.weights.tolist()]  # 2·(1, 1/3) / (4/3)
    [1.5, 0.5]

  References:
    Lakkapragada, Sleiman, Surabhi & Wall, `Mitigating Negative Transfer in
    Multi-Task Learning with Exponential Moving Average Loss Weighting
    Strategies <https://arxiv.org/abs/2211.12999>`_, AAAI 2023 student
    abstract (Eq. 1).
  """
  return loss_history.average_weighting(num_tasks, beta, normalize,
                                         max_weight, LossEmaState)
