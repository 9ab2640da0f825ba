"""Initial-loss normalisation: each loss divided by its initial value."""

from typing import Any, NamedTuple, Optional

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import loss_history


class InitialLossState(NamedTuple):
  """State of :func:`initial_loss`."""

  weights: chex.Array  # f32[T], the weights applied last: 1 / initial_losses.
  num_skipped: chex.Array  # i32[], steps rejected as a whole.
  num_rejected_losses: chex.Array  # i32[T], each task's rejected losses.
  # f32[T], the reference losses L_k^prior: the given prior_losses, or the
  # mean of the accepted losses measured so far (zeros before the first).
  initial_losses: chex.Array
  # i32[T], each task's accepted losses averaged into initial_losses (at
  # most warmup_steps; equal to warmup_steps from the start when
  # prior_losses is given).
  num_measured: chex.Array


@deprecation.renamed_arguments(
    old_positional=("num_tasks", "prior_losses", "warmup_steps"))
def initial_loss(
    num_tasks: int,
    prior_losses: Optional[Any] = None,
    *,
    normalize: bool = False,
    warmup_steps: int = 1,
    max_weight: Optional[float] = None,
) -> base.MultiTaskStrategy:
  r"""Initial-loss normalisation: every loss divided by its initial value.

  .. math::
    L = \sum_{k=1}^{T} \frac{L_k}{L_k^{\text{prior}}},
    \qquad w_k = \frac{1}{L_k^{\text{prior}}}.

  The reference ``L_k^prior`` is either given (``prior_losses``, e.g.
  ``log C`` for a C-class cross-entropy task, the loss of a uniform guess)
  or measured: the mean of the losses of the first ``warmup_steps`` accepted
  steps. While it is being measured the weights are one over the running mean
  of the losses seen so far, so the first step already applies
  ``w_k = 1 / L_k(1)``; from step ``warmup_steps`` on the weights stay fixed.
  Either way the normalised losses start near 1, and a task's weight does not
  depend on the unit its loss is measured in.

  The weights are fixed but as large as the reference losses are small: a
  learning-rate multiplier that Adam and other scale-invariant optimizers
  cancel, but that plain SGD (or momentum) applies as it is. With SGD, use
  ``normalize=True`` (weights that sum to ``T``) or ``max_weight``. Every
  weight is at most 1e30 in any case, so it is never infinite.

  A bad loss of one task (non-finite; when measuring, also zero or
  negative, at every step, since the check is static) excludes that task
  only: it is not measured (it does not count towards the task's
  ``warmup_steps``, which are counted per task in accepted losses), the
  task keeps its previous weight (one before its first accepted loss) and
  ``num_rejected_losses[k]`` counts it; the other tasks are measured as
  usual. With ``normalize=True`` an excluded task keeps its previous weight
  and the others share the rest of ``T``. Only a step with no valid loss is
  rejected as a whole (``num_skipped``). With ``prior_losses`` a zero or
  negative loss is accepted: the weights do not depend on the losses.

  Args:
    num_tasks: the number of tasks T.
    prior_losses: optional reference losses, ``T`` numbers, finite and at
      least the smallest normal float32 (so that their inverses are finite).
      When given nothing is measured.
    normalize: rescale the weights to sum to ``T``,
      :math:`w_k = T / (L_k^{\text{prior}} \sum_i 1/L_i^{\text{prior}})`.
    warmup_steps: the number of accepted steps whose mean losses become the
      reference (only when ``prior_losses`` is None).
    max_weight: None, or a bound > 0 on each weight
      :math:`1/L_k^{\text{prior}}` (applied after ``normalize``).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.initial_loss(num_tasks=2)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> state = strategy.init(None)
    >>> update, state = strategy.update(
    ...     task_grads, state, task_losses=jnp.array([0.5, 4.0]))
    >>> update.tolist()
    [2.0, 0.25]
    >>> update, state = strategy.update(  # The weights are fixed now.
    ...     task_grads, state, task_losses=jnp.array([0.1, 1.0]))
    >>> update.tolist()
    [2.0, 0.25]

  References:
    Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks <https://arxiv.org/abs/1711.02257>`_,
    ICML 2018 (the loss ratio
    ``L_k(t) / L_k(0)``, here used directly as the training objective).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  normalize, max_weight = loss_history.check_weight_options(normalize,
                                                             max_weight)
  warmup_steps = base.check_positive_int("warmup_steps", warmup_steps)
  if prior_losses is not None:
    prior = base.check_task_vector("prior_losses", prior_losses, num_tasks,
                                   loss_history.TINY, allow_scalar=False)
    if warmup_steps != 1:
      raise ValueError(
          "warmup_steps has no effect when prior_losses is given (nothing is "
          f"measured); leave it at 1, got {warmup_steps!r}.")

  def weights_of(reference_losses, valid=None, previous_weights=None):
    return loss_history.finish_weights(
        loss_history.bounded_ratio(1.0, reference_losses),
        -loss_history.log_positive(reference_losses), normalize, max_weight,
        valid, previous_weights)

  def init():
    if prior_losses is None:
      return InitialLossState(
          **base.common_state_fields(num_tasks, per_task=True),
          initial_losses=jnp.zeros((num_tasks,), jnp.float32),
          num_measured=jnp.zeros((num_tasks,), jnp.int32))
    return InitialLossState(
        **base.common_state_fields(
            num_tasks, weights_of(jnp.asarray(prior, jnp.float32)),
            per_task=True),
        initial_losses=jnp.asarray(prior, jnp.float32),
        num_measured=jnp.full((num_tasks,), warmup_steps, jnp.int32))

  def rule(task_losses, state, gramian, valid=None):
    del gramian
    measuring = state.num_measured < warmup_steps
    if valid is not None:
      measuring &= valid
    count = jnp.where(measuring, state.num_measured + 1, state.num_measured)
    # Running mean: m_n = m_{n-1} + (L - m_{n-1}) / n.
    step = (task_losses - state.initial_losses) / count.astype(jnp.float32)
    initial_losses = jnp.where(measuring, state.initial_losses + step,
                               state.initial_losses)
    weights = weights_of(initial_losses, valid, state.weights)
    return weights, state._replace(initial_losses=initial_losses,
                                   num_measured=count)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=prior_losses is None, per_task=True))

