"""Orbax checkpoints: an interrupted and resumed run equals an uninterrupted one.

For every strategy of tests/strategies.py a tiny multi-task model
(``properties.loss_fn``) is trained through the optax face, the strategy
then ``optax.adam`` (the state ``(strategy state, adam state)``, as
``optax.chain`` keeps it), for ``NUM_STEPS`` steps without interruption, and
again for ``RESUME_AT`` steps, saved with Orbax, restored against an abstract
target built from a fresh ``init`` (so the NamedTuple states come back as
themselves), and resumed. The parameters, losses and weights must be bitwise
equal. All strategies share one checkpoint, so Orbax is called once; each
strategy runs its shared compiled update (``properties.update``), and the
gradients and adam are compiled once for all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_mtl
from tests import properties
from tests import strategies

NUM_TASKS = strategies.NUM_TASKS
NUM_STEPS = 6
RESUME_AT = 3

_BATCHES = jax.random.normal(jax.random.key(0), (NUM_STEPS, 8, 5))
_TARGETS = jnp.sin(_BATCHES @ jnp.arange(1.0, 1.0 + 5 * NUM_TASKS).reshape(
    5, NUM_TASKS))
_ADAM = optax.adam(1e-2)


def init_params(seed=1):
  """Parameters shaped like properties.PARAMS (the shared compiled update)."""
  keys = jax.random.split(jax.random.key(seed), 2)
  shapes = {name: leaf.shape for name, leaf in properties.PARAMS.items()}
  return {"trunk": 0.5 * jax.random.normal(keys[0], shapes["trunk"]),
          "heads": 0.5 * jax.random.normal(keys[1], shapes["heads"])}


@jax.jit
def _adam_step(updates, adam_state, params):
  updates, adam_state = _ADAM.update(updates, adam_state, params)
  return optax.apply_updates(params, updates), adam_state


def init_opt_state(name, params):
  return (strategies.strategy(name).init(params), _ADAM.init(params))


def run(name, params, opt_state, first, last):
  losses, weights = [], []
  for index in range(first, last):
    task_grads, step_losses = properties.task_grads_and_losses(
        params, _BATCHES[index], _TARGETS[index])
    strategy_state, adam_state = opt_state
    updates, strategy_state = properties.update(name, task_grads,
                                                strategy_state, step_losses)
    params, adam_state = _adam_step(updates, adam_state, params)
    opt_state = (strategy_state, adam_state)
    losses.append(step_losses)
    weights.append(strategy_state.weights)
  return params, opt_state, losses, weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Per strategy: the uninterrupted run and the saved-restored-resumed one."""
  results, interrupted, fresh_targets = {}, {}, {}
  for name in strategies.NAMES:
    params = init_params()
    results[name] = {"uninterrupted": run(
        name, params, init_opt_state(name, params), 0, NUM_STEPS)}
    params, opt_state, losses, weights = run(
        name, params, init_opt_state(name, params), 0, RESUME_AT)
    results[name]["before"] = (losses, weights)
    interrupted[name] = {"params": params, "opt_state": opt_state}
    # What a fresh process builds before restoring: a new init.
    fresh_params = init_params(seed=2)
    fresh_targets[name] = {"params": fresh_params,
                           "opt_state": init_opt_state(name, fresh_params)}

  directory = tmp_path_factory.mktemp("checkpoints") / f"step_{RESUME_AT}"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, interrupted)
  checkpointer.wait_until_finished()
  del interrupted
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh_targets)
  restored = checkpointer.restore(directory, abstract)
  checkpointer.close()

  for name in strategies.NAMES:
    params, opt_state = restored[name]["params"], restored[name]["opt_state"]
    results[name]["restored"] = (opt_state, fresh_targets[name]["opt_state"])
    results[name]["resumed"] = run(name, params, opt_state, RESUME_AT,
                                   NUM_STEPS)
  return results


@pytest.mark.parametrize("name", strategies.NAMES)
def test_restored_state_has_the_original_types_and_dtypes(runs, name):
  restored, fresh = runs[name]["restored"]
  assert jax.tree.structure(restored) == jax.tree.structure(fresh)
  assert type(restored[0]) is type(fresh[0])  # The strategy's own NamedTuple.
  assert strategies.state_layout(restored) == strategies.state_layout(fresh)


@pytest.mark.parametrize("name", strategies.NAMES)
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
  value_and_grad = optax_mtl.value_and_grad(properties.loss_fn, strategy)

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
  assert isinstance(state["strategy"].inner_state,
                    optax_mtl.NormalizedGradientsState)
  for index in range(RESUME_AT, NUM_STEPS):
    state, losses = step(state, _BATCHES[index], _TARGETS[index])
    expected_state, expected_losses = uninterrupted[index]
    np.testing.assert_array_equal(losses, expected_losses)
    jax.tree.map(np.testing.assert_array_equal, state, expected_state)
