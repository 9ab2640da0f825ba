"""COSMOS: the gradient of the cosine-penalised linear scalarization."""

from typing import NamedTuple, Optional, Sequence

import chex
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.weighting import _stch


class CosmosState(NamedTuple):
  """State of :func:`cosmos`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], steps with a non-finite loss.


def cosmos_weights(task_losses: chex.Array, preference: chex.Array,
                   penalty) -> chex.Array:
  r"""``∂/∂L [rᵀL − λ rᵀL / (‖r‖ ‖L‖)]``, with 0 for the penalty at ``L = 0``.

  Args:
    task_losses: ``L`` [T].
    preference: ``r`` [T], not all zero.
    penalty: ``λ``.

  Returns:
    The weights [T], in the dtype of ``task_losses``.
  """
  losses = task_losses
  # ‖L‖ as m ‖L / m‖ (m = max |L_k|): no overflow or underflow of L².
  # At L = 0 every quotient below is 0 (solvers.safe_divide): no penalty.
  largest = jnp.max(jnp.abs(losses))
  unit = solvers.safe_divide(losses, largest)  # L / m, of norm in [1, √T].
  unit_norm = jnp.sqrt(jnp.sum(unit**2))
  preference_norm = jnp.sqrt(jnp.sum(preference**2))
  cosine = solvers.safe_divide(jnp.sum(preference * unit),
                               preference_norm * unit_norm)
  # ∂ cos(r, L) / ∂L = (r / ‖r‖ − cos · L / ‖L‖) / ‖L‖.
  direction = (preference / preference_norm
               - solvers.safe_divide(cosine * unit, unit_norm))
  cosine_gradient = solvers.safe_divide(direction, unit_norm * largest)
  return preference - jnp.asarray(penalty, losses.dtype) * cosine_gradient


def cosmos(
    num_tasks: int,
    penalty: float = 1.0,
    preference: Optional[Sequence[float]] = None,
) -> base.MultiTaskStrategy:
  r"""COSMOS: the linear scalarization with a cosine penalty (its gradient).

  Ruchte & Grabocka (2021) train on the preference-weighted sum of the
  losses minus a penalty on the angle between the preference ``r`` and the
  loss vector ``L``:

  .. math::
    f(L) = r^\top L - \lambda \cos(r, L)
         = r^\top L - \lambda \frac{r^\top L}{\lVert r \rVert\,
           \lVert L \rVert}.

  The penalty pulls the losses towards the ray of ``r``, so that training
  with preference ``r`` lands on the part of the Pareto front that ``r``
  points at. The step is one backward pass: the weights are the gradient
  of ``f`` with respect to the losses, held constant (stop-gradient),

  .. math::
    w = \frac{\partial f}{\partial L}
      = r - \frac{\lambda}{\lVert L \rVert}\Bigl(\frac{r}{\lVert r \rVert}
        - \cos(r, L)\,\frac{L}{\lVert L \rVert}\Bigr),

  so that ``Σ_k w_k ∇L_k = ∇f``. With every loss zero the cosine is not
  defined and its term is dropped (``w = r``). The cosine term is scaled
  by ``1/‖L‖``: it weighs more as the losses shrink.

  In the paper ``r`` is drawn from a Dirichlet distribution at every batch
  and also fed to the network (one model for the whole front); here ``r``
  is fixed per strategy, as in a preference-conditioned run at one ``r``.
  The paper tunes ``λ`` per data set; ``penalty = 1`` is a neutral default.

  A step with a non-finite loss is counted in ``num_skipped`` and the
  previous weights are applied again; zero and negative losses are fine.

  Args:
    num_tasks: the number of tasks T.
    penalty: ``λ >= 0``, the weight of the cosine penalty (0: the linear
      scalarization ``rᵀL``).
    preference: ``r``, T non-negative numbers, not all zero; None for
      ``1/T`` each.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.cosmos(num_tasks=2, penalty=1.0,
    ...                             preference=[0.5, 0.5])
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> _, state = strategy.update(  # L ∥ r: the cosine is at its maximum.
    ...     task_grads, strategy.init(None), task_losses=jnp.array([2.0, 2.0]))
    >>> [round(w, 4) for w in state.weights.tolist()]
    [0.5, 0.5]
    >>> _, state = strategy.update(  # L = (3, 4): w = r − (r/‖r‖ − ...)/5.
    ...     task_grads, state, task_losses=jnp.array([3.0, 4.0]))
    >>> [round(w, 4) for w in state.weights.tolist()]
    [0.4774, 0.517]

  References:
    Ruchte & Grabocka, `Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning <https://arxiv.org/abs/2103.13392>`_, ICDM 2021.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  penalty = base.check_in_range("penalty", penalty, 0.0)
  if preference is None:
    preference_values = np.full((num_tasks,), 1.0 / num_tasks, np.float32)
  else:
    # pylint: disable-next=protected-access
    preference_values = _stch._check_preference(preference, num_tasks)

  def init():
    return CosmosState(**base.common_state_fields(
        num_tasks, jnp.asarray(preference_values, jnp.float32)))

  def rule(task_losses, state, gramian):
    del gramian
    return cosmos_weights(
        task_losses, jnp.asarray(preference_values, task_losses.dtype),
        penalty), state

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=False))
