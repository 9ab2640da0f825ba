r"""The projection loop of PCGrad and GradVac, on the Gramian.

Every modified gradient :math:`g'_i = \sum_k C_{ik} g_k` stays in the span
of the task gradients, so the loop tracks the coefficient rows
:math:`C_{i\cdot}` and reads the gradients only through
:math:`G = J J^\top`. PCGrad is GradVac with the target cosine 0.
"""

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src import solvers


def random_orders(key: chex.Array, num_tasks: int) -> chex.Array:
  """One independent random permutation of the tasks per task (i32[T, T]).

  Row i is the order in which task i visits the others (the entry equal to
  i is skipped).
  """
  keys = jax.random.split(key, num_tasks)
  return jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(keys)


def surgery_coefficients(
    gramian: chex.Array,
    targets: chex.Array,
    orders: chex.Array,
    beta: float,
    fixed_target: Optional[float] = None,
) -> tuple[chex.Array, chex.Array]:
  r"""The coefficients ``C`` of GradVac's (or PCGrad's) modified gradients.

  Every task i starts from :math:`g'_i = g_i` and visits the others j in
  the order of row i of ``orders``; with :math:`\phi = \cos(g'_i, g_j)` and
  the target :math:`\hat\phi`, where :math:`\phi < \hat\phi`,

  .. math::
    g'_i \leftarrow g'_i - \frac{g'_i \cdot g_j}{\lVert g_j \rVert^2} g_j
      + \frac{\lVert g'_i \rVert \hat\phi \sqrt{1 - \phi^2}}
             {\lVert g_j \rVert \sqrt{1 - \hat\phi^2}} g_j,

  which is GradVac's step (Wang et al. 2021, Algorithm 1) written so that
  at :math:`\hat\phi = 0` it is PCGrad's projection, computed by the same
  operations (the second term is exactly 0). The tasks visit their
  ``position``-th other task at the same time (their rows are independent).
  A zero gradient :math:`g_j` is never projected onto.

  Args:
    gramian: [T, T], ``G = J Jᵀ``.
    targets: [T, T], the moving target cosines before this step.
    orders: i32[T, T], row i a permutation of 0..T-1.
    beta: the moving average's weight of the newest cosine,
      :math:`\hat\phi_{ij} \leftarrow (1 - \beta)\hat\phi_{ij} + \beta\phi`.
    fixed_target: a constant target cosine instead of ``targets`` (the
      targets are still averaged), or None.

  Returns:
    ``(C [T, T], new targets [T, T])``: the update is ``Σ_i C_i· J``, so
    the weights are the column sums of ``C``.
  """
  num_tasks = gramian.shape[0]
  dtype = gramian.dtype
  task_ids = jnp.arange(num_tasks)
  squared_norms = jnp.diagonal(gramian)
  norms = solvers.gradient_norms(gramian)

  def visit(position, carry):
    coefficients, targets = carry
    other = orders[:, position]  # i32[T]: the task each row visits now.
    # (g'_i · g_other) = C_i G e_other, for every i at once.
    dots = jnp.sum(coefficients * gramian[:, other].T, axis=1)
    row_norms = jnp.sqrt(jnp.maximum(jnp.sum(jnp.matmul(
        coefficients, gramian, precision=jax.lax.Precision.HIGHEST)
                                             * coefficients, axis=1), 0))
    target = (targets[task_ids, other] if fixed_target is None
              else jnp.asarray(fixed_target, dtype))
    valid = (other != task_ids) & (squared_norms[other] > 0)
    project = valid & (dots < target * row_norms * norms[other])
    cosines = solvers.safe_divide(dots, row_norms * norms[other])
    root = jnp.sqrt(jnp.maximum(1 - target**2, 0))
    vaccine = solvers.safe_divide(
        row_norms * target * jnp.sqrt(jnp.maximum(1 - cosines**2, 0)),
        norms[other] * root)
    step = jnp.where(project, -solvers.safe_divide(
        dots, squared_norms[other]) + vaccine, 0)
    averaged = (1 - beta) * targets[task_ids, other] + beta * cosines
    moved = valid & (row_norms > 0)
    return (coefficients.at[task_ids, other].add(step),
            targets.at[task_ids, other].set(
                jnp.where(moved, averaged, targets[task_ids, other])))

  return jax.lax.fori_loop(
      0, num_tasks, visit,
      (jnp.eye(num_tasks, dtype=dtype), targets.astype(dtype)))
