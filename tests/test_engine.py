"""The training-step face: what each mode computes, checked against jacrev."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
from optax_mtl._src import base

NUM_TASKS = 3


def init_mlp(key, sizes=(4, 8, 6)):
  params = {}
  keys = jax.random.split(key, len(sizes) + NUM_TASKS)
  for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"trunk_{layer}"] = {
        "w": jax.random.normal(keys[layer], (fan_in, fan_out)) / fan_in**0.5,
        "b": jnp.full((fan_out,), 0.1)}
  params["heads"] = jax.random.normal(keys[-1], (NUM_TASKS, sizes[-1]))
  return params


def encode(params, inputs):
  hidden = inputs
  for layer in range(2):
    hidden = jnp.tanh(hidden @ params[f"trunk_{layer}"]["w"]
                      + params[f"trunk_{layer}"]["b"])
  return hidden


def heads_loss(params, representation, inputs, targets):
  del inputs
  predictions = representation @ params["heads"].T  # (batch, T)
  return jnp.mean((predictions - targets) ** 2, axis=0) * jnp.array(
      [1.0, 10.0, 0.1])


def loss_fn(params, inputs, targets):
  return heads_loss(params, encode(params, inputs), inputs, targets)


@pytest.fixture(scope="module")
def problem():
  key = jax.random.PRNGKey(0)
  params = init_mlp(key)
  inputs = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
  targets = jax.random.normal(jax.random.PRNGKey(2), (16, NUM_TASKS))
  return params, inputs, targets


def reference_jacobian_matrix(params, inputs, targets, keep=lambda path: True):
  jacobian = jax.jacrev(loss_fn)(params, inputs, targets)
  rows = [np.asarray(leaf).reshape(NUM_TASKS, -1)
          for path, leaf in jax.tree_util.tree_leaves_with_path(jacobian)
          if keep(jax.tree_util.keystr(path))]
  return np.concatenate(rows, axis=1).astype(np.float64)


class GramState(NamedTuple):
  weights: jax.Array
  num_skipped: jax.Array
  gradient_cosines: jax.Array
  gramian: jax.Array  # The Gramian the rule saw last.
  calls: jax.Array  # How often the rule ran.


def RecordGramian(weights, shared=None, recompute_every=1,
                  weight_task_specific=False):
  """A test strategy with fixed weights whose state records the Gramian."""
  weights = jnp.asarray(weights, jnp.float32)

  def init():
    return GramState(jnp.zeros(NUM_TASKS), jnp.zeros([], jnp.int32),
                     jnp.eye(NUM_TASKS), jnp.zeros((NUM_TASKS, NUM_TASKS)),
                     jnp.zeros([], jnp.int32))

  def rule(task_losses, state, gramian):
    del task_losses
    return weights, state._replace(gramian=gramian, calls=state.calls + 1)

  strategy = optax_mtl.as_gradient_transformation(optax_mtl.Weighting(
      num_tasks=NUM_TASKS, needs=optax_mtl.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False))
  if shared is not None:
    strategy = optax_mtl.with_shared_parameters(
        strategy, shared, weight_task_specific=weight_task_specific)
  if recompute_every > 1:
    strategy = optax_mtl.recompute_every(strategy, recompute_every)
  return strategy


WEIGHTS = np.array([0.5, 2.0, -1.0])


@pytest.mark.parametrize("mode", ["jacobian", "low_memory"])
def test_gramian_and_combined_gradient_match_jacrev(problem, mode):
  params, inputs, targets = problem
  strategy = RecordGramian(WEIGHTS)
  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy, gramian_mode=mode))
  (losses, grads), state = step(params, strategy.init(params), inputs, targets)
  jacobian = reference_jacobian_matrix(params, inputs, targets)
  np.testing.assert_allclose(state.gramian, jacobian @ jacobian.T, rtol=1e-4,
                             atol=1e-6)
  flat_grads = np.concatenate(
      [np.ravel(leaf) for leaf in jax.tree.leaves(grads)])
  np.testing.assert_allclose(flat_grads, WEIGHTS @ jacobian, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(losses, loss_fn(params, inputs, targets),
                             rtol=1e-6)
  np.testing.assert_allclose(state.weights, WEIGHTS)


@pytest.mark.parametrize("mode", ["jacobian", "low_memory", "periodic"])
@pytest.mark.parametrize("weight_task_specific", [False, True])
def test_shared_parameters_restrict_the_gramian(problem, mode,
                                                weight_task_specific):
  params, inputs, targets = problem
  shared = lambda p: {k: jax.tree.map(lambda _: k != "heads", v)
                      for k, v in p.items()}
  strategy = RecordGramian(WEIGHTS, shared=shared,
                           recompute_every=2 if mode == "periodic" else 1,
                           weight_task_specific=weight_task_specific)
  step = jax.jit(optax_mtl.value_and_grad(
      loss_fn, strategy,
      gramian_mode="jacobian" if mode == "periodic" else mode))
  (_, grads), state = step(params, strategy.init(params), inputs, targets)
  jacobian = reference_jacobian_matrix(params, inputs, targets,
                                       keep=lambda path: "heads" not in path)
  gramian = getattr(state, "inner_state", state).gramian
  np.testing.assert_allclose(gramian, jacobian @ jacobian.T, rtol=1e-4,
                             atol=1e-6)
  # Shared parameters get Σ w_k ∇L_k; the heads their own task's gradient
  # (or w_k ∇L_k with weight_task_specific).
  full = reference_jacobian_matrix(params, inputs, targets)
  is_head = np.concatenate([
      np.full(np.size(leaf), "heads" in jax.tree_util.keystr(path))
      for path, leaf in jax.tree_util.tree_leaves_with_path(params)])
  head_weights = WEIGHTS if weight_task_specific else np.ones(NUM_TASKS)
  expected = np.where(is_head, head_weights @ full, WEIGHTS @ full)
  flat_grads = np.concatenate(
      [np.ravel(leaf) for leaf in jax.tree.leaves(grads)])
  np.testing.assert_allclose(flat_grads, expected, rtol=1e-4, atol=1e-6)
  for head in range(NUM_TASKS):
    own = jax.grad(lambda p: loss_fn(p, inputs, targets)[head])(params)
    expected_head = own["heads"][head] * (
        WEIGHTS[head] if weight_task_specific else 1.0)
    np.testing.assert_allclose(grads["heads"][head], expected_head,
                               rtol=1e-4, atol=1e-6)


def test_optax_face_gramian_and_filter_match_engine(problem):
  params, inputs, targets = problem
  shared = {k: jax.tree.map(lambda _: k != "heads", v)
            for k, v in params.items()}
  strategy = RecordGramian(WEIGHTS, shared=shared, weight_task_specific=True)
  task_grads = jax.jacrev(loss_fn)(params, inputs, targets)
  update, state = jax.jit(strategy.update)(
      task_grads, strategy.init(params), params,
      task_losses=loss_fn(params, inputs, targets))
  jacobian = reference_jacobian_matrix(params, inputs, targets,
                                       keep=lambda path: "heads" not in path)
  np.testing.assert_allclose(state.gramian, jacobian @ jacobian.T, rtol=1e-4,
                             atol=1e-6)
  expected = jax.tree.map(lambda g: jnp.tensordot(WEIGHTS, g, axes=1),
                          task_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               update, expected)


def test_representation_gramian_matches_jacrev(problem):
  params, inputs, targets = problem
  strategy = RecordGramian(WEIGHTS)
  step = jax.jit(optax_mtl.value_and_grad(heads_loss, strategy,
                                          encoder_fn=lambda p, x, y: encode(p, x)))
  (losses, grads), state = step(params, strategy.init(params), inputs, targets)
  representation = encode(params, inputs)
  rep_jacobian = jax.jacrev(heads_loss, argnums=1)(params, representation,
                                                   inputs, targets)
  rep_matrix = np.asarray(rep_jacobian).reshape(NUM_TASKS, -1)
  np.testing.assert_allclose(state.gramian, rep_matrix @ rep_matrix.T,
                             rtol=1e-4, atol=1e-7)
  full = reference_jacobian_matrix(params, inputs, targets)
  flat_grads = np.concatenate(
      [np.ravel(leaf) for leaf in jax.tree.leaves(grads)])
  np.testing.assert_allclose(flat_grads, WEIGHTS @ full, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(losses, loss_fn(params, inputs, targets),
                             rtol=1e-6)


def test_loss_only_step_is_one_forward_one_backward(problem):
  """Same FLOPs as jax.value_and_grad of the summed losses, one trace."""
  params, inputs, targets = problem
  traces = []

  def counting_loss(p, x, y):
    traces.append(1)
    return loss_fn(p, x, y)

  strategy = optax_mtl.equal(NUM_TASKS)
  step = jax.jit(optax_mtl.value_and_grad(counting_loss, strategy))
  compiled = step.lower(params, strategy.init(params), inputs,
                        targets).compile()
  assert len(traces) == 1
  plain = jax.jit(jax.value_and_grad(lambda p, x, y: jnp.sum(loss_fn(p, x, y))))
  plain_flops = plain.lower(params, inputs, targets).compile().cost_analysis()
  ours_flops = compiled.cost_analysis()
  if isinstance(plain_flops, list):  # Older jax returns a list.
    plain_flops, ours_flops = plain_flops[0], ours_flops[0]
  assert ours_flops["flops"] <= 1.05 * plain_flops["flops"] + 100


def test_has_aux(problem):
  params, inputs, targets = problem

  def loss_with_aux(p, x, y):
    losses = loss_fn(p, x, y)
    return losses, {"total": jnp.sum(losses)}

  for strategy in (optax_mtl.equal(NUM_TASKS), RecordGramian(WEIGHTS)):
    step = jax.jit(optax_mtl.value_and_grad(loss_with_aux, strategy,
                                            has_aux=True))
    ((losses, aux), grads), _ = step(params, strategy.init(params), inputs,
                                     targets)
    np.testing.assert_allclose(aux["total"], jnp.sum(losses), rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_low_memory_with_aux(problem):
  params, inputs, targets = problem

  def loss_with_aux(p, x, y):
    return loss_fn(p, x, y), jnp.zeros(())

  strategy = RecordGramian(WEIGHTS)
  step = jax.jit(optax_mtl.value_and_grad(loss_with_aux, strategy, has_aux=True,
                                          gramian_mode="low_memory"))
  _, state = step(params, strategy.init(params), inputs, targets)
  jacobian = reference_jacobian_matrix(params, inputs, targets)
  np.testing.assert_allclose(state.gramian, jacobian @ jacobian.T, rtol=1e-4,
                             atol=1e-6)


def test_recompute_every_reuses_weights_between_updates(problem):
  params, inputs, targets = problem
  strategy = RecordGramian(WEIGHTS, recompute_every=3)
  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  state = strategy.init(params)
  assert isinstance(state, optax_mtl.RecomputeEveryState)
  full = reference_jacobian_matrix(params, inputs, targets)
  calls = []
  for _ in range(7):
    (_, grads), state = step(params, state, inputs, targets)
    calls.append(int(state.inner_state.calls))
    flat_grads = np.concatenate(
        [np.ravel(leaf) for leaf in jax.tree.leaves(grads)])
    np.testing.assert_allclose(flat_grads, WEIGHTS @ full, rtol=1e-4,
                               atol=1e-6)
  # The rule runs on steps 1, 4 and 7 only.
  assert calls == [1, 1, 1, 2, 2, 2, 3]
  # The optax face follows the same schedule.
  task_grads = jax.jacrev(loss_fn)(params, inputs, targets)
  update = jax.jit(strategy.update)
  opt_state = strategy.init(params)
  opt_calls = []
  for _ in range(4):
    _, opt_state = update(task_grads, opt_state, task_losses=jnp.ones(3))
    opt_calls.append(int(opt_state.inner_state.calls))
  assert opt_calls == [1, 1, 1, 2]


def test_wrong_number_of_tasks_raises_at_trace_time(problem):
  params, inputs, targets = problem
  strategy = optax_mtl.equal(num_tasks=2)
  step = optax_mtl.value_and_grad(loss_fn, strategy)
  with pytest.raises(ValueError, match=r"task_losses must have shape \(2,\)"):
    jax.jit(step)(params, strategy.init(params), inputs, targets)
  task_grads = jax.jacrev(loss_fn)(params, inputs, targets)
  with pytest.raises(ValueError, match="leading task axis of size 2"):
    strategy.update(task_grads, strategy.init(params),
                    task_losses=jnp.ones(2))
  with pytest.raises(ValueError, match=r"shape \(2,\).*got shape \(3,\)"):
    strategy.update(jax.tree.map(lambda g: g[:2], task_grads),
                    strategy.init(params), task_losses=jnp.ones(3))
  with pytest.raises(TypeError, match="task_losses"):
    strategy.update(jax.tree.map(lambda g: g[:2], task_grads),
                    strategy.init(params))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="gramian_mode"):
    optax_mtl.value_and_grad(loss_fn, optax_mtl.equal(3), gramian_mode="fast")
  with pytest.raises(ValueError, match="optax_mtl strategy"):
    optax_mtl.value_and_grad(loss_fn, optax.adam(1e-3))
  with pytest.raises(ValueError, match=r"num_tasks must be .* got 0"):
    optax_mtl.equal(0)
  with pytest.raises(ValueError, match="every must be an integer >= 1, got 0"):
    optax_mtl.recompute_every(optax_mtl.normalized_gradients(3), 0)
  with pytest.raises(ValueError, match="shared must be a pytree of bools"):
    strategy = optax_mtl.with_shared_parameters(
        optax_mtl.normalized_gradients(2), [True])
    strategy.update({"a": jnp.ones((2, 3)), "b": jnp.ones((2, 1))},
                    strategy.init(None), task_losses=jnp.ones(2))


def test_guard_keeps_state_on_rejected_input():
  strategy = optax_mtl.normalized_gradients(2)
  update = jax.jit(strategy.update)
  grads = jnp.array([[3.0, 4.0], [0.0, 2.0]])
  _, state = update(grads, strategy.init(None), task_losses=jnp.ones(2))
  _, new_state = update(grads, state, task_losses=jnp.array([1.0, jnp.nan]))
  assert int(new_state.num_skipped) == int(state.num_skipped) + 1
  np.testing.assert_array_equal(new_state.weights, state.weights)
  np.testing.assert_array_equal(new_state.gradient_cosines,
                                state.gradient_cosines)


@pytest.mark.parametrize("gramian_mode", ["jacobian", "low_memory"])
def test_a_task_with_a_non_finite_gradient_is_excluded_from_a_gramian_step(
    gramian_mode):
  # Optax face: task 0's gradient holds an inf; task 1 alone is applied
  # (normalized_gradients: w_1 = 1 / ‖g_1‖, the update g_1 / ‖g_1‖); task 0
  # keeps its weight in the state.
  strategy = optax_mtl.normalized_gradients(2)
  grads = jnp.array([[3.0, jnp.inf], [0.0, 2.0]])
  state = strategy.init(None)
  update, new_state = jax.jit(strategy.update)(grads, state,
                                               task_losses=jnp.ones(2))
  np.testing.assert_allclose(update, [0.0, 1.0], rtol=1e-6)
  assert int(new_state.num_skipped) == 0
  assert float(new_state.weights[0]) == float(state.weights[0])
  # Training-step face: reverse mode spreads task 0's infinite derivative
  # to task 1's row too (its cotangent 0 times inf is NaN), so no task is
  # left: the step's gradient is zero and counted, never NaN.
  def losses(params, x):
    return jnp.stack([jnp.sqrt(params[0] * x),
                      jnp.sum((params - 1.0) ** 2)])
  params = jnp.array([0.0, 3.0])
  step = jax.jit(optax_mtl.value_and_grad(losses, strategy,
                                          gramian_mode=gramian_mode))
  (_, step_grads), step_state = step(params, state, -1.0)
  np.testing.assert_array_equal(step_grads, [0.0, 0.0])
  assert int(step_state.num_skipped) == 1


@pytest.mark.parametrize("name", ["graddrop", "trimmed_mean"])
def test_gradient_rules_on_the_representation_refuse_a_device_axis(name):
  """Under shard_map each device would run the rule on its own batch."""
  strategy = getattr(optax_mtl, name)(3)
  with pytest.raises(ValueError, match=r"cannot read the representation's "
                     r"gradients across devices .*axis_name='data'"):
    optax_mtl.value_and_grad(lambda p, z, x: z, strategy,
                             encoder_fn=lambda p, x: x, axis_name="data")
