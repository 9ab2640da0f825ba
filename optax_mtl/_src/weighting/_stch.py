"""STCH: the gradient of the smooth Tchebycheff scalarization of the losses."""

from typing import Any, NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step


class StchState(NamedTuple):
  """State of :func:`stch`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], steps rejected as a whole.
  num_rejected_losses: chex.Array  # i32[T], bad losses per task.
  num_steps: chex.Array  # i32[], accepted steps so far (any valid loss).
  # f32[T], the reference point z in loss units: the given one, or the mean
  # of the task's valid losses of the nadir epoch so far (ones until then).
  reference_point: chex.Array
  num_nadir_losses: chex.Array  # i32[T], the valid losses in that mean.
  # f32[T], λ_k (f_k − z_k) / μ at the task's last accepted loss (0 at
  # init): an excluded task's term in the softmax.
  scaled_gaps: chex.Array

  nadir_counts = deprecation.renamed_field("num_nadir_losses")  # 0.1 name.


def stch(
    num_tasks: int,
    mu: float = 1.0,
    preference: Optional[Sequence[float]] = None,
    reference_point: Union[None, float, Sequence[float]] = None,
    *,
    log_losses: bool = True,
    warmup_epochs: int = 4,
    steps_per_epoch: Optional[int] = None,
) -> base.MultiTaskStrategy:
  r"""STCH: weights from the smooth Tchebycheff scalarization of the losses.

  Lin et al. (2024) replace the Tchebycheff scalarization
  :math:`\max_k \lambda_k (f_k - z_k)` by its smooth version

  .. math::
    g_\mu(f \mid \lambda) = \mu \log \sum_{k=1}^{T}
      \exp\!\Big(\frac{\lambda_k (f_k - z_k)}{\mu}\Big),

  with a preference :math:`\lambda` and a reference point :math:`z`. The
  model is trained on :math:`T\, g_\mu`, so the weights of the task
  gradients are

  .. math::
    w_k = \frac{\partial (T g_\mu)}{\partial L_k}
        = T\, \lambda_k\, p_k\, f'_k(L_k), \qquad
    p = \operatorname{softmax}\!\Big(\frac{\lambda (f - z)}{\mu}\Big).

  Following the authors' multi-task code (and LibMTL), the objectives are
  the log losses, :math:`f_k = \log L_k` (``log_losses=True``), so
  :math:`f'_k = 1/L_k`, and :math:`z_k = \log n_k` is the log of a nadir
  estimate :math:`n_k`: :math:`f_k - z_k = \log(L_k / n_k)`. The estimate
  is made during a warm-up: for the first ``warmup_epochs`` epochs the
  model is trained on :math:`\sum_k \log L_k` (:math:`w_k = 1/L_k`); during
  the next epoch too, and :math:`n_k` is the mean of :math:`L_k` over that
  epoch; from then on :math:`n` is fixed and the weights are the STCH ones
  above. With ``log_losses=False`` the objectives are the raw losses
  (:math:`f_k = L_k`, :math:`f'_k = 1`, :math:`z_k = n_k`, the paper's
  general form), and the warm-up trains on :math:`\sum_k L_k`
  (:math:`w_k = 1`). A ``reference_point`` given in loss units replaces the
  estimate (no nadir epoch). The factor :math:`T` (authors' code) makes the
  weights at :math:`\lambda = 1` and equal normalised losses those of the
  warm-up.

  An epoch is ``steps_per_epoch`` accepted steps (one step when None);
  rejected steps are not counted. Defaults: ``mu = 1`` and ``warmup_epochs =
  4`` (the authors' code and LibMTL's ``STCH_mu``, ``STCH_warmup_epoch``);
  ``preference = None`` means :math:`\lambda_k = 1`, as in the authors'
  code. The paper's :math:`\lambda` lies on the simplex: ``preference =
  [1/T] * T`` gives its uniform preference (with :math:`\mu/T` for the same
  softmax as :math:`\lambda = 1`).

  A non-finite loss (or, with ``log_losses=True``, a zero or negative one:
  a task without labels in the batch) excludes its task only: it never
  enters the estimate, the task keeps its previous weight, and
  ``num_rejected_losses`` counts it. The other tasks' weights are computed
  as usual, with the excluded task's term in the softmax taken from its last
  accepted loss. The warm-up and the nadir epoch count the steps with at
  least one valid loss; a task's nadir estimate is the mean of its own valid
  losses in that epoch (a task with none there takes its first valid loss
  after it). A step with no valid loss is counted in ``num_skipped`` and the
  previous weights are applied. With ``log_losses=False`` a zero or
  negative loss is an ordinary value.

  Args:
    num_tasks: the number of tasks T.
    mu: the smoothing parameter :math:`\mu > 0` (small: close to the max).
    preference: None, or T non-negative numbers :math:`\lambda`, not all
      zero.
    reference_point: None (estimated), or the reference point in loss units:
      a number or T numbers (positive when ``log_losses``).
    log_losses: whether the objectives are :math:`\log L_k` (authors' code)
      or :math:`L_k`.
    warmup_epochs: epochs (an integer ``>= 0``) trained on
      :math:`\sum_k f_k` before the nadir epoch.
    steps_per_epoch: the number of accepted steps per epoch, or None (one).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.stch(num_tasks=2, warmup_epochs=0)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> state = strategy.init(None)
    >>> _, state = strategy.update(  # The nadir epoch: w = 1/L.
    ...     task_grads, state, task_losses=jnp.array([2.0, 4.0]))
    >>> state.weights.tolist(), state.reference_point.tolist()
    ([0.5, 0.25], [2.0, 4.0])
    >>> _, state = strategy.update(  # L/n = (1/2, 1): p = (1/3, 2/3).
    ...     task_grads, state, task_losses=jnp.array([1.0, 4.0]))
    >>> [round(w, 4) for w in state.weights.tolist()]  # 2·p/L
    [0.6667, 0.3333]

  References:
    Lin, Zhang, Yang, Liu, Wang & Zhang, `Smooth Tchebycheff Scalarization
    for Multi-Objective Optimization <https://arxiv.org/abs/2402.19078>`_,
    ICML 2024; the multi-task setting
    (log losses, nadir warm-up) from the authors' code (Xi-L/STCH,
    ``STCH_MTL``), also in LibMTL.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  mu = base.check_in_range("mu", mu, 0.0, low_inclusive=False)
  lambdas = _check_preference(preference, num_tasks)
  warmup_epochs = _check_non_negative_int("warmup_epochs", warmup_epochs)
  steps_per_epoch = base.check_positive_int("steps_per_epoch",
                                            steps_per_epoch, allow_none=True)
  log_losses = base.check_bool("log_losses", log_losses)
  given_point = _check_reference_point(reference_point, num_tasks, log_losses)
  epoch = 1 if steps_per_epoch is None else steps_per_epoch
  warmup_steps = warmup_epochs * epoch
  nadir_steps = epoch if given_point is None else 0

  def init():
    point = (np.ones(num_tasks, np.float32) if given_point is None
             else given_point)
    return StchState(
        **base.common_state_fields(num_tasks, per_task=True),
        num_steps=jnp.zeros([], jnp.int32),
        reference_point=jnp.asarray(point),
        num_nadir_losses=jnp.zeros((num_tasks,), jnp.int32),
        scaled_gaps=jnp.zeros((num_tasks,), jnp.float32))

  def objective(losses):
    return jnp.log(losses) if log_losses else losses

  def derivative(losses):
    return 1.0 / losses if log_losses else jnp.ones_like(losses)

  def nadir_estimate(task_losses, state, valid):
    """The reference point and counts after this step's valid losses."""
    index = state.num_steps  # This step's index among the accepted steps.
    after_warmup = index >= warmup_steps
    in_nadir_epoch = after_warmup & (index < warmup_steps + nadir_steps)
    # A task with no valid loss in the nadir epoch takes its first one.
    collecting = valid & (in_nadir_epoch | (
        after_warmup & (state.num_nadir_losses == 0) & (nadir_steps > 0)))
    counts = state.num_nadir_losses + collecting.astype(jnp.int32)
    # The running mean of the task's valid losses (the first one replaces
    # the initial ones).
    running_mean = jnp.where(
        counts == 1, task_losses, state.reference_point
        + (task_losses - state.reference_point) / jnp.maximum(counts, 1))
    reference = jnp.where(collecting, running_mean, state.reference_point)
    return reference, counts

  def rule(task_losses, state, gramian, valid=None):
    del gramian
    if valid is None:  # Run as a whole-step weighting: all valid here.
      valid = jnp.isfinite(task_losses) & (
          (task_losses > 0) if log_losses else True)
    reference, counts = nadir_estimate(task_losses, state, valid)
    warming_up = state.num_steps < warmup_steps + nadir_steps
    gaps = jnp.where(valid, jnp.asarray(lambdas) * (
        objective(task_losses) - objective(reference)) / mu,
                     state.scaled_gaps)
    probabilities = jax.nn.softmax(gaps)
    stch_weights = num_tasks * jnp.asarray(lambdas) * probabilities
    weights = derivative(task_losses) * jnp.where(
        warming_up, jnp.ones_like(stch_weights), stch_weights)
    return weights, state._replace(
        num_steps=optax.safe_increment(state.num_steps),
        reference_point=reference.astype(jnp.float32),
        num_nadir_losses=counts,
        scaled_gaps=gaps.astype(jnp.float32))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=log_losses, per_task=True))


def _check_non_negative_int(name: str, value: Any) -> int:
  if (isinstance(value, (bool, np.bool_))
      or not isinstance(value, (int, np.integer)) or value < 0):
    raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
  return int(value)


def _check_preference(preference: Any, num_tasks: int) -> np.ndarray:
  if preference is None:
    return np.ones(num_tasks, np.float32)
  values = base.check_task_vector("preference", preference, num_tasks, 0.0,
                                  allow_scalar=False)
  if isinstance(values, np.ndarray) and not np.any(values > 0):
    raise ValueError(
        "preference must be finite and non-negative, not all zero, got "
        f"{preference!r}.")
  return values


def _check_reference_point(reference_point: Any, num_tasks: int,
                           log_losses: bool) -> Optional[Any]:
  if reference_point is None:
    return None
  values = base.check_task_vector("reference_point", reference_point,
                                  num_tasks)
  if (log_losses and isinstance(values, np.ndarray)
      and not np.all(values > 0)):
    raise ValueError(
        "reference_point must be positive with log_losses=True, got "
        f"{reference_point!r}.")
  return values
