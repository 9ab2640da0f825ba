"""optax_mtl.diagnostics of a batched state.

An ensemble or seed sweep run under ``jax.vmap`` has states whose fields
carry a leading run axis. ``diagnostics`` of such a state never reads the
number of runs as the number of tasks (mislabelled keys, values that are not
scalars): it raises a ValueError that says to vmap it, and
``jax.vmap(optax_mtl.diagnostics)`` gives, under the keys of one run, one
value per run: the value ``diagnostics`` gives for that run alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl

NUM_TASKS = 3
NUM_RUNS = 4
NUM_PARAMS = 5

# Runs with their own losses and gradients, so their statistics differ.
_RNG = np.random.default_rng(0)
TASK_GRADS = jnp.asarray(_RNG.normal(size=(2, NUM_RUNS, NUM_TASKS,
                                           NUM_PARAMS)), jnp.float32)
TASK_LOSSES = jnp.asarray(_RNG.uniform(0.5, 2.0, (2, NUM_RUNS, NUM_TASKS)),
                          jnp.float32)

CASES = {
    # A Gramian strategy (cosines, gradnorm_loss) inside an optax chain.
    "gradnorm-chain": lambda: optax.chain(optax_mtl.gradnorm(NUM_TASKS),
                                          optax.adam(1e-2)),
    # A wrapper state around a loss strategy with nested statistics.
    "ema-recompute": lambda: optax_mtl.recompute_every(
        optax_mtl.loss_ema(NUM_TASKS), 2),
    # A state with a PRNG key (one seed per run), and a solver strategy.
    "rlw": lambda seed=0: optax_mtl.rlw(NUM_TASKS, seed=seed),
    "mgda": lambda: optax_mtl.mgda(NUM_TASKS),
}


def ensemble_state(factory):
  """The state of NUM_RUNS runs after two vmapped steps (run axis first)."""
  tx = factory()
  params = jnp.zeros((NUM_RUNS, NUM_PARAMS))
  if factory is CASES["rlw"]:  # One seed per run.
    runs = [factory(seed).init(None) for seed in range(NUM_RUNS)]
    state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *runs)
  else:
    state = jax.vmap(tx.init)(params)
  step = jax.jit(jax.vmap(
      lambda grads, state, params, losses: tx.update(
          grads, state, params, task_losses=losses)))
  for grads, losses in zip(TASK_GRADS, TASK_LOSSES):
    _, state = step(grads, state, params, losses)
  return state


def run_state(state, run):
  return jax.tree.map(lambda leaf: leaf[run], state)


def strategy_state(state):
  """The strategy's own state: out of an optax chain's tuple, and out of a
  recompute_every wrapper's ``inner_state``."""
  state = state[0] if isinstance(state, tuple) and not hasattr(
      state, "_fields") else state
  return getattr(state, "inner_state", state)


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_state_raises_and_says_to_vmap(case):
  state = ensemble_state(CASES[case])
  with pytest.raises(ValueError, match=r"jax\.vmap\(optax_mtl\.diagnostics\)"):
    optax_mtl.diagnostics(state)


@pytest.mark.parametrize("case", sorted(CASES))
def test_vmapped_diagnostics_give_each_run_its_own_values(case):
  state = ensemble_state(CASES[case])
  names = ["depth", "seg", "normals"]
  batched = jax.jit(jax.vmap(
      lambda s: optax_mtl.diagnostics(s, task_names=names)))(state)
  runs = [optax_mtl.diagnostics(run_state(state, run), task_names=names)
          for run in range(NUM_RUNS)]
  assert sorted(batched) == sorted(runs[0])
  for key, values in batched.items():
    assert values.shape == (NUM_RUNS,), key
    for run in range(NUM_RUNS):
      np.testing.assert_array_equal(values[run], runs[run][key], err_msg=key)
  # Labelled by task, not by run: the weights of run r, task k.
  weights = np.asarray(strategy_state(state).weights)
  assert weights.shape == (NUM_RUNS, NUM_TASKS)
  for index, name in enumerate(names):
    np.testing.assert_array_equal(batched[f"mtl/weights/{name}"],
                                  weights[:, index])
  assert not any(key.startswith(f"mtl/weights/{run}")
                 for key in batched for run in range(NUM_RUNS))
  # The runs saw different losses: their weights differ.
  if case != "ema-recompute":
    assert len({tuple(row) for row in weights.round(6)}) == NUM_RUNS


def test_gradient_cosines_of_each_run():
  state = ensemble_state(CASES["gradnorm-chain"])
  logs = jax.vmap(optax_mtl.diagnostics)(state)
  for run in range(NUM_RUNS):
    grads = np.asarray(TASK_GRADS[-1, run], np.float64)
    norms = np.linalg.norm(grads, axis=1)
    cosines = grads @ grads.T / np.outer(norms, norms)
    for i, j in ((0, 1), (0, 2), (1, 2)):
      np.testing.assert_allclose(logs[f"mtl/gradient_cosines/{i}_{j}"][run],
                                 cosines[i, j], rtol=1e-5, atol=1e-6)
