"""Random loss weighting (RLW): fresh softmax-normal weights every step."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src import base

# The PRNG implementation whose raw key data (uint32[2]) the state holds;
# fixed so that the state's shape does not depend on jax_default_prng_impl.
PRNG_IMPL = "threefry2x32"


class RlwState(NamedTuple):
  """State of :func:`rlw`."""

  weights: chex.Array  # f32[T], the weights applied last (they sum to 1).
  num_skipped: chex.Array  # i32[], steps with a non-finite loss.
  key: chex.Array  # u32[2], raw threefry2x32 key data for the next draw.


def rlw(num_tasks: int, seed: int = 0) -> base.MultiTaskStrategy:
  r"""Random loss weighting: weights drawn afresh at every step.

  .. math::
    w = \operatorname{softmax}(z), \qquad z \sim \mathcal{N}(0, I_T),

  a new ``z`` at every step, so the weights are positive and sum to 1 (their
  mean over steps is ``1/T`` for every task).

  The state holds the raw key data of a ``threefry2x32`` PRNG key. An
  accepted step splits it into the key of the next step and the key of this
  step's draw, ``key, subkey = jax.random.split(key)`` and
  ``z = jax.random.normal(subkey, (T,))``. A step with a non-finite loss is
  counted in ``num_skipped`` and changes nothing else: the key does *not*
  advance (the next accepted step draws the ``z`` this step would have
  drawn) and the previous weights are applied (``1/T`` before the first
  accepted step). The losses' values are never read, so zero or negative
  losses are accepted.

  Args:
    num_tasks: the number of tasks T.
    seed: the integer seed of the PRNG key.

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
    Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test
    for Multi-Task Learning", TMLR 2022.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed must be an integer, got {seed!r}.")
  try:
    key_data = jax.random.key_data(jax.random.key(seed, impl=PRNG_IMPL))
  except (OverflowError, ValueError) as error:
    raise ValueError(
        f"seed must fit in a 64-bit integer, got {seed!r}.") from error

  def init():
    return RlwState(**base.convention_fields(num_tasks, 1.0 / num_tasks),
                    key=key_data)

  def rule(task_losses, state, gramian):
    del task_losses, gramian
    key = jax.random.wrap_key_data(state.key, impl=PRNG_IMPL)
    next_key, draw_key = jax.random.split(key)
    logits = jax.random.normal(draw_key, (num_tasks,), jnp.float32)
    weights = jax.nn.softmax(logits)
    return weights, state._replace(key=jax.random.key_data(next_key))

  return base.lift(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=False))
