"""IMTL-G: the update with equal projections on every unit task gradient."""

from typing import NamedTuple

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import step


class ImtlGState(NamedTuple):
  """State of :func:`imtl_g`."""

  weights: chex.Array  # f32[T], the weights applied last (α, Σ α = 1).
  num_skipped: chex.Array  # i32[], rejected steps.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.


def _imtl_g_weights(gramian: chex.Array, eps: float) -> chex.Array:
  """The IMTL-G weights α from the Gramian alone (any float dtype).

  The anchor (the paper's task 1) is the task with the largest gradient
  norm; tasks with a gradient norm at or below ``eps`` times the largest get
  α = 0 and no constraint. Rank deficiency is handled by the pseudo-inverse.
  """
  num_tasks = gramian.shape[0]
  dtype = gramian.dtype
  norms = jnp.sqrt(jnp.clip(jnp.diag(gramian), min=0.0))
  max_norm = jnp.max(norms)
  active = (norms > eps * max_norm) & (norms > 0)
  inv_norms = jnp.where(active, 1.0 / jnp.where(active, norms, 1.0), 0.0)
  anchor = jnp.argmax(norms)
  # Put the anchor first: the tasks in the order [anchor, the others...].
  order = jnp.argsort(jnp.where(jnp.arange(num_tasks) == anchor, -1,
                                jnp.arange(num_tasks)))
  gram = gramian[order][:, order]
  inv_norms = inv_norms[order]
  active = active[order]
  # C (T-1, T): row k is e_1 - e_{k+2}, so that D = C J and U = C N J with
  # N = diag(1/‖g_i‖). Then D Uᵀ = C G N Cᵀ and g_1 Uᵀ = e_1ᵀ G N Cᵀ.
  differences = jnp.concatenate(
      [jnp.ones((num_tasks - 1, 1), dtype), -jnp.eye(num_tasks - 1, dtype=dtype)],
      axis=1)
  gram_n = gram * inv_norms[None, :]  # G N.
  d_ut = differences @ gram_n @ differences.T  # D Uᵀ, (T-1, T-1).
  g1_ut = gram_n[0] @ differences.T  # g_1 Uᵀ, (T-1,).
  # α_{2:T} (D Uᵀ) = g_1 Uᵀ  <=>  (D Uᵀ)ᵀ α_{2:T}ᵀ = (g_1 Uᵀ)ᵀ. Column k of
  # D Uᵀ is the constraint (g_1 - g_{k+2}) · u-difference of task k+2; an
  # inactive task's constraint is replaced by α_k = 0.
  rest_active = active[1:]
  # The identity rows are scaled like the system, so that they do not move
  # the relative cut-off of the pseudo-inverse.
  scale = jnp.max(jnp.abs(d_ut))
  scale = jnp.where(scale > 0, scale, 1.0)
  system = jnp.where(rest_active[:, None], d_ut.T,
                     scale * jnp.eye(num_tasks - 1, dtype=dtype))
  system = jnp.where(rest_active[None, :] | ~rest_active[:, None], system,
                     0.0)
  rhs = jnp.where(rest_active, g1_ut, 0.0)
  # Singular values below 10 T ε of the largest are rounding noise (e.g.
  # duplicated gradients give an exactly singular system).
  rtol = 10 * num_tasks * jnp.finfo(dtype).eps
  rest = jnp.linalg.pinv(system, rtol=rtol) @ rhs
  rest = jnp.where(rest_active, rest, 0.0)
  alpha = jnp.concatenate([(1.0 - jnp.sum(rest))[None], rest])
  alpha = jnp.where(max_norm > 0, alpha, jnp.zeros_like(alpha))
  # Back to the original task order.
  return jnp.zeros_like(alpha).at[order].set(alpha)


def imtl_g(
    num_tasks: int,
    *,
    eps: float = 1e-8,
) -> base.MultiTaskStrategy:
  r"""IMTL-G: the update whose projections on all unit gradients are equal.

  With :math:`u_i = g_i / \lVert g_i \rVert`,
  :math:`D = [g_1 - g_2, \dots, g_1 - g_T]` and
  :math:`U = [u_1 - u_2, \dots, u_1 - u_T]` (rows),

  .. math::
    \alpha_{2:T} = g_1 U^\top (D U^\top)^{-1}, \qquad
    \alpha_1 = 1 - \sum_{i=2}^{T} \alpha_i, \qquad
    d = \sum_{i=1}^{T} \alpha_i g_i,

  so that :math:`d \cdot u_i` is the same for every task. Everything is
  computed from the Gramian: :math:`D U^\top = C G N C^\top` and
  :math:`g_1 U^\top = e_1^\top G N C^\top` with :math:`N =
  \operatorname{diag}(1/\sqrt{G_{ii}})` and :math:`C` the difference matrix.

  The solution does not depend on which task plays "task 1" when
  :math:`D U^\top` is invertible; the task with the largest gradient norm is
  used. A rank-deficient :math:`D U^\top` (e.g. duplicated gradients) is
  solved with the pseudo-inverse (the least-norm :math:`\alpha_{2:T}`). A
  task whose gradient norm is at most ``eps`` times the largest has no
  direction: it gets :math:`\alpha_i = 0` and the others are balanced among
  themselves; all-zero gradients give :math:`\alpha = 0`.

  A step with a non-finite loss or Gramian is counted in ``num_skipped``;
  the previous weights are applied.

  Args:
    num_tasks: the number of tasks T.
    eps: relative threshold below which a gradient counts as zero.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.imtl_g(num_tasks=2)
    >>> task_grads = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(w, 4) for w in state.weights.tolist()]
    [0.3333, 0.6667]
    >>> [round(u, 4) for u in update.tolist()]
    [0.6667, 0.6667]

  References:
    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  eps = base.check_in_range("eps", eps, 0.0, 1.0, high_inclusive=False)

  def init():
    return ImtlGState(**base.common_state_fields(
        num_tasks, 1.0 / num_tasks, gramian=True))

  def rule(task_losses, state, gramian):
    del task_losses
    if num_tasks == 1:
      return jnp.ones((1,), jnp.float32), state
    return _imtl_g_weights(gramian, eps), state

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False))
