"""IMTL: IMTL-L's learned loss scales, then IMTL-G on the scaled gradients."""

from typing import Any, NamedTuple, Sequence, Union

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step
from optax_mtl._src.weighting import _imtl_g
from optax_mtl._src.weighting import _imtl_l


class ImtlState(NamedTuple):
  """State of :func:`imtl`."""

  weights: chex.Array  # f32[T], the weights applied last: α_k e^{s_k}.
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  loss_scales: chex.Array  # f32[T], s_k, after the last update.
  # The optax state of each scale's optimizer, as in ImtlLState.
  optimizer_state: Any

  scales_optimizer = deprecation.renamed_field("optimizer_state")  # 0.1.


@deprecation.renamed_arguments(
    {"eps": "min_relative_norm"},
    old_positional=("num_tasks", "learning_rate", "optimizer",
                    "initial_scales"))
def imtl(
    num_tasks: int,
    learning_rate: float = 1e-2,
    *,
    initial_scales: Union[float, Sequence[float]] = 0.0,
    optimizer: str = "adam",
    min_relative_norm: float = 1e-8,
) -> base.MultiTaskStrategy:
  r"""IMTL (hybrid): IMTL-L loss scales, then IMTL-G on the scaled gradients.

  The full method (the hybrid balance) of Liu et al. (2021). Each task's
  loss is scaled by a learned :math:`e^{s_k}` as in :func:`optax_mtl.imtl_l`
  (:math:`e^{s_k} L_k - s_k`), so the shared parameters see the scaled
  gradients :math:`\tilde g_k = e^{s_k} g_k`, whose Gramian is
  :math:`\tilde G = D G D` with :math:`D = \operatorname{diag}(e^{s})`.
  IMTL-G (:func:`optax_mtl.imtl_g`, the same weight function) turns
  :math:`\tilde G` into :math:`\alpha` with :math:`\sum_k \alpha_k = 1` and
  equal projections of :math:`d = \sum_k \alpha_k \tilde g_k` on every unit
  gradient, so the weights on the raw gradients are

  .. math::
    w_k = \alpha_k(\tilde G)\, e^{s_k}, \qquad
    d = \sum_{k=1}^{T} w_k\, g_k.

  Then :math:`s` takes one step on :math:`\partial/\partial s_k = e^{s_k}
  L_k - 1` (with the losses of this step, from :math:`s` before the step),
  exactly as in :func:`optax_mtl.imtl_l`. The unit gradients do not depend
  on :math:`s`, but the affine constraint :math:`\sum \alpha = 1` does: the
  scales set the length of the update, IMTL-G its direction.

  In the paper the task-specific parameters receive their own scaled-loss
  gradient :math:`e^{s_k} \nabla L_k`. Here, as for every Gramian strategy,
  they receive their own unweighted gradient :math:`\nabla L_k` (or
  :math:`w_k \nabla L_k` with ``weight_task_specific=True``, see
  :func:`optax_mtl.with_shared_parameters`).

  Defaults: :math:`s = 0` at the start (the paper); the scales' optimizer
  (Adam) and ``learning_rate = 1e-2`` are this library's choice, as in
  :func:`optax_mtl.imtl_l`; ``min_relative_norm`` as in
  :func:`optax_mtl.imtl_g`.

  A step with a non-finite or non-positive loss, a non-finite Gramian or a
  non-finite update of :math:`s` is counted in ``num_skipped``; :math:`s` and
  the optimizer state are kept and the previous weights are applied.

  Args:
    num_tasks: the number of tasks T.
    learning_rate: the scales' learning rate, ``> 0``.
    initial_scales: the initial :math:`s`, one number or ``num_tasks``
      numbers.
    optimizer: ``"adam"`` or ``"sgd"``, the scales' optimizer (one per
      scale, as in :func:`optax_mtl.imtl_l`).
    min_relative_norm: IMTL-G's threshold: a gradient norm at or below
      ``min_relative_norm`` times the largest counts as zero (``eps``
      before optax_mtl 0.2).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.imtl(num_tasks=2, initial_scales=[0.0, 1.0])
    >>> task_grads = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> # Scaled gradients (2, 0), (0, e): α = (e, 2)/(2 + e), w = α·(1, e).
    >>> [round(w, 4) for w in state.weights.tolist()]
    [0.5761, 1.1522]
    >>> [round(u, 4) for u in update.tolist()]
    [1.1522, 1.1522]

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, `Towards Impartial
    Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_,
    ICLR 2021 (IMTL, the hybrid of IMTL-G and IMTL-L).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  learning_rate, optimizer, initial = _imtl_l.check_scales_options(
      num_tasks, learning_rate, optimizer, initial_scales)
  min_relative_norm = base.check_in_range(
      "min_relative_norm", min_relative_norm, 0.0, 1.0, high_inclusive=False)
  transformation = _imtl_l.scales_optimizer(optimizer, learning_rate)

  def init():
    scales = _imtl_l.init_loss_scales(transformation, initial)
    return ImtlState(
        **base.common_state_fields(num_tasks, jnp.exp(scales["loss_scales"]),
                                   gramian=True, gradients=True), **scales)

  def rule(task_losses, state, gramian):
    scales = jnp.exp(state.loss_scales)
    # In the Gramian's dtype (float64 under x64, as imtl_g).
    factors = scales.astype(gramian.dtype)
    if num_tasks == 1:
      alpha = jnp.ones((1,), gramian.dtype)
    else:
      alpha = _imtl_g._imtl_g_weights(  # pylint: disable=protected-access
          gramian * factors[:, None] * factors[None, :], min_relative_norm)
    new_state, finite = _imtl_l.step_loss_scales(transformation, state,
                                                 task_losses)
    return alpha * factors, new_state, finite

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=True, gramian_degree=0))
