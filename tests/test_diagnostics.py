"""Tests of optax_mtl.diagnostics, over every strategy of tests/strategies.py.

The states come from each strategy's shared compiled update
(``properties.update``).
"""

import warnings

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
from tests import properties
from tests import strategies

NUM_TASKS = strategies.NUM_TASKS

TASK_GRADS = jnp.array([[1.0, 0.0, 2.0, 0.0],
                        [-1.0, 1.0, 0.0, 0.5],
                        [0.5, 2.0, -1.0, 1.0]])
TASK_LOSSES = jnp.array([0.7, 1.3, 2.1])
# Task gradients shaped like properties.PARAMS, for the strategies' shared
# compiled update.
SHARED_TASK_GRADS = properties.random_task_grads(np.random.default_rng(10))


def _two_steps(strategy):
  """The state after two optax-face steps (one jitted update)."""
  update = jax.jit(strategy.update)
  state = strategy.init(jnp.zeros(4))
  for scale in (1.0, 0.5):
    _, state = update(TASK_GRADS * scale, state, jnp.zeros(4),
                      task_losses=TASK_LOSSES * scale)
  return state


def _two_shared_steps(name):
  """The state of a strategy of the table after two optax-face steps."""
  state = strategies.strategy(name).init(properties.PARAMS)
  for scale in (1.0, 0.5):
    _, state = properties.update(
        name, jax.tree.map(lambda g, s=scale: g * s, SHARED_TASK_GRADS),
        state, TASK_LOSSES * scale)
  return state


def _cosines(grads):
  grads = properties.flat_jacobian(grads)
  norms = np.linalg.norm(grads, axis=1)
  return grads @ grads.T / np.outer(norms, norms)


@pytest.mark.parametrize("name", strategies.NAMES)
def test_reports_every_convention_field(name):
  state = _two_shared_steps(name)
  assert int(state.num_skipped) == 0
  logs = jax.jit(optax_mtl.diagnostics)(state)
  for index in range(NUM_TASKS):
    np.testing.assert_array_equal(logs[f"mtl/weights/{index}"],
                                  state.weights[index])
  np.testing.assert_allclose(logs["mtl/weights/sum"], np.sum(state.weights),
                             rtol=1e-6)
  assert logs["mtl/num_skipped"] == state.num_skipped
  assert logs["mtl/num_skipped"].dtype == jnp.int32
  has_cosines = hasattr(state, "gradient_cosines") or hasattr(
      getattr(state, "inner_state", None), "gradient_cosines")
  assert ("mtl/gradient_cosines/0_1" in logs) == has_cosines
  for field in ("solver_iterations", "solver_gap", "solver_converged",
                "solver_outcome"):
    assert (f"mtl/{field}" in logs) == hasattr(state, field), field
    if hasattr(state, field):
      assert logs[f"mtl/{field}"] == getattr(state, field)
  for key, value in logs.items():
    assert value.shape == (), key
    assert value.dtype in (jnp.float32, jnp.int32), key


@pytest.mark.parametrize("name", [name for name in strategies.NAMES
                                  if strategies.STRATEGIES[name].needs ==
                                  "gramian"])
def test_gradient_cosines_match_numpy(name):
  state = _two_shared_steps(name)
  logs = optax_mtl.diagnostics(state, prefix="")
  expected = _cosines(SHARED_TASK_GRADS)
  for row, col in ((0, 1), (0, 2), (1, 2)):
    np.testing.assert_allclose(logs[f"gradient_cosines/{row}_{col}"],
                               expected[row, col], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logs["gradient_cosines/min"],
                             expected[np.triu_indices(3, 1)].min(), rtol=1e-5)
  assert logs["gradient_conflicts"] == np.sum(
      expected[np.triu_indices(3, 1)] < 0)


def test_finds_the_state_inside_optimizer_states():
  strategy = optax_mtl.normalized_gradients(NUM_TASKS)
  bare = optax_mtl.diagnostics(_two_steps(strategy))
  for tx in (
      optax.chain(strategy, optax.adam(1e-3)),
      # Wrappers that accumulate or zero the raw updates (MultiSteps,
      # apply_if_finite) go after the strategy: its input has a task axis.
      optax.chain(strategy, optax.apply_if_finite(optax.sgd(0.1), 3)),
      optax.chain(strategy,
                  optax.MultiSteps(optax.sgd(0.1), 2).gradient_transformation()),
      optax.named_chain(("mtl", strategy), ("opt", optax.sgd(0.1))),
      optax.chain(optax.identity(), optax.chain(strategy, optax.sgd(0.1))),
  ):
    update = jax.jit(tx.update)
    opt_state = tx.init(jnp.zeros(4))
    for scale in (1.0, 0.5):
      _, opt_state = update(TASK_GRADS * scale, opt_state, jnp.zeros(4),
                            task_losses=TASK_LOSSES * scale)
    nested = optax_mtl.diagnostics(opt_state)
    assert nested.keys() == bare.keys(), type(opt_state)
    for key in bare:
      np.testing.assert_allclose(nested[key], bare[key], rtol=1e-6, err_msg=key)


def test_periodic_state_reports_the_inner_statistics():
  strategy = optax_mtl.recompute_every(
      optax_mtl.normalized_gradients(NUM_TASKS), 2)
  state = _two_steps(strategy)
  assert isinstance(state, optax_mtl.RecomputeEveryState)
  logs = optax_mtl.diagnostics(state)
  assert logs["mtl/steps_since_update"] == 2
  np.testing.assert_array_equal(logs["mtl/weights/1"],
                                state.inner_state.weights[1])
  assert "mtl/gradient_cosines/0_2" in logs


def test_finds_the_state_inside_an_nnx_optimizer():
  model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
  tx = optax.chain(optax_mtl.normalized_gradients(NUM_TASKS), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  logs = optax_mtl.diagnostics(optimizer.opt_state)
  assert float(logs["mtl/weights/sum"]) == NUM_TASKS
  assert "mtl/gradient_cosines/0_1" in logs


def test_several_states_are_keyed_by_their_path():
  states = {"encoder": optax_mtl.equal(2).init(None),
            "decoder": optax_mtl.equal(2, mean=True).init(None)}
  logs = optax_mtl.diagnostics(states, prefix="train")
  assert float(logs["train/encoder/weights/1"]) == 1.0
  assert float(logs["train/decoder/weights/1"]) == 0.5
  assert "train/weights/1" not in logs


def test_task_names_and_prefix():
  logs = optax_mtl.diagnostics(optax_mtl.equal(2).init(None), prefix="",
                               task_names=("depth", "segmentation"))
  assert sorted(logs) == ["num_skipped", "weights/depth",
                          "weights/segmentation", "weights/sum"]
  with pytest.raises(ValueError, match="task_names"):
    optax_mtl.diagnostics(optax_mtl.equal(2).init(None), task_names=("a",))


def test_tree_without_strategy_state_gives_empty_dict():
  assert optax_mtl.diagnostics(optax.adam(1e-3).init(jnp.zeros(2))) == {}
  assert optax_mtl.diagnostics({}) == {}


def test_num_skipped_counts_rejected_steps():
  strategy = optax_mtl.equal(NUM_TASKS)
  state = strategy.init(None)
  _, state = strategy.update(TASK_GRADS, state,
                             task_losses=jnp.array([1.0, jnp.nan, 1.0]))
  assert int(optax_mtl.diagnostics(state)["mtl/num_skipped"]) == 1


@pytest.mark.parametrize("face", ["optax", "nnx"])
def test_an_optimizer_chained_before_the_strategy_is_flagged(face):
  """chain(adam, strategy): Adam's moments get a task axis; flagged."""
  params = {"trunk": jnp.zeros((4, 5)), "heads": jnp.zeros((5, 3))}
  task_grads = jax.tree.map(lambda p: jnp.ones((3,) + p.shape), params)
  logs = {}
  for order in ("wrong", "right"):
    strategy = optax_mtl.loss_ema(3)
    tx = (optax.chain(optax.adam(1e-2), strategy) if order == "wrong"
          else optax.chain(strategy, optax.adam(1e-2)))
    if face == "optax":
      opt_state = tx.init(params)
      _, opt_state = tx.update(task_grads, opt_state, params,
                               task_losses=jnp.ones(3))
    else:
      model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      grads = jax.tree.map(lambda p: jnp.ones((3,) + p.shape),
                           nnx.state(model, nnx.Param))
      optimizer.update(model, grads, task_losses=jnp.ones(3))
      opt_state = optimizer.opt_state
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      logs[order] = optax_mtl.diagnostics(opt_state)
    assert any("wrong order" in str(w.message) for w in caught) == (
        order == "wrong")
  assert int(logs["wrong"]["mtl/wrong_chain_order"]) == 1
  assert "mtl/wrong_chain_order" not in logs["right"]
