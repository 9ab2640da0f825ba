"""PBI: the gradient of MOEA/D's penalty-based boundary intersection."""

from typing import NamedTuple, Optional, Sequence, Union

import chex
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.weighting import _stch

# pylint: disable=protected-access
_check_preference = _stch._check_preference
_check_reference_point = _stch._check_reference_point
# pylint: enable=protected-access


class PbiState(NamedTuple):
  """State of :func:`pbi`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], steps with a non-finite loss.


def pbi_weights(task_losses: chex.Array, direction: chex.Array,
                reference_point: chex.Array, theta) -> chex.Array:
  r"""``∂/∂L (d₁ + θ d₂)``: ``ŵ + θ u/‖u‖`` (``ŵ`` where ``d₂ = 0``).

  Args:
    task_losses: ``L`` [T].
    direction: ``ŵ`` [T], of unit norm.
    reference_point: ``z*`` [T].
    theta: ``θ``.

  Returns:
    The weights [T], in the dtype of ``task_losses``.
  """
  shifted = task_losses - reference_point
  along = jnp.sum(shifted * direction)  # d₁.
  across = shifted - along * direction  # u, orthogonal to ŵ; d₂ = ‖u‖.
  # u / ‖u‖ as (u/m) / ‖u/m‖ (m = max |u_k|): no overflow of u². A u
  # within the round-off of computing it (T ε Σ|L − z*|) is the line
  # itself (d₂ = 0): its direction would be noise.
  largest = jnp.max(jnp.abs(across))
  on_line = largest <= solvers.resolve_cutoff(
      task_losses.dtype, task_losses.shape[0], jnp.sum(jnp.abs(shifted)))
  unit = solvers.safe_divide(across, jnp.where(on_line, 0, largest))
  unit = solvers.safe_divide(unit, jnp.sqrt(jnp.sum(unit**2)))
  return direction + jnp.asarray(theta, task_losses.dtype) * unit


def pbi(
    num_tasks: int,
    theta: float = 5.0,
    preference: Optional[Sequence[float]] = None,
    reference_point: Union[None, float, Sequence[float]] = 0.0,
) -> base.MultiTaskStrategy:
  r"""PBI: MOEA/D's penalty-based boundary intersection (its gradient).

  Zhang & Li (2007) scalarise the losses ``L`` along a preference direction
  ``ŵ = w / ‖w‖`` from a reference point ``z*``: ``d₁`` is the distance
  travelled along ``ŵ`` and ``d₂`` the distance from that line,

  .. math::
    d_1 = (L - z^*)^\top \hat w, \qquad
    d_2 = \bigl\lVert (L - z^*) - d_1 \hat w \bigr\rVert, \qquad
    g^{\text{pbi}}(L) = d_1 + \theta\, d_2,

  so that minimising ``g`` moves the losses down the line through ``z*``
  of direction ``ŵ``, and ``θ`` sets how hard they are held to it. The
  step is one backward pass: the weights are the gradient of ``g`` with
  respect to the losses, held constant (stop-gradient),

  .. math::
    w = \frac{\partial g}{\partial L} = \hat w + \theta\,
        \frac{u}{\lVert u \rVert}, \qquad u = (L - z^*) - d_1 \hat w,

  and ``ŵ`` (a subgradient) on the line itself (``d₂ = 0``). A weight may
  be negative: a task whose loss is below the line is pushed back up
  towards it.

  Defaults: ``θ = 5`` (the paper's experiments), ``z* = 0`` (the ideal
  point of non-negative losses), ``w = (1, …, 1)``.

  A step with a non-finite loss is counted in ``num_skipped`` and the
  previous weights are applied again; zero and negative losses are fine.

  Args:
    num_tasks: the number of tasks T.
    theta: ``θ >= 0``, the penalty on the distance from the line.
    preference: ``w``, T non-negative numbers, not all zero (normalised to
      ``ŵ``); None for equal ones.
    reference_point: ``z*``, a number or T numbers, in loss units (None:
      the origin).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.pbi(num_tasks=2, theta=5.0)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> _, state = strategy.update(  # On the line: w = ŵ = (1, 1)/√2.
    ...     task_grads, strategy.init(None), task_losses=jnp.array([2.0, 2.0]))
    >>> [round(w, 4) for w in state.weights.tolist()]
    [0.7071, 0.7071]
    >>> _, state = strategy.update(  # Task 1 behind: it gets more weight.
    ...     task_grads, state, task_losses=jnp.array([1.0, 3.0]))
    >>> [round(w, 4) for w in state.weights.tolist()]
    [-2.8284, 4.2426]

  References:
    Zhang & Li, `MOEA/D: A Multiobjective Evolutionary Algorithm Based on
    Decomposition <https://doi.org/10.1109/TEVC.2007.892759>`_, IEEE
    Transactions on Evolutionary Computation 11(6), 2007.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  theta = base.check_in_range("theta", theta, 0.0)
  values = _check_preference(preference, num_tasks)  # None: ones.
  point = _check_reference_point(reference_point, num_tasks, False)
  if point is None:
    point = np.zeros(num_tasks, np.float32)

  def direction():  # ŵ (the preference may be an injected array).
    unnormalised = jnp.asarray(values, jnp.float32)
    return unnormalised / jnp.sqrt(jnp.sum(unnormalised**2))

  def init():
    return PbiState(**base.common_state_fields(num_tasks, direction()))

  def rule(task_losses, state, gramian):
    del gramian
    return pbi_weights(task_losses, direction(),
                       jnp.asarray(point, task_losses.dtype), theta), state

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=False))
