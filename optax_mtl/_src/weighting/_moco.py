"""MoCo: tracked task gradients and weights from a projected gradient step."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import base
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import double_sampling as _double_sampling
from optax_mtl._src.weighting._helpers import task_gradient_tree as task_tree

PROJECTIONS = ("simplex", "softmax")
GRADIENT_NORMALIZATIONS = ("none", "loss")


class MocoState(NamedTuple):
  """State of :func:`moco`."""

  weights: chex.Array  # f32[T] (f64 under x64), λ: the tracked gradients'.
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  tracked_gradients: Any  # Y: params-shaped, leading task axis (≥ f32).
  num_steps: chex.Array  # i32[], accepted steps t (saturates).


def moco(
    num_tasks: int,
    *,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
    projection: str = "simplex",
    gradient_normalization: str = "none",
) -> base.MultiTaskStrategy:
  r"""MoCo: MGDA on tracked gradients, with weights moved by one step a time.

  With :math:`g_k` task k's gradient and :math:`t` the step (from 1),

  .. math::
    y_k \leftarrow y_k - \beta_t (y_k - g_k), \qquad
    \lambda \leftarrow \Pi\bigl(\lambda - \gamma_t (Y Y^\top + \rho I)
      \lambda\bigr), \qquad
    d = \sum_k \lambda_k y_k,

  with :math:`\beta_t = \beta / t^{\beta_\sigma}`, :math:`\gamma_t = \gamma /
  t^{\gamma_\sigma}`, :math:`Y` the matrix of the tracked gradients
  :math:`y_k` (zero at the start) and :math:`\Pi` the Euclidean projection
  onto the simplex (``"simplex"``, the paper's Algorithm 1) or a softmax
  (``"softmax"``, as LibMTL does). Tracking corrects the bias that MGDA's
  weights suffer from stochastic gradients. λ starts at 1/T.

  ``gradient_normalization="loss"`` replaces :math:`g_k` by
  :math:`L_k\, g_k / \lVert g_k \rVert` before tracking, as LibMTL does.

  Memory: the state keeps one params-shaped tracked gradient per task
  (T × params), on top of the per-task Jacobian of the step. Use it without
  ``encoder_fn`` (its state is shaped like the params).

  A step with a non-finite loss or gradient returns a zero update and keeps
  the state (counted in ``num_skipped``); zero and negative losses are
  ordinary values (except under ``"loss"`` normalisation, where they are
  rejected).

  Defaults: β = 0.5, β_σ = 0.5, γ = 0.1, γ_σ = 0.5, ρ = 0 (LibMTL's
  defaults); the projection of the paper.

  Args:
    num_tasks: the number of tasks T.
    beta: β > 0, the tracking step.
    beta_sigma: β_σ >= 0, its decay exponent.
    gamma: γ > 0, the step of the weights.
    gamma_sigma: γ_σ >= 0, its decay exponent.
    rho: ρ >= 0, the regularisation of the weights' objective.
    projection: ``"simplex"`` or ``"softmax"``.
    gradient_normalization: ``"none"`` or ``"loss"``.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.moco(num_tasks=2)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(jnp.zeros(2)), task_losses=jnp.ones(2))
    >>> update.tolist(), state.weights.tolist()  # y = g/2, λ stays 1/2.
    ([0.25, 0.25], [0.5, 0.5])

  References:
    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient
    Bias in Multi-objective Learning: A Provably Convergent Approach", ICLR
    2023 (Algorithm 1).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  beta = base.check_in_range("beta", beta, 0.0, low_inclusive=False)
  beta_sigma = base.check_in_range("beta_sigma", beta_sigma, 0.0)
  gamma = base.check_in_range("gamma", gamma, 0.0, low_inclusive=False)
  gamma_sigma = base.check_in_range("gamma_sigma", gamma_sigma, 0.0)
  rho = base.check_in_range("rho", rho, 0.0)
  if projection not in PROJECTIONS:
    raise ValueError(
        f"projection must be one of {PROJECTIONS}, got {projection!r}.")
  if gradient_normalization not in GRADIENT_NORMALIZATIONS:
    raise ValueError(
        f"gradient_normalization must be one of {GRADIENT_NORMALIZATIONS}, "
        f"got {gradient_normalization!r}.")

  def init(params):
    return MocoState(
        **_double_sampling.iterate_fields(num_tasks),
        tracked_gradients=task_tree.zeros_per_task(params, num_tasks),
        num_steps=jnp.zeros([], jnp.int32))

  def rule(task_losses, state, task_grads):
    grads = task_tree.float_part(task_grads)
    if gradient_normalization == "loss":
      norms = task_tree.per_task_norms(grads)
      grads = task_tree.scale_per_task(
          solvers.safe_divide(task_losses, norms), grads)
    num_steps = optax.safe_increment(state.num_steps)
    # The Gramian, λ and the step sizes in the gradients' dtype (at least
    # float32; float64 under x64).
    tracked_dtype = jnp.result_type(*jax.tree.leaves(grads), jnp.float32)
    t = num_steps.astype(tracked_dtype)
    beta_t = beta / t ** beta_sigma
    tracked = jax.tree.map(lambda y, g: y - beta_t * (y - g),
                           state.tracked_gradients, grads)
    gramian = task_tree.gramian(tracked).astype(tracked_dtype)
    gamma_t = gamma / t ** gamma_sigma
    lambdas = state.weights.astype(tracked_dtype)
    moved = lambdas - gamma_t * ((gramian + rho * jnp.eye(num_tasks))
                                 @ lambdas)
    if projection == "simplex":
      lambdas = solvers.project_simplex(moved)
    else:
      lambdas = jax.nn.softmax(moved)
    update = task_tree.combine(lambdas, tracked, task_grads)
    return update, state._replace(
        weights=lambdas.astype(state.weights.dtype),
        tracked_gradients=tracked,
        num_steps=num_steps)

  return step.as_gradient_transformation(base.GradientRule(
      num_tasks=num_tasks, init=init, rule=rule,
      requires_positive_losses=gradient_normalization == "loss",
      state_like_params=True, name="moco"))
