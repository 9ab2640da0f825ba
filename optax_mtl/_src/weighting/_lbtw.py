"""Loss-Balanced Task Weighting (LBTW): weight by the loss still left."""

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp
import optax

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import loss_history


class LbtwState(NamedTuple):
  """State of :func:`lbtw`."""

  weights: chex.Array  # f32[T], the weights applied last (ones at init).
  num_skipped: chex.Array  # i32[], steps rejected as a whole.
  num_rejected_losses: chex.Array  # i32[T], each task's rejected losses.
  reference_losses: chex.Array  # f32[T], L^ref (ones before the first step).
  # i32[T], each task's accepted losses since its reference was taken: in
  # [0, steps_per_epoch), or saturating when steps_per_epoch is None. A task
  # that finds 0 here takes its loss as the reference.
  num_epoch_steps: chex.Array

  steps_in_epoch = deprecation.renamed_field("num_epoch_steps")  # 0.1 name.


@deprecation.renamed_arguments(
    old_positional=("num_tasks", "alpha", "steps_per_epoch", "normalize"))
def lbtw(
    num_tasks: int,
    alpha: float = 0.5,
    *,
    normalize: bool = True,
    steps_per_epoch: Optional[int] = None,
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

  A bad loss of one task (non-finite, zero or negative: the weight takes its
  log) excludes that task only: it never becomes a reference, the task
  keeps its previous weight and ``num_rejected_losses[k]`` counts it; the
  other tasks are weighted as usual (with ``normalize``, they share the rest
  of ``T``: the weights still sum to ``T``). Epochs are counted per task in
  accepted losses: a task's reference is its first accepted loss of each
  run of ``steps_per_epoch`` accepted losses (its very first accepted loss
  when ``steps_per_epoch`` is None). Only a step with no valid loss is
  rejected as a whole (``num_skipped``; the previous weights).

  Args:
    num_tasks: the number of tasks T.
    alpha: the exponent α >= 0 (the paper uses 0.5).
    normalize: rescale the weights to sum to ``T``.
    steps_per_epoch: None to keep the losses of the first step as the
      reference for ever, or the number of steps per epoch (an integer >= 1):
      the reference is then retaken at the first step of each epoch.

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
  normalize = base.check_bool("normalize", normalize)
  steps_per_epoch = base.check_positive_int("steps_per_epoch", steps_per_epoch,
                                            allow_none=True)

  def init():
    return LbtwState(
        **base.common_state_fields(num_tasks, per_task=True),
        reference_losses=jnp.ones((num_tasks,), jnp.float32),
        num_epoch_steps=jnp.zeros((num_tasks,), jnp.int32))

  def rule(task_losses, state, gramian, valid=None):
    del gramian
    takes_reference = state.num_epoch_steps == 0
    if valid is not None:
      takes_reference &= valid
    reference = jnp.where(takes_reference, task_losses,
                          state.reference_losses)
    log_weights = alpha * (loss_history.log_positive(task_losses)
                           - loss_history.log_positive(reference))
    if normalize:
      weights = loss_history.normalized_weights(
          log_weights, valid, state.weights)
    else:
      weights = jnp.exp(jnp.minimum(log_weights,
                                    loss_history.LOG_MAX_WEIGHT))
    if steps_per_epoch is None:
      steps = optax.safe_increment(state.num_epoch_steps)
    else:
      steps = (state.num_epoch_steps + 1) % steps_per_epoch
    if valid is not None:
      steps = jnp.where(valid, steps, state.num_epoch_steps)
    return weights, state._replace(
        reference_losses=reference.astype(jnp.float32),
        num_epoch_steps=steps.astype(jnp.int32))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=True, per_task=True))
