"""The seeds of the stochastic strategies (rlw, pcgrad).

What is guaranteed: every 64-bit seed (and only those) is accepted, NumPy
integers are the same seeds as Python ones, two seeds give two streams even
when they share their low 32 bits, and the runs of a seed sweep under
``jax.vmap`` draw exactly what each run draws alone (a rejected step draws
nothing).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl

NUM_TASKS = 3
NAN = float("nan")
SEEDS = [0, 1, 2**40, -5]


def stack(states):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


@pytest.mark.parametrize("name", ["rlw", "pcgrad"])
def test_vmapped_runs_equal_sequential_runs(name):
  """Each run of a vmapped seed sweep draws its own stream, the one it
  draws when run alone; a rejected step (run 2, step 1) draws nothing."""
  seeded = [getattr(optax_mtl, name)(NUM_TASKS, seed=s) for s in SEEDS]
  num_steps = 4
  jacobians = jnp.asarray(
      np.random.default_rng(3).normal(size=(num_steps, NUM_TASKS, 4)),
      jnp.float32)
  losses = np.ones((num_steps, len(SEEDS), NUM_TASKS), np.float32)
  losses[1, 2, 0] = NAN
  update = jax.jit(seeded[0].update)

  sequential = []
  for run, strategy in enumerate(seeded):
    state, weights = strategy.init(None), []
    for step in range(num_steps):
      _, state = update(jacobians[step], state, task_losses=losses[step, run])
      weights.append(state.weights)
    sequential.append(weights)
  sequential = np.asarray(sequential).transpose(1, 0, 2)  # [step, run, T].

  batched_update = jax.jit(jax.vmap(
      lambda state, task_losses, grads: seeded[0].update(
          grads, state, task_losses=task_losses),
      in_axes=(0, 0, None)))
  state = stack([strategy.init(None) for strategy in seeded])
  for step in range(num_steps):
    _, state = batched_update(state, losses[step], jacobians[step])
    np.testing.assert_allclose(state.weights, sequential[step], rtol=1e-6)
  # The runs differ from one another (rlw: at every step).
  if name == "rlw":
    for step in range(num_steps):
      assert len({tuple(np.round(w, 6)) for w in sequential[step]}) == len(
          SEEDS)
  np.testing.assert_array_equal(np.asarray(state.num_skipped), [0, 0, 1, 0])


@pytest.mark.parametrize("name", ["rlw", "pcgrad"])
@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 2**70, 1.5, "0", True,
                                  np.float64(3.0)])
def test_out_of_range_seed_is_rejected_at_construction(name, seed):
  """A seed outside [-2**63, 2**64) or not an integer raises a ValueError
  naming ``seed`` when the strategy is built, not later in ``init``."""
  with pytest.raises(ValueError, match="seed"):
    getattr(optax_mtl, name)(NUM_TASKS, seed=seed)


@pytest.mark.parametrize("name", ["rlw", "pcgrad"])
def test_every_64_bit_seed_gives_its_own_stream(name):
  """Seeds that agree in their low 32 bits draw different streams; NumPy
  seeds are Python seeds."""
  keys = {}
  for seed in (0, 2**32, 2**40, 2**64 - 1, -1, np.int64(2**40),
               np.uint64(2**64 - 1)):
    state = getattr(optax_mtl, name)(NUM_TASKS, seed=seed).init(None)
    keys.setdefault(int(seed) % 2**64, set()).add(
        tuple(np.asarray(state.key).tolist()))
  assert all(len(values) == 1 for values in keys.values())
  assert len({next(iter(values)) for values in keys.values()}) == len(keys)

