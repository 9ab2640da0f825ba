"""Loss-Balanced Task Weighting (LBTW): weight by the loss still left."""

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp
import optax

from optax_mtl._src import base
from optax_mtl._src import step
from optax_mtl._src.weighting import _loss_history


class LbtwState(NamedTuple):
  """State of :func:`lbtw`."""

  weights: chex.Array  # f32[T], the weights applied last (ones at init).
  num_skipped: chex.Array  # i32[], rejected steps.
  reference_losses: chex.Array  # f32[T], L^ref (ones before the first step).
  # i32[], accepted steps since the reference was taken: in
  # [0, steps_per_epoch), or saturating when steps_per_epoch is None. A step
  # that finds 0 here takes its own losses as the reference.
  steps_in_epoch: chex.Array


def lbtw(
    num_tasks: int,
    alpha: float = 0.5,
    steps_per_epoch: Optional[int] = None,
    normalize: bool = True,
) -> base.MultiTaskStrategy:
  r"""Loss-Balanced Task Weighting: each loss relative to a reference loss.

  .. math::
    w_k(t) = \left(\frac{L_k(t)}{L_k^{\mathrm{ref}}}\right)^{\alpha},
    \qquad \text{then, if } \texttt{normalize}: \quad
    w_k \leftarrow T \, \frac{w_k}{\sum_{i=1}^{T} w_i},

  where :math:`L_k^{\mathrm{ref}}` is the loss of the first step of the
  current epoch (of the very first step when ``steps_per_epoch`` is None).
  A task that has already reduced its loss a lot is weighted down, so it
  does not dominate the shared parameters (negative transfer). ``alpha=0``
  gives equal weights; ``alpha=1`` the plain loss ratio. The renormalisation
  to a sum of ``T`` follows the authors' code. The weights are computed from
  ``α (log L_k − log L_k^ref)``: with ``normalize`` they are in ``(0, T]``
  for any losses; without it, a task whose loss has grown far above its
  reference gets a weight of at most 1e30 (never inf). Falling losses make
  the weights fall, never blow up.

  A rejected step (a non-finite, zero or negative loss) never becomes a
  reference: the previous state is kept, ``num_skipped`` is incremented and
  the previous weights are applied again. Epochs count accepted steps only:
  the reference is the loss of the first accepted step of each run of
  ``steps_per_epoch`` accepted steps.

  Args:
    num_tasks: the number of tasks T.
    alpha: the exponent α >= 0 (the paper uses 0.5).
    steps_per_epoch: None to keep the losses of the first step as the
      reference for ever, or the number of steps per epoch (an integer >= 1):
      the reference is then retaken at the first step of each epoch.
    normalize: rescale the weights to sum to ``T``.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.lbtw(num_tasks=2, alpha=1.0, normalize=False)
    >>> task_grads = jnp.eye(2)
    >>> state = strategy.init(None)
    >>> for losses in ([4.0, 2.0], [1.0, 2.0]):
    ...   update, state = strategy.update(
    ...       task_grads, state, task_losses=jnp.array(losses))
    >>> state.weights.tolist()
    [0.25, 1.0]

  References:
    Liu, Liang & Gitter, "Loss-Balanced Task Weighting to Reduce Negative
    Transfer in Multi-Task Learning", AAAI 2019 (student abstract).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  alpha = base.check_in_range("alpha", alpha, 0.0)
  steps_per_epoch = base.check_positive_int("steps_per_epoch", steps_per_epoch,
                                            allow_none=True)
  normalize = base.check_bool("normalize", normalize)

  def init():
    return LbtwState(
        **base.common_state_fields(num_tasks),
        reference_losses=jnp.ones((num_tasks,), jnp.float32),
        steps_in_epoch=jnp.zeros([], jnp.int32))

  def rule(task_losses, state, gramian):
    del gramian
    reference = jnp.where(state.steps_in_epoch == 0, task_losses,
                          state.reference_losses)
    log_weights = alpha * (_loss_history.log_positive(task_losses)
                           - _loss_history.log_positive(reference))
    if normalize:
      weights = _loss_history.normalized_weights(log_weights)
    else:
      weights = jnp.exp(jnp.minimum(log_weights,
                                    _loss_history.LOG_MAX_WEIGHT))
    if steps_per_epoch is None:
      steps = optax.safe_increment(state.steps_in_epoch)
    else:
      steps = (state.steps_in_epoch + 1) % steps_per_epoch
    return weights, state._replace(
        reference_losses=reference.astype(jnp.float32),
        steps_in_epoch=steps.astype(jnp.int32))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=True))
