"""Tests of optax_mtl.modo (Chen et al. 2023) and optax_mtl.sdmgrad (Xiao et
al. 2023): NumPy references of the papers' updates on explicit Jacobians of
three minibatches, both faces, and the data contract of double sampling."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import scipy_references

NUM_TASKS = 3
RNG = np.random.default_rng(11)
# Steps × 3 minibatches × tasks × parameters.
JACOBIANS = RNG.normal(size=(4, 3, NUM_TASKS, 5)) * np.array(
    [1.0, 3.0, 0.5])[:, None]


simplex_projection = scipy_references.simplex_projection


def modo_reference(jacobians, gamma, rho):
  lambdas = np.full(NUM_TASKS, 1.0 / NUM_TASKS)
  updates = []
  for first, second, third in jacobians:
    lambdas = simplex_projection(
        lambdas - gamma * (first @ second.T @ lambdas + rho * lambdas))
    updates.append(third.T @ lambdas)
  return np.array(updates)


def sdmgrad_reference(jacobians, lamda, steps, rate):
  weights = np.full(NUM_TASKS, 1.0 / NUM_TASKS)
  updates = []
  for first, second, third in jacobians:
    product = first @ second.T
    beta = rate / np.abs(product).max()
    for _ in range(steps):
      weights = simplex_projection(
          weights - beta * product @ (weights + lamda / NUM_TASKS))
    updates.append(third.T @ (weights + lamda / NUM_TASKS) / (1 + lamda))
  return np.array(updates)


CASES = {
    "modo": (optax_mtl.modo, dict(learning_rate=0.05, rho=0.1),
             lambda j: modo_reference(j, 0.05, 0.1)),
    "sdmgrad": (optax_mtl.sdmgrad, dict(lam=0.3, num_inner_steps=5),
                lambda j: sdmgrad_reference(j, 0.3, 5, 0.5)),
    "sdmgrad_mgda": (optax_mtl.sdmgrad, dict(lam=0.0, num_inner_steps=3,
                                             learning_rate=0.2),
                     lambda j: sdmgrad_reference(j, 0.0, 3, 0.2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_values_in_both_faces(case):
  factory, kwargs, reference = CASES[case]
  expected = reference(JACOBIANS)
  strategy = factory(NUM_TASKS, **kwargs)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for t, jacobians in enumerate(JACOBIANS):
    got, state = update(jnp.asarray(jacobians, jnp.float32), state,
                        task_losses=jnp.ones((3, NUM_TASKS)))
    np.testing.assert_allclose(got, expected[t], rtol=1e-4, atol=1e-5)

  # Training-step face: loss_fn(θ, J) = J θ, with a leading axis of 3 on J.
  step = jax.jit(optax_mtl.value_and_grad(
      lambda params, jacobian: jacobian @ params + 1.0, strategy))
  params = jnp.zeros(5)
  state = strategy.init(params)
  for t, jacobians in enumerate(JACOBIANS):
    (losses, grads), state = step(params, state,
                                  jnp.asarray(jacobians, jnp.float32))
    np.testing.assert_allclose(losses, np.ones(NUM_TASKS))
    np.testing.assert_allclose(grads, expected[t], rtol=1e-4, atol=1e-5)
  assert int(state.num_skipped) == 0


def test_task_specific_parameters_get_the_mean_own_gradient():
  strategy = optax_mtl.modo(2, learning_rate=0.1)

  def loss_fn(params, inputs):
    return jnp.stack([jnp.sum(params["trunk"] * inputs) + params["heads"][0],
                      -jnp.sum(params["trunk"] * inputs) + 2 * params["heads"][1]])

  params = {"trunk": jnp.ones(3), "heads": jnp.zeros(2)}
  inputs = jnp.asarray(RNG.normal(size=(3, 3)), jnp.float32)
  step = jax.jit(optax_mtl.value_and_grad(
      loss_fn, strategy, shared={"trunk": True, "heads": False}))
  (_, grads), _ = step(params, strategy.init(params), inputs)
  np.testing.assert_allclose(grads["heads"], [1.0, 2.0])


def test_the_data_contract_is_checked():
  strategy = optax_mtl.modo(NUM_TASKS)
  step = optax_mtl.value_and_grad(lambda p, j: j @ p, strategy)
  with pytest.raises(ValueError, match="leading axis of size 3"):
    step(jnp.zeros(5), strategy.init(None), jnp.ones((2, NUM_TASKS, 5)))
  with pytest.raises(ValueError, match=r"leading axes \(3, 3\)"):
    strategy.update(jnp.ones((NUM_TASKS, 5)), strategy.init(None),
                    task_losses=jnp.ones(NUM_TASKS))
  with pytest.raises(ValueError, match="encoder_fn"):
    optax_mtl.value_and_grad(lambda p, z: z, strategy,
                             encoder_fn=lambda p: p)


def test_rejected_step_keeps_the_weights():
  # No task with a finite gradient in every minibatch: the step is rejected.
  strategy = optax_mtl.sdmgrad(NUM_TASKS)
  jacobians = jnp.asarray(JACOBIANS[0], jnp.float32)
  update, state = strategy.update(jnp.full_like(jacobians, jnp.nan),
                                  strategy.init(None),
                                  task_losses=jnp.ones(NUM_TASKS))
  np.testing.assert_array_equal(update, np.zeros(5))
  assert int(state.num_skipped) == 1
  np.testing.assert_allclose(state.weights, np.full(NUM_TASKS, 1 / 3))


def test_a_non_finite_gradient_excludes_its_task_only():
  # A NaN in one minibatch's gradient of task 0: the step goes on for the
  # other tasks, and nothing non-finite reaches the update or the state.
  strategy = optax_mtl.sdmgrad(NUM_TASKS)
  jacobians = jnp.asarray(JACOBIANS[0], jnp.float32)
  update, state = strategy.update(jacobians.at[1, 0, 0].set(jnp.nan),
                                  strategy.init(None),
                                  task_losses=jnp.ones(NUM_TASKS))
  assert int(state.num_skipped) == 0
  assert np.all(np.isfinite(update)) and np.any(np.asarray(update) != 0)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("factory, kwargs, message", [
    (optax_mtl.modo, dict(learning_rate=0.0), "learning_rate"),
    (optax_mtl.modo, dict(rho=-1.0), "rho"),
    (optax_mtl.modo, dict(normalize_step="yes"), "normalize_step"),
    (optax_mtl.sdmgrad, dict(lam=-0.1), "lam"),
    (optax_mtl.sdmgrad, dict(num_inner_steps=0), "num_inner_steps"),
    (optax_mtl.sdmgrad, dict(learning_rate=float("inf")), "learning_rate"),
])
def test_hyperparameter_errors(factory, kwargs, message):
  with pytest.raises(ValueError, match=message):
    factory(NUM_TASKS, **kwargs)


def exact_simplex_projection(vector):
  """The projection onto the simplex by sorting (Held et al. 1974), NumPy."""
  descending = np.sort(vector)[::-1]
  cumulative = np.cumsum(descending) - 1
  ranks = np.arange(1, len(vector) + 1)
  support = np.nonzero(descending * ranks > cumulative)[0][-1] + 1
  return np.maximum(vector - cumulative[support - 1] / support, 0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_iterate_is_float64_under_x64(case, monkeypatch):
  # Four steps in float64: λ / w are carried between steps in float64 (they
  # were stored in float32), so the updates match the float64 recursion.
  monkeypatch.setitem(globals(), "simplex_projection",
                      exact_simplex_projection)
  factory, kwargs, reference = CASES[case]
  expected = reference(JACOBIANS)
  with jax.enable_x64(True):
    strategy = factory(NUM_TASKS, **kwargs)
    state = strategy.init(None)
    for t, jacobians in enumerate(JACOBIANS):
      got, state = strategy.update(jnp.asarray(jacobians), state,
                                   task_losses=jnp.ones((3, NUM_TASKS)))
      assert state.weights.dtype == jnp.float64
      np.testing.assert_allclose(got, expected[t], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("factory, old, new", [
    (optax_mtl.modo, dict(gamma=0.05), dict(learning_rate=0.05)),
    (optax_mtl.sdmgrad, dict(lamda=0.2, inner_learning_rate=0.3),
     dict(lam=0.2, learning_rate=0.3)),
])
def test_optax_mtl_0_1_names_warn_and_give_the_same_strategy(factory, old,
                                                             new):
  with pytest.warns(DeprecationWarning) as records:
    old_strategy = factory(NUM_TASKS, **old)
  assert {str(r.message).split(": use ")[-1] for r in records} == {
      f"{name}." for name in new}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # The new spelling does not warn.
    new_strategy = factory(NUM_TASKS, **new)
  old_state, new_state = old_strategy.init(None), new_strategy.init(None)
  for jacobians in JACOBIANS[:2]:
    old_update, old_state = old_strategy.update(
        jnp.asarray(jacobians), old_state, task_losses=jnp.ones(NUM_TASKS))
    new_update, new_state = new_strategy.update(
        jnp.asarray(jacobians), new_state, task_losses=jnp.ones(NUM_TASKS))
    np.testing.assert_array_equal(old_update, new_update)
  np.testing.assert_array_equal(old_state.weights, new_state.weights)
