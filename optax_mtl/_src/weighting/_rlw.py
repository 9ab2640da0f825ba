"""Random loss weighting (RLW): fresh softmax-normal weights every step."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import step

# XLA's counter-based generator behind jax.lax.rng_bit_generator, named so
# that the stream does not depend on the backend's default algorithm.
ALGORITHM = jax.lax.RandomAlgorithm.RNG_THREE_FRY
# A draw keeps the top 23 bits of each 32-bit word: 2**23 equal bins of the
# unit interval, whose midpoints are mapped through the normal quantile.
_DROPPED_BITS = 9
_NUM_BINS = 2**23


class RlwState(NamedTuple):
  """State of :func:`rlw`."""

  weights: chex.Array  # f32[T], the weights applied last (they sum to 1).
  num_skipped: chex.Array  # i32[], steps with a non-finite loss.
  # u32[4], the generator state: the 64-bit seed (low word first), then the
  # 64-bit counter of 64-bit blocks drawn so far.
  key: chex.Array


def generator_state(seed: int) -> np.ndarray:
  """The initial ``RlwState.key`` of a seed in [-2**63, 2**64)."""
  if not -2**63 <= seed < 2**64:
    raise ValueError(f"seed must fit in a 64-bit integer, got {seed!r}.")
  seed %= 2**64
  return np.array([seed & 0xFFFFFFFF, seed >> 32, 0, 0], np.uint32)


def standard_normal(bits: chex.Array) -> chex.Array:
  """``z = Φ⁻¹((k + ½) / 2²³)`` with ``k`` the top 23 bits of each word."""
  bins = (bits >> _DROPPED_BITS).astype(jnp.float32)
  return jax.scipy.special.ndtri((bins + 0.5) / _NUM_BINS)


def rlw(num_tasks: int, seed: int = 0) -> base.MultiTaskStrategy:
  r"""Random loss weighting: weights drawn afresh at every step.

  .. math::
    w = \operatorname{softmax}(z), \qquad z \sim \mathcal{N}(0, I_T),

  a new ``z`` at every step, so the weights are positive and sum to 1 (their
  mean over steps is ``1/T`` for every task).

  The draws come from one stream of XLA's counter-based Threefry generator
  (``jax.lax.rng_bit_generator`` with ``RNG_THREE_FRY``), whose state
  ``key`` (uint32[4]: the seed, then a counter) the strategy holds. An
  accepted step draws T 32-bit words, ``key, bits =
  rng_bit_generator(key, (T,), uint32)``, which advances the counter past
  them, and maps each word to a standard normal through the quantile at the
  midpoint of one of 2²³ equal bins, ``z = Φ⁻¹((⌊bits / 2⁹⌋ + ½) / 2²³)``
  (finite, ``|z| < 5.3``). One generator call per step: ``jax.random.split``
  then ``jax.random.normal`` would evaluate Threefry twice, which XLA:CPU
  compiles into two loops inside the training step.

  A step with a non-finite loss is counted in ``num_skipped`` and changes
  nothing else: the counter does *not* advance (the next accepted step draws
  the ``z`` this step would have drawn) and the previous weights are applied
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
    Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test
    for Multi-Task Learning", TMLR 2022.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed must be an integer, got {seed!r}.")
  initial_key = generator_state(seed)

  def init():
    return RlwState(**base.common_state_fields(num_tasks, 1.0 / num_tasks),
                    key=jnp.asarray(initial_key))

  def rule(task_losses, state, gramian):
    del task_losses, gramian
    next_key, bits = jax.lax.rng_bit_generator(
        state.key, (num_tasks,), jnp.uint32, algorithm=ALGORITHM)
    weights = jax.nn.softmax(standard_normal(bits))
    return weights, state._replace(key=next_key)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=False))
