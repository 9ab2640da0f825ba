"""Tests of optax_mtl.gradnorm against a NumPy reference of Algorithm 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import gramian_harness

NUM_TASKS = 3
NUM_STEPS = 6


def scripted_sequence(num_params=4):
  """Per-step Jacobians and positive losses, each task at its own pace."""
  rng = np.random.default_rng(0)
  jacobians = [rng.normal(size=(NUM_TASKS, num_params))
               * np.array([[1.0], [3.0], [0.2]]) for _ in range(NUM_STEPS)]
  rates = np.array([0.9, 0.6, 0.97])
  losses = [np.array([2.0, 5.0, 0.5]) * rates**t for t in range(NUM_STEPS)]
  return [j.astype(np.float32) for j in jacobians], [
      l.astype(np.float32) for l in losses]


def gradnorm_reference(jacobians, losses, alpha, learning_rate,
                       min_weight=1e-3):
  """Chen et al. (2018), Algorithm 1, on the explicit gradients (float64).

  The gradient of L_grad with respect to w (targets held constant) is taken
  by central differences, independently of the analytic sign formula.
  Returns the weights applied at every step and the final learnt weights.
  """
  num_tasks = jacobians[0].shape[0]
  weights = np.ones(num_tasks)
  initial = None
  applied = []
  for jacobian, loss in zip(jacobians, losses):
    loss = np.asarray(loss, np.float64)
    initial = loss if initial is None else initial
    norms = np.linalg.norm(np.asarray(jacobian, np.float64), axis=1)
    inverse_rate = loss / initial
    relative = inverse_rate / inverse_rate.mean()
    target = np.mean(weights * norms) * relative**alpha  # Constant.

    def l_grad(w, norms=norms, target=target):
      return np.sum(np.abs(w * norms - target))

    step = 1e-7
    grad = np.array([
        (l_grad(weights + step * e) - l_grad(weights - step * e)) / (2 * step)
        for e in np.eye(num_tasks)])
    applied.append(weights.copy())
    weights = np.maximum(weights - learning_rate * grad, min_weight)
    weights = num_tasks * weights / weights.sum()
  return np.array(applied), weights


@pytest.mark.parametrize("alpha, learning_rate", [(1.5, 0.025), (0.5, 0.3),
                                                  (0.0, 0.1)])
def test_scripted_sequence_matches_reference(alpha, learning_rate):
  jacobians, losses = scripted_sequence()
  expected_applied, expected_final = gradnorm_reference(
      jacobians, losses, alpha, learning_rate)
  strategy = optax_mtl.gradnorm(NUM_TASKS, alpha, learning_rate)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for t, (jacobian, loss) in enumerate(zip(jacobians, losses)):
    combined, state = update(jnp.asarray(jacobian), state,
                             task_losses=jnp.asarray(loss))
    np.testing.assert_allclose(state.weights, expected_applied[t], rtol=1e-4)
    np.testing.assert_allclose(combined, expected_applied[t] @ jacobian,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jnp.sum(state.loss_weights), NUM_TASKS,
                               rtol=1e-6)
    assert np.all(np.asarray(state.loss_weights) > 0)
  np.testing.assert_allclose(state.loss_weights, expected_final, rtol=1e-4)
  np.testing.assert_allclose(state.initial_losses, losses[0])
  assert int(state.num_steps) == NUM_STEPS


def test_value_and_grad_face_with_a_filter_matches_reference():
  jacobians, losses = scripted_sequence()
  heads = [np.full((NUM_TASKS, 2), 7.0, np.float32) * (t + 1)
           for t in range(NUM_STEPS)]
  expected_applied, expected_final = gradnorm_reference(
      jacobians, losses, 1.5, 0.05)
  strategy = optax_mtl.with_shared_parameters(
      optax_mtl.gradnorm(NUM_TASKS, learning_rate=0.05),
      {"shared": True, "head": False})

  def loss_fn(params, shared_jacobian, head_jacobian, offset):
    return (shared_jacobian @ params["shared"]
            + head_jacobian @ params["head"] + offset)

  params = {"shared": jnp.zeros(4), "head": jnp.zeros(2)}
  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  state = strategy.init(params)
  for t in range(NUM_STEPS):
    (task_losses, grads), state = step(params, state, jacobians[t], heads[t],
                                       losses[t])
    np.testing.assert_allclose(task_losses, losses[t])
    np.testing.assert_allclose(state.weights, expected_applied[t], rtol=1e-4)
    np.testing.assert_allclose(grads["shared"],
                               expected_applied[t] @ jacobians[t], rtol=1e-4,
                               atol=1e-5)
    # Not shared: the head receives the unweighted sum of task gradients.
    np.testing.assert_allclose(grads["head"], heads[t].sum(axis=0),
                               rtol=1e-4)
  np.testing.assert_allclose(state.loss_weights, expected_final, rtol=1e-4)


def test_weights_stay_positive_with_a_large_learning_rate():
  jacobians, losses = scripted_sequence()
  strategy = optax_mtl.gradnorm(NUM_TASKS, learning_rate=100.0)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for jacobian, loss in zip(jacobians, losses):
    _, state = update(jnp.asarray(jacobian), state,
                      task_losses=jnp.asarray(loss))
    assert np.all(np.asarray(state.loss_weights) > 0)
    np.testing.assert_allclose(jnp.sum(state.loss_weights), NUM_TASKS,
                               rtol=1e-6)
  _, expected = gradnorm_reference(jacobians, losses, 1.5, 100.0)
  np.testing.assert_allclose(state.loss_weights, expected, rtol=1e-4)


def test_rejected_steps_learn_nothing_and_initial_losses_are_the_first_accepted():
  jacobians, losses = scripted_sequence()
  strategy = optax_mtl.gradnorm(NUM_TASKS)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  bad = np.array([1.0, -1.0, 1.0], np.float32)
  _, state = update(jnp.asarray(jacobians[0]), state,
                    task_losses=jnp.asarray(bad))
  assert int(state.num_skipped) == 1 and int(state.num_steps) == 0
  np.testing.assert_array_equal(state.loss_weights, np.ones(NUM_TASKS))
  for jacobian, loss in zip(jacobians[1:], losses[1:]):
    _, state = update(jnp.asarray(jacobian), state,
                      task_losses=jnp.asarray(loss))
  np.testing.assert_allclose(state.initial_losses, losses[1])
  _, expected = gradnorm_reference(jacobians[1:], losses[1:], 1.5, 0.025)
  np.testing.assert_allclose(state.loss_weights, expected, rtol=1e-4)


def test_zero_and_duplicated_gradients_keep_finite_weights():
  strategy = optax_mtl.gradnorm(NUM_TASKS, learning_rate=0.5)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  jacobian = jnp.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]])
  for t in range(3):
    _, state = update(jacobian, state,
                      task_losses=jnp.array([1.0, 1.0, 1.0]) / (t + 1))
    assert np.all(np.isfinite(state.loss_weights))
    np.testing.assert_allclose(state.loss_weights[0], state.loss_weights[1])
  assert int(state.num_skipped) == 0


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             (dict(num_tasks=2, alpha=-0.1), "alpha"),
                             (dict(num_tasks=2, learning_rate=0.0),
                              "learning_rate"),
                             (dict(num_tasks=2, min_weight=0.0),
                              "min_weight")))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.gradnorm, kwargs, message)


def test_the_state_field_of_optax_mtl_0_1_warns_and_reads_the_same():
  """0.1 named ``GradnormState.num_steps`` ``num_updates``."""
  state = optax_mtl.gradnorm(NUM_TASKS).init(None)
  with pytest.warns(DeprecationWarning,
                    match="GradnormState.num_updates .*num_steps"):
    assert state.num_updates is state.num_steps
