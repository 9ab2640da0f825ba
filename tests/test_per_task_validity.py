"""A bad loss of one task excludes that task only.

Per-task strategies (``Weighting.per_task``, declared ``per_task`` in
tests/strategies.py) go on with the other tasks when one task's loss is
zero, negative or non-finite; the rest reject the whole step. The
generic property (every per-task strategy) is ``check_per_task`` in
tests/properties.py; here are end-to-end cases (a task whose loss goes
negative, a masked task with loss 0), the guard's own rules and the
declarations.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import properties
from tests import strategies

NAMES = strategies.NAMES
NUM_TASKS = strategies.NUM_TASKS


@pytest.mark.parametrize("name", NAMES)
def test_the_table_declares_per_task_and_positive_losses(name):
  """The table matches the weighting, and the state has the per-task count
  (int32[T], zeros) exactly when the strategy is per task."""
  case = strategies.STRATEGIES[name]
  weighting = optax_mtl.weighting_of(strategies.strategy(name))
  assert weighting.per_task == case.per_task, name
  assert weighting.requires_positive_losses == case.positive_losses, name
  state = strategies.strategy(name).init(properties.PARAMS)
  assert ("num_rejected_losses" in state._fields) == case.per_task, name
  if case.per_task:
    assert state.num_rejected_losses.shape == (NUM_TASKS,)
    assert state.num_rejected_losses.dtype == jnp.int32
    assert not np.any(state.num_rejected_losses)


def _two_task_problem():
  params = {"trunk": jnp.ones((4, 3)), "heads": jnp.ones((2, 3))}
  inputs = jnp.linspace(-1.0, 1.0, 20).reshape(5, 4)

  def losses_fn(params, inputs):
    hidden = jnp.tanh(inputs @ params["trunk"])
    return jnp.stack([jnp.mean((hidden @ params["heads"][0]) ** 2),
                      jnp.mean((hidden @ params["heads"][1] - 1.0) ** 2)])

  return params, inputs, losses_fn


def test_negative_loss_of_one_task_excludes_that_task_only():
  """A Gaussian-NLL-like task (loss shifted below 0) is excluded at every
  step and counted; the other task is weighted and no step is skipped."""
  params, inputs, losses_fn = _two_task_problem()

  def nll(params, inputs):
    losses = losses_fn(params, inputs)
    return jnp.stack([losses[0], losses[1] - 50.0])

  strategy = optax_mtl.loss_ema(2, beta=0.5)
  state = strategy.init(params)
  step = jax.jit(optax_mtl.value_and_grad(nll, strategy))
  for _ in range(5):
    (losses, _), state = step(params, state, inputs)
  assert float(losses[1]) < 0
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [0, 5])
  # Task 0 is weighted by 1/L̃ (params fixed: L̃ = L); task 1 keeps 1.
  np.testing.assert_allclose(state.weights, [1.0 / float(losses[0]), 1.0],
                             rtol=1e-6)
  logs = optax_mtl.diagnostics(state, task_names=["a", "b"])
  assert int(logs["mtl/num_rejected_losses/a"]) == 0
  assert int(logs["mtl/num_rejected_losses/b"]) == 5
  assert logs["mtl/num_rejected_losses/b"].dtype == jnp.int32


def test_masked_task_with_zero_loss_does_not_stop_the_others():
  """A task without labels in a batch (masked loss 0): the others go on,
  and the task is started when its labels appear."""
  task_grads = jnp.eye(2, dtype=jnp.float32)
  strategy = optax_mtl.loss_ema(2, beta=0.5)
  state = strategy.init(None)
  scripted = [([2.0, 0.0], [0.5, 1.0]), ([4.0, 0.0], [1 / 3, 1.0]),
              ([4.0, 8.0], [1 / 3.5, 1 / 8]), ([2.0, 4.0], [1 / 2.75, 1 / 6])]
  for losses, expected in scripted:
    update, state = strategy.update(task_grads, state,
                                    task_losses=jnp.array(losses))
    np.testing.assert_allclose(state.weights, expected, rtol=1e-6)
    np.testing.assert_allclose(update, expected, rtol=1e-6)
  np.testing.assert_array_equal(state.num_rejected_losses, [0, 2])
  assert int(state.num_skipped) == 0


@pytest.mark.parametrize("name", ["loss_ema", "rema", "dwema", "log_loss",
                                  "initial_loss"])
def test_normalized_weights_still_sum_to_num_tasks(name):
  """With normalize=True an excluded task keeps its previous weight and the
  others share the rest of T."""
  strategy = getattr(optax_mtl, name)(NUM_TASKS, normalize=True)
  task_grads = jnp.eye(NUM_TASKS, dtype=jnp.float32)
  state = strategy.init(None)
  rng = np.random.default_rng(0)
  for step in range(6):
    losses = jnp.asarray(rng.uniform(0.1, 10.0, NUM_TASKS), jnp.float32)
    bad_task = step % NUM_TASKS
    if step >= 2:
      losses = losses.at[bad_task].set([jnp.nan, 0.0, -2.0][step % 3])
    previous = state.weights
    _, state = strategy.update(task_grads, state, task_losses=losses)
    np.testing.assert_allclose(jnp.sum(state.weights), NUM_TASKS, rtol=1e-5)
    if step >= 2:
      assert state.weights[bad_task] == previous[bad_task]
  np.testing.assert_array_equal(state.num_rejected_losses, [1, 1, 2])


def test_no_valid_loss_rejects_the_whole_step_and_counts_every_task():
  strategy = optax_mtl.loss_ema(NUM_TASKS)
  state = strategy.init(None)
  _, state = strategy.update(jnp.eye(3), state, task_losses=jnp.ones(3))
  _, new_state = strategy.update(
      jnp.eye(3), state, task_losses=jnp.array([0.0, jnp.nan, -1.0]))
  assert int(new_state.num_skipped) == 1
  np.testing.assert_array_equal(new_state.num_rejected_losses, [1, 1, 1])
  jax.tree.map(np.testing.assert_array_equal, new_state.loss_average,
               state.loss_average)


@pytest.mark.parametrize("name", strategies.names_with("per_task"))
def test_every_loss_valid_is_bit_identical_to_whole_step_guard(name):
  """All valid: the per-task path (rule given ``valid``) gives the very
  weights and state of the same weighting run without it."""
  weighting = optax_mtl.weighting_of(strategies.strategy(name))
  whole_step = optax_mtl.as_gradient_transformation(
      weighting._replace(per_task=False))
  per_task = optax_mtl.as_gradient_transformation(weighting)
  steps = properties.random_steps(seed=11, num_steps=4, low=1e-3, high=1e3)
  state_a = state_b = per_task.init(properties.PARAMS)
  for task_grads, losses in steps:
    update_a, state_a = per_task.update(task_grads, state_a,
                                        task_losses=losses)
    update_b, state_b = whole_step.update(task_grads, state_b,
                                          task_losses=losses)
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
    jax.tree.map(np.testing.assert_array_equal, update_a, update_b)


class _CountState(NamedTuple):
  weights: jax.Array  # f32[T]
  num_skipped: jax.Array  # i32[]
  num_rejected_losses: jax.Array  # i32[T]
  gradient_cosines: jax.Array  # f32[T, T]
  calls: jax.Array  # f32[T], how often each task was valid in the rule.


def _inverse_loss_on_gramian(num_tasks):
  """A per-task Gramian weighting: w = diag(G) / L, counting valid tasks."""

  def init():
    return _CountState(
        **optax_mtl.common_state_fields(num_tasks, gramian=True,
                                        per_task=True),
        calls=jnp.zeros((num_tasks,), jnp.float32))

  def rule(task_losses, state, gramian, valid):
    return (jnp.diag(gramian) / task_losses,
            state._replace(calls=state.calls + valid))

  return optax_mtl.as_gradient_transformation(optax_mtl.Weighting(
      num_tasks=num_tasks, needs=optax_mtl.Needs.GRAMIAN, init=init,
      rule=rule, requires_positive_losses=True, per_task=True))


def test_per_task_rule_gets_the_mask_and_harmless_losses():
  strategy = _inverse_loss_on_gramian(2)
  task_grads = jnp.array([[2.0, 0.0], [0.0, 3.0]])
  state = strategy.init(None)
  update, state = strategy.update(task_grads, state,
                                  task_losses=jnp.array([2.0, 3.0]))
  np.testing.assert_allclose(state.weights, [2.0, 3.0])
  update, state = strategy.update(task_grads, state,
                                  task_losses=jnp.array([-1.0, 1.0]))
  # Task 0 excluded: previous weight 2; task 1: 9 / 1.
  np.testing.assert_allclose(state.weights, [2.0, 9.0])
  np.testing.assert_allclose(update, [4.0, 27.0])
  np.testing.assert_array_equal(state.calls, [1.0, 2.0])
  np.testing.assert_array_equal(state.num_rejected_losses, [1, 0])
  assert int(state.num_skipped) == 0


def _second_step(task_grads, task_losses):
  """After a clean first step (I, losses [1, 2]): the state it left, and the
  update and state of a second step on ``task_grads`` and ``task_losses``."""
  strategy = _inverse_loss_on_gramian(2)
  _, state = strategy.update(jnp.eye(2), strategy.init(None),
                             task_losses=jnp.array([1.0, 2.0]))
  update, new_state = strategy.update(jnp.array(task_grads), state,
                                      task_losses=jnp.array(task_losses))
  return state, update, new_state


def test_a_non_finite_gradient_excludes_its_task_only():
  _, update, new_state = _second_step([[jnp.nan, 0.0], [0.0, 2.0]],
                                      [1.0, 2.0])
  # Task 0: weight 0 in the update, its previous weight kept in the state;
  # task 1: 4 / 2.
  np.testing.assert_array_equal(update, [0.0, 4.0])
  np.testing.assert_array_equal(new_state.weights, [1.0, 2.0])
  np.testing.assert_array_equal(new_state.calls, [1.0, 2.0])
  assert int(new_state.num_skipped) == 0


def test_a_step_without_a_usable_task_is_rejected_as_a_whole():
  state, _, new_state = _second_step([[jnp.nan, 0.0], [0.0, 1.0]],
                                     [1.0, -2.0])
  assert int(new_state.num_skipped) == 1
  # The bad loss is still counted; nothing else changes.
  np.testing.assert_array_equal(new_state.num_rejected_losses, [0, 1])
  jax.tree.map(np.testing.assert_array_equal,
               new_state._replace(num_skipped=state.num_skipped,
                                  num_rejected_losses=(
                                      state.num_rejected_losses)), state)


def test_recompute_every_counts_rejected_losses_per_task():
  strategy = optax_mtl.recompute_every(optax_mtl.loss_ema(2), 2)
  state = strategy.init(None)
  for losses in ([1.0, 2.0], [1.0, -1.0], [0.0, 1.0], [jnp.nan, 0.0]):
    _, state = strategy.update(jnp.eye(2), state,
                               task_losses=jnp.array(losses))
  np.testing.assert_array_equal(state.inner_state.num_rejected_losses, [2, 2])
  # The last step: no valid loss.
  assert int(state.inner_state.num_skipped) == 1
  logs = optax_mtl.diagnostics(state)
  assert int(logs["mtl/num_rejected_losses/0"]) == 2


def test_a_per_task_rule_of_the_update_is_refused():
  """Only a weighting can exclude one task (GradientRule has no per-task
  form); the 0.1 spelling of a gradient rule, Weighting(needs=GRADIENTS),
  with per_task=True is refused when the strategy is built."""
  def rule(task_losses, state, task_grads, valid):
    return task_grads, state

  weighting = optax_mtl.Weighting(
      num_tasks=2, needs=optax_mtl.Needs.GRADIENTS, init=lambda params: None,
      rule=rule, requires_positive_losses=False, per_task=True)
  with pytest.warns(DeprecationWarning), pytest.raises(
      ValueError, match="per_task needs Needs.LOSSES"):
    optax_mtl.as_gradient_transformation(weighting)
