"""One contract over every strategy that optax_mtl exports.

Strategies are discovered from ``optax_mtl.__all__`` (tests/strategy_cases.py),
so a new strategy is covered the moment it is exported.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
from tests import strategy_cases

NUM_TASKS = 3


STRATEGIES = strategy_cases.names()


def test_every_strategy_is_discovered():
  assert {"equal", "normalized_gradients"} <= set(STRATEGIES)


# A small multi-task regression: shared linear trunk, one head per task, task
# losses of very different scales.
def loss_fn(params, inputs, targets):
  hidden = jnp.tanh(inputs @ params["trunk"])
  predictions = hidden @ params["heads"].T
  return jnp.mean((predictions - targets) ** 2, axis=0)


def make_problem():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"trunk": jax.random.normal(keys[0], (5, 8)) * 0.5,
            "heads": jax.random.normal(keys[1], (NUM_TASKS, 8)) * 0.5}
  inputs = jax.random.normal(keys[2], (32, 5))
  true_trunk = jax.random.normal(keys[3], (5, 8))
  scales = jnp.array([1.0, 10.0, 0.1])
  targets = jnp.tanh(inputs @ true_trunk)[:, :NUM_TASKS] * scales
  return params, inputs, targets


PARAMS, INPUTS, TARGETS = make_problem()


def task_grads_and_losses(params):
  losses = loss_fn(params, INPUTS, TARGETS)
  return jax.jacrev(loss_fn)(params, INPUTS, TARGETS), losses


def assert_same_structure_and_dtypes(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert jnp.shape(leaf_a) == jnp.shape(leaf_b)
    assert jnp.result_type(leaf_a) == jnp.result_type(leaf_b)


@pytest.mark.parametrize("name", STRATEGIES)
def test_optax_face_contract(name):
  strategy = strategy_cases.factory_of(name)(num_tasks=NUM_TASKS)
  state = strategy.init(PARAMS)
  assert state.weights.shape == (NUM_TASKS,)
  assert state.weights.dtype == jnp.float32
  assert state.num_skipped.dtype == jnp.int32

  update = jax.jit(strategy.update)
  task_grads, losses = task_grads_and_losses(PARAMS)
  states = [state]
  for step in range(3):
    # Unknown extra arguments are accepted and ignored.
    updates, new_state = update(task_grads, states[-1], PARAMS,
                                task_losses=losses * (1.0 + 0.1 * step),
                                unknown_argument=jnp.ones(2))
    assert_same_structure_and_dtypes(new_state, states[0])
    assert_same_structure_and_dtypes(updates, PARAMS)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert bool(jnp.all(jnp.isfinite(new_state.weights)))
    states.append(new_state)
  # The second and later calls reuse the first compilation.
  assert update._cache_size() == 1  # pylint: disable=protected-access
  assert int(states[-1].num_skipped) == 0
  # The update is the weighted sum with the weights the state reports.
  expected = jax.tree.map(
      lambda g: jnp.tensordot(states[-1].weights, g, axes=1), task_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               updates, expected)


@pytest.mark.parametrize("name", STRATEGIES)
def test_both_faces_agree(name):
  """value_and_grad gives the optax face's weights and combined gradient."""
  strategy = strategy_cases.factory_of(name)(num_tasks=NUM_TASKS)
  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  update = jax.jit(strategy.update)
  params = PARAMS
  engine_state = optax_state = strategy.init(params)
  for _ in range(3):
    (losses, grads), engine_state = step(params, engine_state, INPUTS, TARGETS)
    task_grads, face_losses = task_grads_and_losses(params)
    updates, optax_state = update(task_grads, optax_state, params,
                                  task_losses=face_losses)
    np.testing.assert_allclose(losses, face_losses, rtol=1e-6)
    # The two faces build the Jacobian by different programs (vmap of the
    # VJP and jacrev); float32 round-off, amplified by an ill-conditioned
    # solve (Aligned-MTL's eigendecomposition), sets the tolerance.
    np.testing.assert_allclose(engine_state.weights, optax_state.weights,
                               rtol=1e-3, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                         atol=1e-5),
                 grads, updates)
    params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)


@pytest.mark.parametrize("name", STRATEGIES)
def test_rejected_losses_do_not_poison_the_state(name):
  strategy = strategy_cases.factory_of(name)(num_tasks=NUM_TASKS)
  update = jax.jit(strategy.update)
  task_grads, losses = task_grads_and_losses(PARAMS)
  _, state = update(task_grads, strategy.init(PARAMS), PARAMS,
                    task_losses=losses)
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    _, new_state = update(task_grads, state, PARAMS,
                          task_losses=losses.at[1].set(bad))
    assert int(new_state.num_skipped) == int(state.num_skipped) + 1
    kept = new_state._replace(num_skipped=state.num_skipped)
    jax.tree.map(np.testing.assert_array_equal, kept, state)
  # A zero loss never gives a non-finite weight.
  _, zero_state = update(task_grads, state, PARAMS,
                         task_losses=losses.at[0].set(0.0))
  assert bool(jnp.all(jnp.isfinite(zero_state.weights)))
  # Training goes on normally afterwards.
  _, next_state = update(task_grads, zero_state, PARAMS, task_losses=losses)
  assert bool(jnp.all(jnp.isfinite(next_state.weights)))


@pytest.mark.parametrize("name", STRATEGIES)
def test_chains_and_wrappers(name):
  strategy = strategy_cases.factory_of(name)(num_tasks=NUM_TASKS)
  optimizers = {
      "chain": optax.chain(strategy, optax.adam(1e-2)),
      # apply_if_finite returns zeros shaped like its input when it rejects
      # a step, so it wraps what follows the strategy (params-shaped).
      "apply_if_finite": optax.chain(
          strategy,
          optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=3)),
      # MultiSteps keeps a params-shaped accumulator: it accumulates the
      # combined updates the strategy produces on every micro-batch.
      "multi_steps": optax.chain(
          strategy, optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)),
  }
  task_grads, losses = task_grads_and_losses(PARAMS)
  for kind, optimizer in optimizers.items():
    opt_state = optimizer.init(PARAMS)

    @jax.jit
    def train_step(params, opt_state):
      task_grads, losses = task_grads_and_losses(params)
      updates, opt_state = optimizer.update(task_grads, opt_state, params,
                                            task_losses=losses)
      return optax.apply_updates(params, updates), opt_state

    params = PARAMS
    for _ in range(4):
      params, opt_state = train_step(params, opt_state)
    for leaf in jax.tree.leaves(params):
      assert bool(jnp.all(jnp.isfinite(leaf))), kind
    moved = any(bool(jnp.any(a != b)) for a, b in
                zip(jax.tree.leaves(params), jax.tree.leaves(PARAMS)))
    assert moved, kind


class MultiTaskModel(nnx.Module):

  def __init__(self, rngs):
    self.trunk = nnx.Linear(5, 8, rngs=rngs)
    self.heads = nnx.Linear(8, NUM_TASKS, rngs=rngs)

  def __call__(self, inputs):
    return self.heads(jnp.tanh(self.trunk(inputs)))


def nnx_task_losses(model, inputs, targets):
  return jnp.mean((model(inputs) - targets) ** 2, axis=0)


@pytest.mark.parametrize("name", STRATEGIES)
def test_trains_a_flax_nnx_model(name):
  strategy = strategy_cases.factory_of(name)(num_tasks=NUM_TASKS)
  model = MultiTaskModel(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(strategy, optax.adam(1e-2)),
                            wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def losses_of(params):
      return nnx_task_losses(nnx.merge(graphdef, params, rest), INPUTS,
                             TARGETS)

    task_losses = losses_of(params)
    task_grads = jax.jacrev(losses_of)(params)
    optimizer.update(model, task_grads, task_losses=task_losses)
    return task_losses

  first = train_step(model, optimizer)
  for _ in range(30):
    last = train_step(model, optimizer)
  assert bool(jnp.all(jnp.isfinite(last)))
  assert float(jnp.sum(last)) < float(jnp.sum(first))
