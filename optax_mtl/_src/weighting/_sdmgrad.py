"""SDMGrad: stochastic direction-oriented MGDA with double sampling."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import double_sampling


class SdmgradState(NamedTuple):
  """State of :func:`sdmgrad`."""

  weights: chex.Array  # f32[T] (f64 under x64), w after the inner steps.
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.


@deprecation.renamed_arguments(
    {"lamda": "lam", "inner_learning_rate": "learning_rate"})
def sdmgrad(num_tasks: int, lam: float = 0.3, learning_rate: float = 0.5, *,
            num_inner_steps: int = 20) -> base.MultiTaskStrategy:
  r"""SDMGrad: MGDA pulled towards the average gradient, double-sampled.

  With :math:`g_0 = \frac1T \sum_k g_k` the average gradient and three
  independent minibatches (:math:`J_1, J_2, J_3`), the weights take
  ``num_inner_steps`` projected gradient steps on
  :math:`\tfrac12 \lVert J^\top w \rVert^2 + \lambda\, g_0^\top J^\top w`
  with the double-sampled gradient, then weigh the third minibatch:

  .. math::
    w \leftarrow \Pi_\Delta\bigl(w - \beta\, J_1 J_2^\top
      (w + \tfrac{\lambda}{T} \mathbf 1)\bigr) \;(\text{repeated}), \qquad
    d = \frac{J_3^\top (w + \frac{\lambda}{T} \mathbf 1)}{1 + \lambda}.

  The step β is ``learning_rate`` divided by the largest entry of
  :math:`|J_1 J_2^\top|`, so the weights do not depend on the gradients'
  scale. λ = 0 is stochastic MGDA; λ → ∞ the average gradient. w starts
  each step from the last step's w. LibMTL's and torchjd's ``SDMGrad``
  solve the same inner problem differently (SGD with momentum on a
  rescaled cross-Gramian), so their weights differ by definition; no
  option here reproduces them.

  Data: three minibatches per step, as :func:`optax_mtl.modo` (a leading
  axis of size 3 on every data argument of
  :func:`optax_mtl.value_and_grad`; ``task_grads`` with leading axes
  ``(3, T)`` on the optax face). Memory: three per-task Jacobians.

  A step with a non-finite loss or gradient returns a zero update and keeps
  w (``num_skipped``); zero and negative losses are ordinary values.

  Renamed in optax_mtl 0.2 (the old names warn): ``lamda`` → ``lam``,
  ``inner_learning_rate`` → ``learning_rate``.

  Args:
    num_tasks: the number of tasks T.
    lam: λ >= 0, the pull towards the average gradient (0.3, as LibMTL).
    learning_rate: the step on w, relative to the cross-Gramian's scale
      (this library's normalisation).
    num_inner_steps: the projected gradient steps on w per step (20, as
      LibMTL).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.sdmgrad(num_tasks=2, lam=0.0,
    ...                              num_inner_steps=200)
    >>> jacobians = jnp.array([[[1.0, 0.0], [0.0, 2.0]]] * 3)
    >>> _, state = strategy.update(
    ...     jacobians, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(w, 3) for w in state.weights.tolist()]  # MGDA's weights.
    [0.8, 0.2]

  References:
    Xiao, Ban & Ji, `Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms <https://arxiv.org/abs/2305.18409>`_,
    NeurIPS 2023.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  lam = base.check_in_range("lam", lam, 0.0)
  num_inner_steps = base.check_positive_int("num_inner_steps",
                                            num_inner_steps)
  learning_rate = base.check_in_range(
      "learning_rate", learning_rate, 0.0, low_inclusive=False)

  def init(params):
    del params
    return SdmgradState(**double_sampling.iterate_fields(num_tasks))

  def rule(task_losses, state, task_grads):
    del task_losses
    # Read up to a positive factor (β · product): scaled, so that tiny or
    # huge gradients give the same weights.
    product = double_sampling.cross_gramian(task_grads, 0, 1, scaled=True)
    beta = learning_rate / double_sampling.scale_of(product)
    pull = lam / num_tasks

    def inner_step(_, weights):
      return solvers.project_simplex(
          weights - beta * (product @ (weights + pull)))

    weights = jax.lax.fori_loop(0, num_inner_steps, inner_step,
                                state.weights.astype(product.dtype))
    combined = (weights + pull) / (1 + lam)
    update = double_sampling.combine_sample(combined, task_grads, 2)
    return update, state._replace(weights=weights.astype(state.weights.dtype))

  return step.as_gradient_transformation(base.GradientRule(
      num_tasks=num_tasks, init=init, rule=rule,
      requires_positive_losses=False, num_samples=3, name="sdmgrad"))
