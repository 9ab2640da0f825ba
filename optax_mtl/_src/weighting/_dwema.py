"""DWEMA loss weighting: the DWA coefficients divided by the loss EMA."""

import functools
from typing import Optional

from optax_mtl._src import base
from optax_mtl._src.weighting._helpers import loss_history
from optax_mtl._src.weighting import _rema


class DwemaState(_rema.RemaState):
  """State of :func:`dwema`: the fields of :class:`optax_mtl.RemaState`."""

  __slots__ = ()


def dwema(
    num_tasks: int,
    beta: float = 0.1,
    temperature: float = 2.0,
    *,
    normalize: bool = False,
    max_weight: Optional[float] = None,
) -> base.MultiTaskStrategy:
  r"""DWEMA loss weighting: Dynamic Weight Average divided by the loss EMA.

  .. math::
    \tilde L_k(t) = \beta\, L_k(t) + (1 - \beta)\, \tilde L_k(t-1),
    \qquad r_k(t) = \frac{L_k(t-1)}{L_k(t-2)},

    w_k(t) = \frac{1}{\tilde L_k(t)} \cdot
      \frac{T \exp(r_k(t) / \tau)}{\sum_{i=1}^{T} \exp(r_i(t) / \tau)},

  with :math:`\tilde L_k(1) = L_k(1)` and the DWA factor 1 until two earlier
  steps exist (the first two accepted steps are weighted as by
  :func:`optax_mtl.loss_ema`). The DWA factor (:func:`optax_mtl.dwa`, per
  step) favours the tasks whose loss falls slowest; dividing by the average
  puts every loss on the same scale, so the combined update does not change
  when one task's loss (and gradient) is multiplied by a constant.

  As with :func:`optax_mtl.loss_ema`, the weights grow as the losses fall:
  Adam and other scale-invariant optimizers need nothing more, while plain
  SGD (or momentum) needs ``normalize=True`` (weights that sum to ``T``) or
  ``max_weight``. Every weight is at most 1e30 (and the DWA factor at most
  ``T``, the ratios being clipped at 1e30), so the weights are always
  finite.

  A bad loss of one task (non-finite, zero or negative) excludes that task
  only: it enters neither its average nor its loss history, the task keeps
  its previous weight and ``num_rejected_losses[k]`` counts it; the other
  tasks update as usual. ``t`` counts each task's accepted losses; a task
  whose ratio does not exist yet enters the DWA softmax with ``r = 1``.
  With ``normalize=True`` an excluded task keeps its previous weight and
  the others share the rest of ``T``. Only a step with no valid loss is
  rejected as a whole (``num_skipped``; the previous weights).

  Args:
    num_tasks: the number of tasks T.
    beta: the weight of the newest loss in the average, in (0, 1].
    temperature: the softmax temperature τ > 0 of the DWA factor (larger is
      closer to equal factors).
    normalize: rescale the weights to sum to ``T`` (computed in log space).
    max_weight: None, or a bound > 0 on each weight (the DWA factor over
      :math:`\tilde L_k`, applied after ``normalize``).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.dwema(num_tasks=2, beta=1.0, temperature=1.0)
    >>> task_grads = jnp.eye(2)
    >>> state = strategy.init(None)
    >>> for losses in ([1.0, 1.0], [1.0, 1.0], [2.0, 4.0]):
    ...   update, state = strategy.update(
    ...       task_grads, state, task_losses=jnp.array(losses))
    >>> state.weights.tolist()  # equal ratios: DWA factors 1; then 1/L
    [0.5, 0.25]

  References:
    Lakkapragada, Sleiman, Surabhi & Wall, `Mitigating Negative Transfer in
    Multi-Task Learning with Exponential Moving Average Loss Weighting
    Strategies <https://arxiv.org/abs/2211.12999>`_, AAAI 2023 student
    abstract;
    Liu, Johns & Davison, `End-to-End Multi-Task Learning with Attention
    <https://arxiv.org/abs/1803.10704>`_, CVPR 2019 (DWA).
  """
  temperature = base.check_in_range("temperature", temperature, 0.0,
                                    low_inclusive=False)
  return loss_history.average_weighting(
      num_tasks, beta, normalize, max_weight, DwemaState,
      functools.partial(loss_history.dwa_coefficients,
                        temperature=temperature),
      functools.partial(loss_history.log_dwa_coefficients,
                        temperature=temperature))
