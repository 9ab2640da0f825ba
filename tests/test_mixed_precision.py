"""bfloat16 parameters and activations, for every strategy and both faces.

Statistics of a strategy stay float32, the update (optax face) and the
combined gradient (training-step face) come back in the parameters' dtype,
and the state's shapes and dtypes never change between steps. Each strategy
compiles one function that runs both faces.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import strategies

NUM_TASKS = strategies.NUM_TASKS
NUM_STEPS = 3

_INPUTS = jax.random.normal(jax.random.key(0), (NUM_STEPS, 8, 4)).astype(
    jnp.bfloat16)
_TARGETS = jnp.cos(_INPUTS.astype(jnp.float32) @ jnp.ones((4, NUM_TASKS)) *
                   jnp.array([1.0, 4.0, 0.25])).astype(jnp.bfloat16)


def init_params():
  keys = jax.random.split(jax.random.key(1), 2)
  return {"trunk": (0.5 * jax.random.normal(keys[0], (4, 6))).astype(
      jnp.bfloat16),
          "heads": (0.5 * jax.random.normal(keys[1], (6, NUM_TASKS))).astype(
              jnp.bfloat16)}


def task_losses_fn(params, inputs, targets):
  """Everything in bfloat16, the losses too: shape [T], bfloat16."""
  predictions = jnp.tanh(inputs @ params["trunk"]) @ params["heads"]
  return jnp.mean((predictions - targets) ** 2, axis=0) + jnp.bfloat16(0.01)


def make_step(strategy):
  value_and_grad = optax_mtl.value_and_grad(task_losses_fn, strategy)

  @jax.jit
  def step(params, optax_state, step_state, inputs, targets):
    task_grads, losses = jax.jacrev(
        lambda p: (task_losses_fn(p, inputs, targets),) * 2,
        has_aux=True)(params)
    update, optax_state = strategy.update(task_grads, optax_state, params,
                                          task_losses=losses)
    (step_losses, grads), step_state = value_and_grad(params, step_state,
                                                      inputs, targets)
    return update, optax_state, grads, step_state, step_losses

  return step


def _float_dtypes(state):
  return {jnp.asarray(leaf).dtype for leaf in jax.tree.leaves(state)
          if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)}


@pytest.mark.parametrize("name", strategies.NAMES)
def test_bfloat16_params_keep_float32_statistics(name):
  strategy = strategies.strategy(name)
  step = make_step(strategy)
  params = init_params()
  initial_state = strategy.init(params)
  expected_layout = strategies.state_layout(initial_state)
  assert _float_dtypes(initial_state) <= {jnp.dtype(jnp.float32)}, name
  optax_state = step_state = initial_state
  for index in range(NUM_STEPS):
    update, optax_state, grads, step_state, losses = step(
        params, optax_state, step_state, _INPUTS[index], _TARGETS[index])
    assert losses.dtype == jnp.bfloat16
    for face, result in (("optax", update), ("training-step", grads)):
      assert jax.tree.structure(result) == jax.tree.structure(params), face
      for leaf, param in zip(jax.tree.leaves(result), jax.tree.leaves(params)):
        assert leaf.dtype == jnp.bfloat16, (name, face)
        assert leaf.shape == param.shape, (name, face)
        assert np.all(np.isfinite(np.asarray(leaf, np.float32))), (name, face)
    for face, state in (("optax", optax_state), ("training-step", step_state)):
      assert strategies.state_layout(state) == expected_layout, (name, face)
      assert _float_dtypes(state) <= {jnp.dtype(jnp.float32)}, (name, face)
      assert state.weights.dtype == jnp.float32
      assert np.all(np.isfinite(state.weights)), (name, face)
      assert int(state.num_skipped) == 0, (name, face)
    params = jax.tree.map(lambda p, g: (p - 0.05 * g).astype(p.dtype), params,
                          grads)
  # The state is stable across calls: the second call did not recompile.
  assert step._cache_size() == 1
