"""MoDo: MGDA weights moved by double-sampled stochastic gradients."""

from typing import NamedTuple

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import double_sampling


class ModoState(NamedTuple):
  """State of :func:`modo`."""

  weights: chex.Array  # f32[T] (f64 under x64), λ (1/T at init), simplex.
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.


@deprecation.renamed_arguments({"gamma": "learning_rate"})
def modo(num_tasks: int, learning_rate: float = 1e-3, rho: float = 0.0,
         *, normalize_step: bool = False) -> base.MultiTaskStrategy:
  r"""MoDo: multi-objective gradient with double sampling.

  Each step reads three independent minibatches :math:`z_1, z_2, z_3` (the
  per-task Jacobians :math:`J_1, J_2, J_3`):

  .. math::
    \lambda \leftarrow \Pi_\Delta\bigl(\lambda - \gamma\,
      (J_1 J_2^\top + \rho I)\,\lambda\bigr), \qquad
    d = J_3^\top \lambda,

  where :math:`\Pi_\Delta` is the projection onto the simplex and γ is
  ``learning_rate``. The product
  of two independent estimates makes the step on λ unbiased for the
  expected Gramian (MGDA's weights from a single minibatch are biased).
  ``normalize_step=True`` divides γ by the largest entry of
  :math:`|J_1 J_2^\top|`, which makes the weights' path independent of the
  gradients' scale (an option of this library, not of the paper).

  Data: the step needs three minibatches; with
  :func:`optax_mtl.value_and_grad` every data argument carries a leading
  axis of size 3 (entry s is minibatch s), and on the optax face
  ``task_grads`` has leading axes ``(3, T)`` and ``task_losses`` shape
  ``(3, T)`` or ``(T,)``. The losses returned are the mean over the three.
  Memory: three per-task Jacobians.

  A step with a non-finite loss or gradient returns a zero update and keeps
  λ (``num_skipped``); zero and negative losses are ordinary values.

  Args:
    num_tasks: the number of tasks T.
    learning_rate: γ > 0, the step on λ (the authors tune it per problem;
      1e-3 is this library's default). Renamed from ``gamma`` in optax_mtl
      0.2 (the old name warns).
    rho: ρ >= 0, the ℓ2 regularisation of λ (0 here; LibMTL's ``MoDo``
      uses ``MoDo_rho=0.1``: pass ``rho=0.1`` to reproduce it).
    normalize_step: divide γ by the scale of the cross-Gramian.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.modo(num_tasks=2, learning_rate=0.5)
    >>> jacobians = jnp.array([[[1.0, 0.0], [0.0, 2.0]]] * 3)  # 3 minibatches.
    >>> update, state = strategy.update(
    ...     jacobians, strategy.init(None), task_losses=jnp.ones(2))
    >>> state.weights.tolist()  # Π(½ − ½·(½, 2)) = Π(0.25, −0.5).
    [0.875, 0.125]

  References:
    Chen, Fernando, Ying & Chen, `Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance
    <https://arxiv.org/abs/2305.20057>`_, NeurIPS 2023.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  learning_rate = base.check_in_range("learning_rate", learning_rate, 0.0,
                                      low_inclusive=False)
  rho = base.check_in_range("rho", rho, 0.0)
  normalize_step = base.check_bool("normalize_step", normalize_step)

  def init(params):
    del params
    return ModoState(**double_sampling.iterate_fields(num_tasks))

  def rule(task_losses, state, task_grads):
    del task_losses
    product = double_sampling.cross_gramian(task_grads, 0, 1,
                                            scaled=normalize_step)
    step_size = learning_rate / (double_sampling.scale_of(product)
                                 if normalize_step else 1)
    lambdas = state.weights.astype(product.dtype)
    lambdas = solvers.project_simplex(
        lambdas - step_size * (product @ lambdas + rho * lambdas))
    update = double_sampling.combine_sample(lambdas, task_grads, 2)
    return update, state._replace(weights=lambdas.astype(state.weights.dtype))

  return step.as_gradient_transformation(base.GradientRule(
      num_tasks=num_tasks, init=init, rule=rule,
      requires_positive_losses=False, num_samples=3, name="modo"))
