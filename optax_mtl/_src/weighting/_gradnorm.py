"""GradNorm: learnable loss weights that balance the task gradient norms."""

from typing import NamedTuple

import chex
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import loss_history


class GradnormState(NamedTuple):
  """State of :func:`gradnorm`."""

  weights: chex.Array  # f32[T], the weights applied last, w(t).
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  loss_weights: chex.Array  # f32[T], learnt weights w(t+1), applied next.
  initial_losses: chex.Array  # f32[T], L_i(0), the first accepted losses.
  num_steps: chex.Array  # i32[], accepted weight updates so far.
  gradnorm_loss: chex.Array  # f32[], L_grad of the last accepted step.

  num_updates = deprecation.renamed_field("num_steps")  # 0.1 name.


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _gradnorm_step(loss_weights, task_losses, initial_losses, gramian, alpha,
                   learning_rate, min_weight):
  """One GradNorm update of the loss weights; returns (new weights, L_grad).

  Nothing here overflows, whatever the positive losses: the loss ratios
  ``L̃_i = L_i / L_i(0)`` (1e39 for 1e9 after 1e-30) are taken in log space
  and only their quotients ``r_i <= T`` are formed; the targets and
  ``L_grad`` saturate at the float32 maximum.
  """
  num_tasks = loss_weights.shape[0]
  norms = solvers.gradient_norms(gramian)  # ‖∇_W L_i‖.
  weighted_norms = loss_weights * norms  # G_W^{(i)}.
  log_ratios = (loss_history.log_positive(task_losses)
                - loss_history.log_positive(initial_losses))  # log L̃_i.
  # L̃_i / max_j L̃_j, in (0, 1] (exactly 1 for equal ratios).
  scaled_ratios = jnp.exp(log_ratios - jnp.max(log_ratios))
  relative_rates = scaled_ratios / jnp.mean(scaled_ratios)  # r_i, at most T.
  # The target is a constant: no gradient flows through mean(G_W) or r_i.
  rates_power = jnp.minimum(relative_rates**alpha, _FLOAT32_MAX)
  targets = jnp.minimum(jnp.mean(weighted_norms) * rates_power, _FLOAT32_MAX)
  gradnorm_loss = jnp.minimum(jnp.sum(jnp.abs(weighted_norms - targets)),
                              _FLOAT32_MAX)
  weight_grads = jnp.sign(weighted_norms - targets) * norms
  new_weights = jnp.clip(loss_weights - learning_rate * weight_grads,
                         min_weight, _FLOAT32_MAX / num_tasks)
  new_weights = num_tasks * new_weights / jnp.sum(new_weights)
  return new_weights, gradnorm_loss


def gradnorm(
    num_tasks: int,
    alpha: float = 1.5,
    learning_rate: float = 0.025,
    *,
    min_weight: float = 1e-3,
) -> base.MultiTaskStrategy:
  r"""GradNorm: loss weights learnt so that gradient norms follow the rates.

  With :math:`G_W^{(i)} = w_i \lVert \nabla_W L_i \rVert = w_i
  \sqrt{G_{ii}}` measured on the parameters :math:`W` selected by
  ``optax_mtl.with_shared_parameters`` (in the paper, the last shared
  layer),

  .. math::
    \tilde L_i = \frac{L_i(t)}{L_i(0)}, \quad
    r_i = \frac{\tilde L_i}{\operatorname{mean}_j \tilde L_j}, \quad
    L_\text{grad} = \sum_{i=1}^{T} \bigl| G_W^{(i)} -
    \overline{G_W} \, r_i^{\alpha} \bigr|,

  where the target :math:`\overline{G_W} r_i^\alpha` is a constant. The
  weights take one gradient step :math:`w \leftarrow w - \eta\,
  \partial L_\text{grad} / \partial w`, i.e.
  :math:`w_i \leftarrow w_i - \eta \operatorname{sign}(G_W^{(i)} -
  \overline{G_W} r_i^\alpha) \sqrt{G_{ii}}`, are floored at ``min_weight``
  (so they stay positive) and renormalised to :math:`\sum_i w_i = T`.

  Order: as in Algorithm 1 of the paper, step :math:`t` applies the weights
  :math:`w(t)` it measured the norms with (``state.weights``) and stores the
  updated :math:`w(t+1)` (``state.loss_weights``) for the next step. The
  first step applies :math:`w = 1`. :math:`L_i(0)` is the losses of the first
  accepted step.

  The weights are positive and sum to ``T`` whatever the losses, so they
  stay bounded for any optimizer (plain SGD included). The loss ratios are
  compared in log space: a task whose loss jumps from 1e-30 to 1e9 gets a
  finite rate, and ``gradnorm_loss`` saturates at the float32 maximum.

  The losses must be positive: a step with a zero, negative or non-finite
  loss, or a non-finite Gramian, is counted in ``num_skipped``, the previous
  weights are applied and nothing is learnt.

  Args:
    num_tasks: the number of tasks T.
    alpha: the asymmetry :math:`\alpha \ge 0`; larger values pull the
      gradient norms of slowly trained tasks up harder.
    learning_rate: the step size :math:`\eta > 0` of the weight update.
    min_weight: the floor applied to the weights before renormalising.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.gradnorm(num_tasks=2, learning_rate=0.1)
    >>> task_grads = jnp.array([[3.0, 0.0], [0.0, 1.0]])
    >>> state = strategy.init(None)
    >>> update, state = strategy.update(
    ...     task_grads, state, task_losses=jnp.array([1.0, 1.0]))
    >>> update.tolist()  # The first step applies w = 1.
    [3.0, 1.0]
    >>> [round(w, 4) for w in state.loss_weights.tolist()]
    [0.7778, 1.2222]

  References:
    Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks <https://arxiv.org/abs/1711.02257>`_,
    ICML 2018.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  alpha = base.check_in_range("alpha", alpha, 0.0)
  learning_rate = base.check_in_range("learning_rate", learning_rate, 0.0,
                                      low_inclusive=False)
  min_weight = base.check_in_range("min_weight", min_weight, 0.0, 1.0,
                                   low_inclusive=False, high_inclusive=False)

  def init():
    return GradnormState(
        **base.common_state_fields(num_tasks, gramian=True, gradients=True),
        loss_weights=jnp.ones((num_tasks,), jnp.float32),
        initial_losses=jnp.ones((num_tasks,), jnp.float32),
        num_steps=jnp.zeros([], jnp.int32),
        gradnorm_loss=jnp.zeros([], jnp.float32))

  def rule(task_losses, state, gramian):
    initial_losses = jnp.where(state.num_steps == 0, task_losses,
                               state.initial_losses)
    applied = state.loss_weights
    new_weights, gradnorm_loss = _gradnorm_step(
        applied, task_losses, initial_losses, gramian, alpha, learning_rate,
        min_weight)
    return applied, state._replace(
        loss_weights=new_weights,
        initial_losses=initial_losses,
        num_steps=optax.safe_increment(state.num_steps),
        gradnorm_loss=gradnorm_loss)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=True))
