"""MoCo: tracked task gradients and weights from a projected gradient step."""

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src import tree as tree_lib
from optax_mtl._src.weighting._helpers import double_sampling
from optax_mtl._src.weighting._helpers import task_gradient_tree as task_tree

PROJECTIONS = ("simplex", "softmax")
GRADIENT_NORMALIZATIONS = ("none", "loss")


class MocoState(task_tree.GradientAverageState):
  """State of :func:`moco`: ``weights`` is λ (f32[T], f64 under x64), the
  weights of the tracked gradients; ``gradient_average`` is Y, the tracked
  gradients (params-shaped, leading task axis)."""

  __slots__ = ()
  tracked_gradients = deprecation.renamed_field("gradient_average")


@deprecation.renamed_arguments(
    {"gamma": "learning_rate", "gamma_sigma": "learning_rate_sigma"})
def moco(
    num_tasks: int,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    learning_rate: float = 0.1,
    learning_rate_sigma: float = 0.5,
    rho: float = 0.0,
    *,
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
  t^{\gamma_\sigma}` (γ is ``learning_rate``, :math:`\gamma_\sigma`
  ``learning_rate_sigma``), :math:`Y` the matrix of the tracked gradients
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

  Renamed in optax_mtl 0.2 (the old names warn): ``gamma`` →
  ``learning_rate``, ``gamma_sigma`` → ``learning_rate_sigma``, the state
  field ``tracked_gradients`` → ``gradient_average``.

  Args:
    num_tasks: the number of tasks T.
    beta: β > 0, the tracking step (the newest gradient's weight).
    beta_sigma: β_σ >= 0, its decay exponent.
    learning_rate: γ > 0, the step of the weights.
    learning_rate_sigma: γ_σ >= 0, its decay exponent.
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
    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, `Mitigating Gradient
    Bias in Multi-objective Learning: A Provably Convergent Approach
    <https://arxiv.org/abs/2210.12624>`_, ICLR 2023 (Algorithm 1).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  beta = base.check_in_range("beta", beta, 0.0, low_inclusive=False)
  beta_sigma = base.check_in_range("beta_sigma", beta_sigma, 0.0)
  learning_rate = base.check_in_range("learning_rate", learning_rate, 0.0,
                                      low_inclusive=False)
  learning_rate_sigma = base.check_in_range("learning_rate_sigma",
                                            learning_rate_sigma, 0.0)
  rho = base.check_in_range("rho", rho, 0.0)
  if projection not in PROJECTIONS:
    raise ValueError(
        f"projection must be one of {PROJECTIONS}, got {projection!r}.")
  if gradient_normalization not in GRADIENT_NORMALIZATIONS:
    raise ValueError(
        f"gradient_normalization must be one of {GRADIENT_NORMALIZATIONS}, "
        f"got {gradient_normalization!r}.")

  def init(params):
    return task_tree.init_gradient_average(
        MocoState, params, num_tasks, double_sampling.iterate_fields(num_tasks))

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
    beta_t = task_tree.decaying_step(beta, beta_sigma, num_steps,
                                     tracked_dtype)
    tracked = jax.tree.map(lambda y, g: y - beta_t * (y - g),
                           state.gradient_average, grads)
    gramian = tree_lib.gramian(tracked).astype(tracked_dtype)
    gamma_t = task_tree.decaying_step(learning_rate, learning_rate_sigma,
                                      num_steps, tracked_dtype)
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
        gradient_average=tracked,
        num_steps=num_steps)

  return step.as_gradient_transformation(base.GradientRule(
      num_tasks=num_tasks, init=init, rule=rule,
      requires_positive_losses=gradient_normalization == "loss",
      state_like_params=True, name="moco"))
