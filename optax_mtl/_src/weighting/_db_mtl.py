"""DB-MTL: log losses, then task gradients scaled to the largest norm."""

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import task_gradient_tree as task_tree


class DbMtlState(task_tree.GradientAverageState):
  """State of :func:`db_mtl`: ``weights`` is α_k / L_k (f32[T]), the
  weights of the gradients g_k applied last; ``gradient_average`` is ĝ
  (params-shaped, leading task axis)."""

  __slots__ = ()
  gradient_averages = deprecation.renamed_field("gradient_average")


@deprecation.renamed_arguments({"beta": "decay", "beta_sigma": "decay_sigma"})
def db_mtl(
    num_tasks: int,
    decay: float = 0.9,
    decay_sigma: float = 0.5,
    *,
    eps: float = 1e-8,
) -> base.MultiTaskStrategy:
  r"""DB-MTL: balances the loss scales (logs) and the gradient magnitudes.

  Loss-scale balancing trains on :math:`\log(L_k + \epsilon)`, whose
  gradient is :math:`h_k = g_k / (L_k + \epsilon)`. Gradient-magnitude
  balancing keeps a moving average of those gradients and scales each to
  the largest norm:

  .. math::
    \hat g_k \leftarrow \delta_t\, \hat g_k + (1 - \delta_t)\, h_k, \qquad
    d = \sum_k \frac{\max_j \lVert \hat g_j \rVert}{\lVert \hat g_k \rVert}\,
    \hat g_k,

  with :math:`\delta_t = \delta / t^{\delta_\sigma}` at step t (from 1)
  (δ is ``decay``, :math:`\delta_\sigma` ``decay_sigma``; the paper's β) and
  :math:`\hat g_k = 0` at the start. A task whose average is zero
  contributes nothing.

  Memory: the state keeps one params-shaped average per task (T × params),
  on top of the per-task Jacobian of the step; use it without
  ``encoder_fn``.

  A step with a non-finite, zero or negative loss, or a non-finite
  gradient, returns a zero update and keeps the state (``num_skipped``).

  Defaults: δ = 0.9, δ_σ = 0.5, ε = 1e-8. LibMTL's ``DB_MTL`` runs with
  ``DB_beta_sigma=0`` (a constant δ): ``db_mtl(T, decay_sigma=0)``
  reproduces it.

  Renamed in optax_mtl 0.2 (the old names warn): ``beta`` → ``decay`` (the
  old average's weight, as optax's ``ema(decay)``), ``beta_sigma`` →
  ``decay_sigma``, the state field ``gradient_averages`` →
  ``gradient_average``.

  Args:
    num_tasks: the number of tasks T.
    decay: δ in (0, 1], the weight of the old average.
    decay_sigma: δ_σ >= 0, its decay exponent.
    eps: ε >= 0, added to the losses inside the logarithm.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.db_mtl(num_tasks=2, eps=0.0)
    >>> task_grads = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(jnp.zeros(2)),
    ...     task_losses=jnp.array([1.0, 4.0]))
    >>> [round(u, 4) for u in update.tolist()]  # Both scaled to norm 0.2.
    [0.2, 0.2]

  References:
    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang & Kwok, `Dual-Balancing
    for Multi-Task Learning <https://arxiv.org/abs/2308.12029>`_, 2023.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  decay = base.check_in_range("decay", decay, 0.0, 1.0, low_inclusive=False)
  decay_sigma = base.check_in_range("decay_sigma", decay_sigma, 0.0)
  eps = base.check_in_range("eps", eps, 0.0)

  def init(params):
    return task_tree.init_gradient_average(
        DbMtlState, params, num_tasks,
        base.common_state_fields(num_tasks, gradients=True))

  def rule(task_losses, state, task_grads):
    log_grads = task_tree.scale_per_task(
        1.0 / (task_losses + eps), task_tree.float_part(task_grads))
    num_steps = optax.safe_increment(state.num_steps)
    # δ_t in the averages' dtype (float64 under x64 with float64 params).
    dtype = jnp.result_type(*jax.tree.leaves(state.gradient_average),
                            jnp.float32)
    decay_t = task_tree.decaying_step(decay, decay_sigma, num_steps, dtype)
    averages = jax.tree.map(lambda avg, h: decay_t * avg + (1 - decay_t) * h,
                            state.gradient_average, log_grads)
    norms = task_tree.per_task_norms(averages)
    scales = solvers.safe_divide(jnp.max(norms), norms)
    update = task_tree.combine(scales, averages, task_grads)
    return update, state._replace(
        weights=(scales / (task_losses + eps)).astype(jnp.float32),
        gradient_average=averages, num_steps=num_steps)

  return step.as_gradient_transformation(base.GradientRule(
      num_tasks=num_tasks, init=init, rule=rule,
      requires_positive_losses=True, state_like_params=True, name="db_mtl"))
