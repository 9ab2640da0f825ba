"""ExcessMTL: task weights raised where the estimated excess risk is high."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import double_sampling
from optax_mtl._src.weighting._helpers import task_gradient_tree as task_tree


class ExcessMtlState(NamedTuple):
  """State of :func:`excess_mtl`."""

  weights: chex.Array  # f32[T] (f64 under x64), λ (ones at init; sum T).
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  squared_gradient_sums: Any  # a: params-shaped, leading task axis (≥ f32).
  initial_excess_risks: chex.Array  # f32[T] (f64 under x64), r⁰.
  num_steps: chex.Array  # i32[], accepted steps (saturates).


# How far below the largest a log-weight may fall: e^-80 ≈ 1.8e-35 is a
# normal float32 (the smallest is about e^-87.3), so the weights kept in the
# float32 state never underflow to 0, whose log would lose the task for good.
LOG_WEIGHT_RANGE = 80.0


@deprecation.renamed_arguments({"robust_step_size": "learning_rate"})
def excess_mtl(
    num_tasks: int,
    learning_rate: float = 1e-2,
    *,
    eps: float = 1e-7,
) -> base.MultiTaskStrategy:
  r"""ExcessMTL: weights updated by the tasks' estimated excess risks.

  The excess risk of task k (its distance to its own optimum) is estimated
  by a second-order expansion with an AdaGrad-style diagonal Hessian:

  .. math::
    a_k \leftarrow a_k + g_k \odot g_k, \qquad
    r_k = \sum_j \frac{g_{k,j}^2}{\sqrt{a_{k,j} + \epsilon}}.

  The first step records :math:`r^0 = r` and keeps the weights at 1; every
  later step moves them by exponentiated gradient on the normalised risks
  and applies them:

  .. math::
    \lambda_k \leftarrow \lambda_k \exp(\eta\, r_k / r^0_k), \qquad
    \lambda \leftarrow T \lambda / \textstyle\sum_j \lambda_j, \qquad
    d = \sum_k \lambda_k g_k.

  Tasks far from their optimum get more weight; tasks with label noise,
  whose loss stays high but whose excess risk is small, do not. A task
  with :math:`r^0_k = 0` (a zero first gradient) keeps its weight. A
  log-weight is kept at most 80 below the largest (``λ_k ≥ e^{-80}``
  relative), so that no weight underflows the float32 state to 0: a task
  whose weight fell comes back when its excess risk rises again.

  Memory: the state keeps one params-shaped sum of squared gradients per
  task (T × params), on top of the per-task Jacobian; use it without
  ``encoder_fn``.

  A step with a non-finite loss or gradient returns a zero update and keeps
  the state (``num_skipped``); zero and negative losses are ordinary values.

  Renamed in optax_mtl 0.2: ``robust_step_size`` → ``learning_rate`` (the
  old name warns).

  Defaults: η = 1e-2 and ε = 1e-7 (the authors' code, in LibMTL); weights
  summing to T as LibMTL (the paper keeps them on the simplex, the same up
  to the learning rate).

  Args:
    num_tasks: the number of tasks T.
    learning_rate: η > 0, the exponentiated-gradient step on the weights.
    eps: ε >= 0 in the diagonal Hessian estimate.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.excess_mtl(num_tasks=2, learning_rate=1.0)
    >>> state = strategy.init(jnp.zeros(2))
    >>> update, state = strategy.update(
    ...     jnp.array([[1.0, 0.0], [0.0, 2.0]]), state, task_losses=jnp.ones(2))
    >>> state.weights.tolist()  # The first step records r⁰.
    [1.0, 1.0]
    >>> update, state = strategy.update(
    ...     jnp.array([[1.0, 0.0], [0.0, 0.0]]), state, task_losses=jnp.ones(2))
    >>> [round(w, 4) for w in state.weights.tolist()]  # r/r⁰ = (0.71, 0).
    [1.3395, 0.6605]

  References:
    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, `Robust Multi-Task
    Learning with Excess Risks <https://arxiv.org/abs/2402.02009>`_, ICML
    2024 (Algorithm 1).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  learning_rate = base.check_in_range(
      "learning_rate", learning_rate, 0.0, low_inclusive=False)
  eps = base.check_in_range("eps", eps, 0.0)

  def init(params):
    fields = base.common_state_fields(num_tasks, gradients=True)
    fields["weights"] = fields["weights"].astype(
        double_sampling.iterate_dtype())
    return ExcessMtlState(
        **fields,
        squared_gradient_sums=task_tree.zeros_per_task(params, num_tasks),
        initial_excess_risks=jnp.zeros((num_tasks,),
                                       double_sampling.iterate_dtype()),
        num_steps=jnp.zeros([], jnp.int32))

  def rule(task_losses, state, task_grads):
    del task_losses
    grads = task_tree.float_part(task_grads)
    sums = jax.tree.map(lambda a, g: a + jnp.square(g),
                        state.squared_gradient_sums, grads)
    risks = task_tree.per_task_sum(jax.tree.map(
        lambda g, a: jnp.square(g) / jnp.sqrt(a + eps), grads,
        sums)).astype(state.initial_excess_risks.dtype)
    first = state.num_steps == 0
    initial = jnp.where(first, risks, state.initial_excess_risks)
    log_weights = jnp.log(state.weights) + jnp.where(
        first, 0.0, learning_rate * solvers.safe_divide(risks, initial))
    # At most LOG_WEIGHT_RANGE below the largest: every weight stays a
    # normal float32 (≥ e^-80), so log λ stays finite and a task whose
    # weight fell that far comes back when its excess risk does.
    log_weights = jnp.maximum(log_weights,
                              jnp.max(log_weights) - LOG_WEIGHT_RANGE)
    weights = num_tasks * jax.nn.softmax(log_weights)
    update = task_tree.combine(weights, grads, task_grads)
    return update, state._replace(
        weights=weights.astype(state.weights.dtype),
        squared_gradient_sums=sums,
        initial_excess_risks=initial,
        num_steps=optax.safe_increment(state.num_steps))

  return step.as_gradient_transformation(base.GradientRule(
      num_tasks=num_tasks, init=init, rule=rule,
      requires_positive_losses=False, state_like_params=True,
      name="excess_mtl"))
