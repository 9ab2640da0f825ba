"""Orbax checkpoints: an interrupted and resumed run equals an uninterrupted one.

For every strategy (discovered at run time) a tiny multi-task model is trained
through the optax face, ``optax.chain(strategy, optax.adam)``, for
``NUM_STEPS`` steps without interruption, and again for ``RESUME_AT`` steps,
saved with Orbax, restored against an abstract target built from a fresh
``init`` (so the NamedTuple states come back as themselves), and resumed. The
parameters, losses and weights must be bitwise equal. All strategies share
one checkpoint, so Orbax is called once; each strategy compiles one step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_mtl
from tests import strategy_cases

NUM_TASKS = strategy_cases.NUM_TASKS
NUM_STEPS = 6
RESUME_AT = 3
CASES = list(strategy_cases.strategy_cases(NUM_TASKS))
IDS = [name for name, _ in CASES]

_BATCHES = jax.random.normal(jax.random.key(0), (NUM_STEPS, 8, 4))
_TARGETS = jnp.sin(_BATCHES @ jnp.arange(1.0, 1.0 + 4 * NUM_TASKS).reshape(
    4, NUM_TASKS))


def init_params(seed=1):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {"trunk": 0.5 * jax.random.normal(keys[0], (4, 5)),
          "heads": 0.5 * jax.random.normal(keys[1], (5, NUM_TASKS))}


def task_losses_fn(params, inputs, targets):
  predictions = jnp.tanh(inputs @ params["trunk"]) @ params["heads"]
  return jnp.mean((predictions - targets) ** 2, axis=0) + 0.01


def make_step(tx):
  """One jitted optax-face step; the strategy is the chain's first link."""

  @jax.jit
  def step(params, opt_state, inputs, targets):
    task_grads, losses = jax.jacrev(
        lambda p: (task_losses_fn(p, inputs, targets),) * 2,
        has_aux=True)(params)
    updates, opt_state = tx.update(task_grads, opt_state, params,
                                   task_losses=losses)
    return optax.apply_updates(params, updates), opt_state, losses

  return step


def run(step, params, opt_state, first, last):
  losses, weights = [], []
  for index in range(first, last):
    params, opt_state, step_losses = step(params, opt_state, _BATCHES[index],
                                          _TARGETS[index])
    losses.append(step_losses)
    weights.append(opt_state[0].weights)
  return params, opt_state, losses, weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Per strategy: the uninterrupted run and the saved-restored-resumed one."""
  results, interrupted, fresh_targets, steps = {}, {}, {}, {}
  for name, factory in CASES:
    tx = optax.chain(factory(), optax.adam(1e-2))
    steps[name] = make_step(tx)
    params = init_params()
    results[name] = {"uninterrupted": run(steps[name], params, tx.init(params),
                                          0, NUM_STEPS)}
    params, opt_state, losses, weights = run(steps[name], params,
                                             tx.init(params), 0, RESUME_AT)
    results[name]["before"] = (losses, weights)
    interrupted[name] = {"params": params, "opt_state": opt_state}
    # What a fresh process builds before restoring: a new init.
    fresh_params = init_params(seed=2)
    fresh_targets[name] = {"params": fresh_params,
                           "opt_state": tx.init(fresh_params)}

  directory = tmp_path_factory.mktemp("checkpoints") / f"step_{RESUME_AT}"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, interrupted)
  checkpointer.wait_until_finished()
  del interrupted
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh_targets)
  restored = checkpointer.restore(directory, abstract)
  checkpointer.close()

  for name, _ in CASES:
    params, opt_state = restored[name]["params"], restored[name]["opt_state"]
    results[name]["restored"] = (opt_state, fresh_targets[name]["opt_state"])
    results[name]["resumed"] = run(steps[name], params, opt_state, RESUME_AT,
                                   NUM_STEPS)
  return results


@pytest.mark.parametrize("name", IDS)
def test_restored_state_has_the_original_types_and_dtypes(runs, name):
  restored, fresh = runs[name]["restored"]
  assert jax.tree.structure(restored) == jax.tree.structure(fresh)
  assert type(restored[0]) is type(fresh[0])  # The strategy's own NamedTuple.
  assert (strategy_cases.state_dtypes(restored) ==
          strategy_cases.state_dtypes(fresh))


@pytest.mark.parametrize("name", IDS)
def test_resumed_run_equals_uninterrupted_run(runs, name):
  params, opt_state, losses, weights = runs[name]["uninterrupted"]
  resumed_params, resumed_state, resumed_losses, resumed_weights = (
      runs[name]["resumed"])
  before_losses, before_weights = runs[name]["before"]
  chex_equal = np.testing.assert_array_equal
  jax.tree.map(chex_equal, resumed_params, params)
  chex_equal(np.stack(before_losses + resumed_losses), np.stack(losses))
  chex_equal(np.stack(before_weights + resumed_weights), np.stack(weights))
  jax.tree.map(chex_equal, resumed_state, opt_state)
  # The run did something: the weights and the parameters moved.
  assert not np.array_equal(np.asarray(params["trunk"]),
                            np.asarray(init_params()["trunk"]))
  assert np.all(np.isfinite(np.stack(losses)))


def test_training_step_face_and_periodic_state_round_trip(tmp_path):
  """value_and_grad's own strategy state, a RecomputeEveryState, and adam's."""
  strategy = optax_mtl.recompute_every(
      optax_mtl.normalized_gradients(NUM_TASKS), 2)
  optimizer = optax.adam(1e-2)
  value_and_grad = optax_mtl.value_and_grad(task_losses_fn, strategy)

  @jax.jit
  def step(state, inputs, targets):
    (losses, grads), strategy_state = value_and_grad(
        state["params"], state["strategy"], inputs, targets)
    updates, opt_state = optimizer.update(grads, state["optimizer"],
                                          state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "strategy": strategy_state, "optimizer": opt_state}, losses

  def fresh(seed):
    params = init_params(seed)
    return {"params": params, "strategy": strategy.init(params),
            "optimizer": optimizer.init(params)}

  state = fresh(1)
  uninterrupted = []
  for index in range(NUM_STEPS):
    state, losses = step(state, _BATCHES[index], _TARGETS[index])
    uninterrupted.append((state, losses))

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", uninterrupted[RESUME_AT - 1][0])
  checkpointer.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh(2))
  state = checkpointer.restore(tmp_path / "ckpt", target)
  checkpointer.close()
  assert isinstance(state["strategy"], optax_mtl.RecomputeEveryState)
  assert isinstance(state["strategy"].inner,
                    optax_mtl.NormalizedGradientsState)
  for index in range(RESUME_AT, NUM_STEPS):
    state, losses = step(state, _BATCHES[index], _TARGETS[index])
    expected_state, expected_losses = uninterrupted[index]
    np.testing.assert_array_equal(losses, expected_losses)
    jax.tree.map(np.testing.assert_array_equal, state, expected_state)
