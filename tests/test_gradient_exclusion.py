"""A non-finite gradient of one task is excluded and counted per task.

Under every strategy that reads the per-task gradients (the Gramian and the
per-task-gradient ones), a task whose gradient holds a NaN or inf is left
out of that step as if its gradient were zero, the step goes on for the
others, and ``num_rejected_gradients[k]`` counts it.
The property over every strategy is
``check_non_finite_gradient_excludes_its_task`` in tests/properties.py.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
from optax_mtl import nnx as mtl_nnx
from tests import properties
from tests import strategies

NUM_TASKS = strategies.NUM_TASKS
READS_GRADIENTS = [name for name in strategies.NAMES
                   if strategies.STRATEGIES[name].needs != "losses"]


@pytest.mark.parametrize("name", READS_GRADIENTS)
def test_a_strategy_reading_gradients_has_the_counter(name):
  state = strategies.strategy(name).init(properties.PARAMS)
  assert "num_rejected_gradients" in state._fields, name
  assert state.num_rejected_gradients.shape == (NUM_TASKS,)
  assert state.num_rejected_gradients.dtype == jnp.int32
  assert not np.any(state.num_rejected_gradients)
  logged = optax_mtl.diagnostics(state)
  assert int(logged[f"mtl/num_rejected_gradients/{NUM_TASKS - 1}"]) == 0


def _params():
  keys = jax.random.split(jax.random.key(0), 2)
  return {"trunk": jax.random.normal(keys[0], (4,)),
          "heads": jax.random.normal(keys[1], (NUM_TASKS, 4))}


def _task_grads(params, nan_task=None):
  """Per-task gradients; task ``nan_task``'s trunk gradient holds a NaN."""
  trunk = jnp.stack([params["trunk"] * (k + 1.0) - k
                     for k in range(NUM_TASKS)])
  heads = jnp.stack([jnp.zeros_like(params["heads"]).at[k].set(
      params["heads"][k] + 1.0) for k in range(NUM_TASKS)])
  if nan_task is not None:
    trunk = trunk.at[nan_task, 1].set(jnp.nan)
  return {"trunk": trunk, "heads": heads}


@pytest.mark.parametrize("name", ["imtl_g", "pcgrad", "graddrop", "moco"])
def test_optax_face_excludes_and_counts_the_task(name):
  """Task 1's gradient holds a NaN: the parameters stay finite, the update
  is the one of task 1's gradient zeroed, and only task 1 is counted."""
  tx = optax.chain(strategies.strategy(name), optax.sgd(0.1))
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(2):  # The second step starts from a state that counted.
    nan_grads = _task_grads(params, nan_task=1)
    zero_grads = jax.tree.map(lambda g: g.at[1].set(0.0),
                              _task_grads(params))
    updates, new_state = update(nan_grads, state, params,
                                task_losses=jnp.ones(NUM_TASKS))
    expected, _ = update(zero_grads, state, params,
                         task_losses=jnp.ones(NUM_TASKS))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                         atol=1e-7),
                 updates, expected)
    params = optax.apply_updates(params, updates)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    state = new_state
  strategy_state = state[0]
  np.testing.assert_array_equal(strategy_state.num_rejected_gradients,
                                [0, 2, 0])
  assert int(strategy_state.num_skipped) == 0
  logged = optax_mtl.diagnostics(state)
  assert int(logged["mtl/num_rejected_gradients/1"]) == 2
  assert int(logged["mtl/num_rejected_gradients/0"]) == 0


def test_a_step_without_a_finite_gradient_is_skipped_and_counts_every_task():
  strategy = optax_mtl.imtl_g(NUM_TASKS)
  grads = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), _task_grads(
      _params()))
  update, state = strategy.update(grads, strategy.init(None),
                                  task_losses=jnp.ones(NUM_TASKS))
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(update))
  assert int(state.num_skipped) == 1
  np.testing.assert_array_equal(state.num_rejected_gradients, [1, 1, 1])


@jax.custom_vjp
def _nan_cotangent(x):
  """The identity, whose derivative is NaN wherever a cotangent flows."""
  return x


def _nan_cotangent_fwd(x):
  return x, None


def _nan_cotangent_bwd(_, cotangent):
  return (jnp.where(cotangent != 0, jnp.nan, 0.0),)


_nan_cotangent.defvjp(_nan_cotangent_fwd, _nan_cotangent_bwd)


class _Model(nnx.Module):

  def __init__(self, rngs):
    self.trunk = nnx.Linear(3, 4, rngs=rngs)
    self.heads = nnx.Linear(4, NUM_TASKS, rngs=rngs)

  def __call__(self, x):
    return self.heads(jnp.tanh(self.trunk(x)))


def _nnx_losses(model, x, y):
  """Finite losses; task 2's gradient is NaN (its features' cotangent)."""
  features = jnp.tanh(model.trunk(x))
  outputs = model.heads(features)
  task2 = model.heads(_nan_cotangent(features))[:, 2]
  outputs = outputs.at[:, 2].set(task2)
  return jnp.mean((outputs - y) ** 2, axis=0)


@pytest.mark.parametrize("name", ["imtl_g", "graddrop"])
def test_nnx_training_step_excludes_and_counts_the_task(name):
  model = _Model(nnx.Rngs(0))
  strategy = strategies.strategy(name)
  step = nnx.jit(mtl_nnx.value_and_grad(_nnx_losses, strategy))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  state = strategy.init(nnx.state(model, nnx.Param))
  x = jax.random.normal(jax.random.key(1), (8, 3))
  y = jax.random.normal(jax.random.key(2), (8, NUM_TASKS))
  for _ in range(3):
    (losses, grads), state = step(model, state, x, y)
    assert np.all(np.isfinite(losses))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))
    optimizer.update(model, grads)
  params = nnx.state(model, nnx.Param)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
  # Task 2 contributed nothing: its head's row received no gradient.
  np.testing.assert_array_equal(grads["heads"]["kernel"][...][:, 2], 0.0)
  assert np.any(grads["heads"]["kernel"][...][:, :2])
  np.testing.assert_array_equal(state.num_rejected_gradients, [0, 0, 3])
  assert int(state.num_skipped) == 0
