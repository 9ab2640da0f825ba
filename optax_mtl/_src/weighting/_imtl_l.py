"""IMTL-L: learned loss scales that make every scaled loss equal to one."""

from typing import Any, NamedTuple, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step

OPTIMIZERS = ("adam", "sgd")


class ImtlLState(NamedTuple):
  """State of :func:`imtl_l`."""

  weights: chex.Array  # f32[T], the weights applied last: e^{s_k}.
  num_skipped: chex.Array  # i32[], steps rejected as a whole.
  num_rejected_losses: chex.Array  # i32[T], bad losses per task.
  loss_scales: chex.Array  # f32[T], s_k, after the last update.
  # The optax state of each scale's optimizer, stacked over the tasks:
  # (ScaleByAdamState(count i32[T], mu f32[T], nu f32[T]), EmptyState())
  # for "adam"; EmptyState() for "sgd".
  optimizer_state: Any

  scales_optimizer = deprecation.renamed_field("optimizer_state")  # 0.1.


def scales_optimizer(optimizer: str,
                     learning_rate: Any) -> optax.GradientTransformation:
  """The optax transformation that steps the loss scales s (descent)."""
  if optimizer == "adam":
    return optax.chain(optax.scale_by_adam(),
                       optax.scale_by_learning_rate(learning_rate))
  return optax.scale_by_learning_rate(learning_rate)


def check_scales_options(num_tasks: int, learning_rate: Any, optimizer: Any,
                         initial_scales: Any) -> tuple[Any, str, np.ndarray]:
  """Validates the options of the loss-scale optimizer (imtl_l and imtl)."""
  learning_rate = base.check_in_range("learning_rate", learning_rate, 0.0,
                                      low_inclusive=False)
  if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
    raise ValueError(
        f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
  values = base.check_task_vector("initial_scales", initial_scales,
                                  num_tasks)
  if isinstance(values, np.ndarray):
    with np.errstate(over="ignore"):
      weights = np.exp(values)
    if not np.all(np.isfinite(weights) & (weights > 0)):
      raise ValueError(
          "initial_scales must be finite, with e^s finite and positive in "
          f"float32, got {initial_scales!r}.")
  return learning_rate, optimizer, values


def init_loss_scales(transformation: optax.GradientTransformation,
                     initial_scales: Any) -> dict[str, Any]:
  """The state fields ``loss_scales`` (f32[T]) and ``optimizer_state``.

  One optimizer state per scale, stacked over the tasks (``jax.vmap`` of
  ``transformation.init``), so that each task has its own step count.
  """
  loss_scales = jnp.asarray(initial_scales)
  return dict(loss_scales=loss_scales,
              optimizer_state=jax.vmap(transformation.init)(loss_scales))


def step_loss_scales(transformation: optax.GradientTransformation,
                     state: Any, task_losses: chex.Array,
                     valid: Any = None) -> tuple[Any, chex.Array]:
  """One step of s on ∂/∂s of Σ_k e^{s_k} L_k − s_k (imtl_l and imtl).

  Args:
    transformation: the scales' optimizer (:func:`scales_optimizer`).
    state: a state with the fields of :func:`init_loss_scales`.
    task_losses: f32[T].
    valid: None, or bool[T]: an excluded task keeps its s and its
      optimizer state.

  Returns:
    ``(new_state, finite)``: the state with the new ``loss_scales`` and
    ``optimizer_state``, and whether they are finite (``e^s`` included);
    a rule rejects the step when they are not.
  """
  loss_scales = state.loss_scales
  gradient = jnp.exp(loss_scales) * task_losses - 1.0
  updates, optimizer_state = jax.vmap(transformation.update)(
      gradient, state.optimizer_state, loss_scales)
  if valid is not None:
    optimizer_state = jax.tree.map(
        lambda new, old: jnp.where(valid, new, old), optimizer_state,
        state.optimizer_state)
    updates = jnp.where(valid, updates, 0.0)
  loss_scales = (loss_scales + updates).astype(jnp.float32)
  finite = (jnp.all(jnp.isfinite(loss_scales))
            & jnp.all(jnp.isfinite(jnp.exp(loss_scales)))
            & step.all_finite(optimizer_state))
  return state._replace(loss_scales=loss_scales,
                        optimizer_state=optimizer_state), finite


@deprecation.renamed_arguments(old_positional=(
    "num_tasks", "learning_rate", "optimizer", "initial_scales"))
def imtl_l(
    num_tasks: int,
    learning_rate: float = 1e-2,
    *,
    initial_scales: Union[float, Sequence[float]] = 0.0,
    optimizer: str = "adam",
) -> base.MultiTaskStrategy:
  r"""IMTL-L: each loss scaled by a learned :math:`e^{s_k}`.

  The model and the scales minimise together the scaled loss of Liu et al.
  (2021, the loss balance IMTL-L),

  .. math::
    L(\theta, s) = \sum_{k=1}^{T} e^{s_k} L_k(\theta) - s_k,

  so the weights are :math:`w_k = e^{s_k}`, and

  .. math::
    \frac{\partial L}{\partial s_k} = e^{s_k} L_k - 1

  vanishes at :math:`s_k = -\log L_k`: at equilibrium every scaled loss
  :math:`e^{s_k} L_k` equals one, whatever the scale of the raw loss. The
  :math:`-s_k` term keeps :math:`s` from collapsing to :math:`-\infty`.

  The scales live in the strategy's state and are stepped by the strategy
  itself (the paper trains them with the network's optimizer; a strategy
  cannot reach it): ``optimizer="adam"`` (``optax.scale_by_adam`` with its
  defaults, the default here, as for :func:`optax_mtl.uncertainty`) or
  ``"sgd"`` (plain gradient descent). At step t the weights are computed
  from :math:`s` *before* its update; then :math:`s` takes one step on the
  gradient above with the losses of step t.

  Defaults: :math:`s = 0` at the start (the paper; LibMTL); the optimizer
  and ``learning_rate = 1e-2`` are this library's choice (the paper gives
  none for :math:`s` separately).

  A non-finite or non-positive loss (a zero loss would drive :math:`s_k`
  to :math:`+\infty`: a task without labels in the batch) excludes its
  task only: its :math:`s_k` and optimizer state are kept, its previous
  weight is applied and ``num_rejected_losses`` counts it. Each scale has
  its own optimizer state (with ``"adam"``, its own step count, so the
  bias correction is that of its own updates). A step with no valid loss,
  or whose update of :math:`s` is not finite, is counted in
  ``num_skipped``; :math:`s` and the optimizer state are kept and the
  previous weights are applied (:math:`e^{s}` of the initial :math:`s`
  before the first accepted step).

  Args:
    num_tasks: the number of tasks T.
    learning_rate: the scales' learning rate, ``> 0``.
    initial_scales: the initial :math:`s`, one number or ``num_tasks``
      numbers.
    optimizer: ``"adam"`` or ``"sgd"``.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.imtl_l(num_tasks=2, learning_rate=0.5,
    ...                             optimizer="sgd")
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.array([1.0, 4.0]))
    >>> update.tolist()  # e^0: the weights of the initial s.
    [1.0, 1.0]
    >>> state.loss_scales.tolist()  # s − 0.5 (e^s L − 1)
    [0.0, -1.5]

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, `Towards Impartial
    Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_,
    ICLR 2021 (IMTL-L, the loss balance).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  learning_rate, optimizer, initial = check_scales_options(
      num_tasks, learning_rate, optimizer, initial_scales)
  transformation = scales_optimizer(optimizer, learning_rate)

  def init():
    scales = init_loss_scales(transformation, initial)
    return ImtlLState(
        **base.common_state_fields(num_tasks, jnp.exp(scales["loss_scales"]),
                                   per_task=True), **scales)

  def rule(task_losses, state, gramian, valid=None):
    del gramian
    if valid is None:  # Run as a whole-step weighting: all valid here.
      valid = jnp.isfinite(task_losses) & (task_losses > 0)
    new_state, finite = step_loss_scales(transformation, state, task_losses,
                                         valid)
    return jnp.exp(state.loss_scales), new_state, finite

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=True, per_task=True))
