"""REMA loss weighting: EMA weighting scaled by the recent loss ratio."""

from typing import NamedTuple, Optional

import chex

from optax_mtl._src import base
from optax_mtl._src.weighting._helpers import loss_history


class RemaState(NamedTuple):
  """State of :func:`rema`."""

  weights: chex.Array  # f32[T], the weights applied last (ones at init).
  num_skipped: chex.Array  # i32[], steps rejected as a whole.
  num_rejected_losses: chex.Array  # i32[T], each task's rejected losses.
  loss_average: loss_history.LossAverageState  # L̃ (f32[T]), steps (i32[T]).
  loss_ratios: loss_history.LossRatioState  # L(t−1), L(t−2) (f32[T] each).


def rema(
    num_tasks: int,
    beta: float = 0.1,
    *,
    normalize: bool = False,
    max_weight: Optional[float] = None,
) -> base.MultiTaskStrategy:
  r"""REMA loss weighting: the EMA weights times the last loss ratio.

  .. math::
    \tilde L_k(t) = \beta\, L_k(t) + (1 - \beta)\, \tilde L_k(t-1),
    \qquad r_k(t) = \frac{L_k(t-1)}{L_k(t-2)},
    \qquad w_k(t) = \frac{r_k(t)}{\tilde L_k(t)},

  with :math:`\tilde L_k(1) = L_k(1)` and :math:`r_k = 1` until two earlier
  steps exist (the first two accepted steps are weighted as by
  :func:`optax_mtl.loss_ema`). A task whose loss has recently stopped
  falling (``r`` near or above 1) keeps a larger weight than one still
  improving fast. Like EMA, the combined update does not change when one
  task's loss (and gradient) is multiplied by a constant.

  As with :func:`optax_mtl.loss_ema`, the weights grow as the losses fall:
  Adam and other scale-invariant optimizers need nothing more, while plain
  SGD (or momentum) needs ``normalize=True`` (weights that sum to ``T``) or
  ``max_weight``. The ratio ``r`` and every weight are at most 1e30 (a loss
  that jumps from 1e-30 to 1e9 gives ``r = 1e30``, not inf), so the weights
  are always finite.

  A bad loss of one task (non-finite, zero or negative) excludes that task
  only: it enters neither its average nor its loss history, the task keeps
  its previous weight and ``num_rejected_losses[k]`` counts it; the other
  tasks update as usual. ``t`` counts each task's accepted losses, so
  ``L_k(t−1)`` and ``L_k(t−2)`` are task k's last two accepted losses. With
  ``normalize=True`` an excluded task keeps its previous weight and the
  others share the rest of ``T``. Only a step with no valid loss is
  rejected as a whole (``num_skipped``; the previous weights).

  Args:
    num_tasks: the number of tasks T.
    beta: the weight of the newest loss in the average, in (0, 1].
    normalize: rescale the weights to sum to ``T`` (computed in log space).
    max_weight: None, or a bound > 0 on each weight :math:`r_k/\tilde L_k`
      (applied after ``normalize``).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.rema(num_tasks=2, beta=1.0)
    >>> task_grads = jnp.eye(2)
    >>> state = strategy.init(None)
    >>> for losses in ([4.0, 1.0], [2.0, 1.0], [1.0, 1.0]):
    ...   update, state = strategy.update(
    ...       task_grads, state, task_losses=jnp.array(losses))
    >>> state.weights.tolist()  # (2/4) / 1, (1/1) / 1
    [0.5, 1.0]

  References:
    Lakkapragada, Sleiman, Surabhi & Wall, `Mitigating Negative Transfer in
    Multi-Task Learning with Exponential Moving Average Loss Weighting
    Strategies <https://arxiv.org/abs/2211.12999>`_, AAAI 2023 student
    abstract (Eq. 2).
  """
  return loss_history.average_weighting(
      num_tasks, beta, normalize, max_weight, RemaState,
      lambda ratios: loss_history.loss_ratios(ratios)[0],
      loss_history.log_loss_ratios)
