"""ConFIG: the conflict-free direction with equal cosines to every task."""

from typing import NamedTuple, Optional, Sequence

import chex
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import solvers
from optax_mtl._src import step


class ConfigState(NamedTuple):
  """State of :func:`config`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.


def config_weights(gramian: chex.Array,
                   preference: chex.Array) -> chex.Array:
  """The ConFIG weights ``w`` (``d = Σ w_k g_k``) from the Gramian.

  With ``u_k = g_k/‖g_k‖`` and ``C = U Uᵀ`` (the cosines), the least-norm
  ``v`` with ``U v = p`` is ``v = Uᵀ C⁺ p``; ``d = (Σ_k g_kᵀ v̂) v̂`` with
  ``v̂ = v/‖v‖``. A zero gradient is left out; eigenvalues of ``C`` at its
  round-off are dropped from the pseudo-inverse.
  """
  num_tasks = gramian.shape[0]
  dtype = gramian.dtype
  gramian = 0.5 * (gramian + gramian.T)
  norms = solvers.gradient_norms(gramian)
  active = norms > solvers.resolve_cutoff(dtype, num_tasks, jnp.max(norms))
  inverse_norms = solvers.safe_divide(1.0, jnp.where(active, norms, 0))
  cosines = inverse_norms[:, None] * gramian * inverse_norms[None, :]
  eigenvalues, eigenvectors = jnp.linalg.eigh(cosines)
  kept = eigenvalues > solvers.resolve_cutoff(dtype, num_tasks,
                                              jnp.max(eigenvalues))
  inverse = solvers.safe_divide(1.0, jnp.where(kept, eigenvalues, 0))
  preference = jnp.where(active, preference.astype(dtype), 0)
  coefficients = eigenvectors @ (inverse * (eigenvectors.T @ preference))
  # v = Σ_k a_k g_k with a_k = coefficients_k / ‖g_k‖.
  direction = coefficients * inverse_norms
  squared_length = direction @ gramian @ direction
  length = jnp.sqrt(jnp.maximum(squared_length, 0))
  unit = solvers.safe_divide(direction, length)
  projection = jnp.sum(gramian @ unit)  # Σ_k g_kᵀ v̂.
  return projection * unit


def config(num_tasks: int,
           preference: Optional[Sequence[float]] = None
           ) -> base.MultiTaskStrategy:
  r"""ConFIG: the direction whose cosine with every task gradient is equal.

  With :math:`u_k = g_k / \lVert g_k \rVert` the unit task gradients (rows
  of :math:`U`) and :math:`p` a preference vector (ones by default),

  .. math::
    v = U^{+} p \;(\text{the least-norm } v \text{ with } U v = p), \qquad
    \hat v = v / \lVert v \rVert, \qquad
    d = \Bigl(\sum_k g_k^\top \hat v\Bigr)\, \hat v.

  With :math:`p = \mathbf 1` and linearly independent task gradients,
  :math:`d` makes the same (acute) angle with every task gradient, and its
  length is the sum of the gradients' projections on it. With more tasks
  than independent directions, :math:`v` is the least-squares solution and
  the cosines are no longer equal (nor always positive). Computed from the Gramian: :math:`v = \sum_k (C^{+} p)_k\, u_k` with
  :math:`C = U U^\top` the cosine matrix, so only the final combination
  touches the parameters. A zero gradient is left out. The update scales
  with the gradients (linear under scaling).

  Steps with a non-finite loss or Gramian are counted in ``num_skipped`` and
  the previous weights applied; zero and negative losses are ordinary
  values.

  Args:
    num_tasks: the number of tasks T.
    preference: p, T positive numbers (None: ones), as torchjd's
      ``pref_vector``.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.config(num_tasks=2)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    >>> update, _ = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(u, 4) for u in update.tolist()]  # Along (1, 1), length 4/√2.
    [2.0, 2.0]

  References:
    Liu, Chu, Thuerey, `ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025;
    torchjd's ``ConFIG``.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  if preference is None:
    preference_values = np.ones((num_tasks,), np.float32)
  else:
    preference_values = base.check_task_vector(
        "preference", preference, num_tasks, 0.0, low_inclusive=False,
        allow_scalar=False)
    if isinstance(preference_values, np.ndarray):
      # Checked; kept in float64 (cast to the Gramian's dtype by the rule).
      preference_values = np.asarray(preference, np.float64)

  def init():
    return ConfigState(**base.common_state_fields(
        num_tasks, gramian=True, gradients=True))

  def rule(task_losses, state, gramian):
    del task_losses
    # The preference in the Gramian's dtype (float64 under x64).
    return config_weights(gramian, jnp.asarray(preference_values,
                                               gramian.dtype)), state

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False, gramian_degree=0))
