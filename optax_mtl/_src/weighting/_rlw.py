"""Random loss weighting (RLW): fresh softmax-normal weights every step."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step



class RlwState(NamedTuple):
  """State of :func:`rlw`."""

  weights: chex.Array  # f32[T], the weights applied last (they sum to 1).
  num_skipped: chex.Array  # i32[], steps with a non-finite loss.
  # u32[2], the raw data (jax.random.key_data) of a Threefry key, split
  # once per accepted step.
  key: chex.Array


@deprecation.renamed_arguments(old_positional=("num_tasks", "seed"))
def rlw(num_tasks: int, *, seed: int = 0) -> base.MultiTaskStrategy:
  r"""Random loss weighting: weights drawn afresh at every step.

  .. math::
    w = \operatorname{softmax}(z), \qquad z \sim \mathcal{N}(0, I_T),

  a new ``z`` at every step, so the weights are positive and sum to 1 (their
  mean over steps is ``1/T`` for every task).

  The state holds a ``jax.random`` Threefry key as raw data (``key``,
  uint32[2], ``jax.random.key_data`` of the key of ``seed``), as the other
  strategies that draw random numbers do. An accepted step splits it,
  ``key, draw = jax.random.split(key)``, and draws
  ``z = jax.random.normal(draw, (T,))`` (finite: ``|z| < 5.5``). So the runs
  of an ensemble under ``jax.vmap`` (one seed each) draw exactly what they
  draw one by one.

  A step with a non-finite loss is counted in ``num_skipped`` and changes
  nothing else: the key is *not* split (the next accepted step draws the
  ``z`` this step would have drawn) and the previous weights are applied
  (``1/T`` before the first accepted step). The losses' values are never
  read, so zero or negative losses are accepted.

  Args:
    num_tasks: the number of tasks T.
    seed: the integer seed of the stream, in [-2**63, 2**64).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.rlw(num_tasks=3, seed=0)
    >>> update, state = strategy.update(
    ...     jnp.eye(3), strategy.init(None), task_losses=jnp.ones(3))
    >>> round(float(update.sum()), 5), bool((update > 0).all())
    (1.0, True)

  References:
    Lin et al., `Reasonable Effectiveness of Random Weighting: A Litmus Test
    for Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  key_data = base.key_data_from_seed("seed", seed)

  def init():
    return RlwState(**base.common_state_fields(num_tasks, 1.0 / num_tasks),
                    key=jnp.asarray(key_data))

  def rule(task_losses, state, gramian):
    del task_losses, gramian
    key, draw_key = base.split_key(state.key)
    weights = jax.nn.softmax(jax.random.normal(draw_key, (num_tasks,)))
    return weights, state._replace(key=key)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=False))
