"""Tests of optax_mtl.famo and optax_mtl.famo_update_logits (Liu et al. 2023).

The reference follows the paper in NumPy (float64): z = softmax(ξ), the
weights w_k = c z_k / (L_k − b_k + ε) with c = 1 / Σ_k z_k / (L_k − b_k + ε);
the logits' gradient J_z(ξ)ᵀ δ + γ ξ with the explicit softmax Jacobian
J_z = diag(z) − z zᵀ and δ = log(L_before − b + ε) − log(L_after − b + ε);
then one step of gradient descent (Algorithm 1) or of Adam (Kingma & Ba
2015, bias-corrected; the authors' code).

A bad loss excludes its task: it keeps ξ_k, its Adam moments and step
count, and its weight; in c its last accepted loss stands in; in δ only the
tasks with a pair of valid losses enter, FAMO's step on them alone (the
softmax restricted to them: an excluded task's gradient is 0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
NAN, INF = harness.NAN, harness.INF
LOSSES = harness.REJECTED_IN_MIDDLE  # A NaN, a zero, an infinite loss.
GRADS = harness.scripted_grads(LOSSES)
NUM_REJECTED = 3


class ReferenceFamo:
  """FAMO written from the paper's equations, in float64."""

  def __init__(self, learning_rate=0.025, weight_decay=1e-3,
               optimizer="adam", min_losses=None, eps=1e-8):
    self.learning_rate = learning_rate
    self.weight_decay = weight_decay
    self.optimizer = optimizer
    self.default_bounds = min_losses is None
    self.bounds = (np.zeros(NUM_TASKS) if min_losses is None
                   else np.broadcast_to(np.asarray(min_losses, np.float64),
                                        (NUM_TASKS,)))
    self.eps = eps
    self.logits = np.zeros(NUM_TASKS)
    self.m = np.zeros(NUM_TASKS)
    self.v = np.zeros(NUM_TASKS)
    self.t = np.zeros(NUM_TASKS)  # One Adam step count per logit.

  def valid(self, losses):
    """The losses that enter (finite; positive without min_losses)."""
    losses = np.asarray(losses, np.float64)
    valid = np.isfinite(losses)
    return valid & (losses > 0) if self.default_bounds else valid

  def accepts(self, losses):
    """Whether the step goes on: some valid loss, all above their bound."""
    losses = np.asarray(losses, np.float64)
    valid = self.valid(losses)
    return bool(valid.any() and np.all(losses[valid] > self.bounds[valid]))

  def z(self):
    e = np.exp(self.logits - self.logits.max())
    return e / e.sum()

  def weights(self, losses):
    scaled = self.z() / (np.asarray(losses, np.float64) - self.bounds
                         + self.eps)
    return scaled / scaled.sum()

  def update_logits(self, before, after, paired=None):
    """FAMO's step on the paired tasks' logits (the softmax restricted to
    them: z_P = z on P, renormalised; the others unchanged)."""
    paired = (np.ones(NUM_TASKS, bool) if paired is None
              else np.asarray(paired))
    if not paired.any():
      return
    log = lambda x: np.log(np.asarray(x, np.float64) - self.bounds + self.eps)
    delta = np.where(paired, log(np.where(paired, before, 1.0))
                     - log(np.where(paired, after, 1.0)), 0.0)
    z = self.z()
    # ∂/∂ξ_k of zᵀδ over the paired tasks with z's own normalisation, i.e.
    # the softmax Jacobian's rows and columns of the paired tasks, with δ
    # measured against the paired tasks' z-weighted mean.
    mean = np.sum(z[paired] * delta[paired]) / np.sum(z[paired])
    jacobian = np.diag(z) - np.outer(z, z)
    centred = np.where(paired, delta - mean, 0.0)
    g = jacobian.T @ centred + self.weight_decay * self.logits
    if self.optimizer == "adam":
      beta1, beta2, epsilon = 0.9, 0.999, 1e-8
      t = self.t + 1
      m = beta1 * self.m + (1 - beta1) * g
      v = beta2 * self.v + (1 - beta2) * g**2
      step = self.learning_rate * (m / (1 - beta1**t)) / (
          np.sqrt(v / (1 - beta2**t)) + epsilon)
      self.t = np.where(paired, t, self.t)
      self.m = np.where(paired, m, self.m)
      self.v = np.where(paired, v, self.v)
    else:
      step = self.learning_rate * g
    self.logits = np.where(paired, self.logits - step, self.logits)


def one_pass_reference(losses, **kwargs):
  """Weights and logits per step of the one-pass variant."""
  famo = ReferenceFamo(**kwargs)
  weights = np.full(NUM_TASKS, 1.0 / NUM_TASKS)
  previous = np.ones(NUM_TASKS)
  has_previous = np.zeros(NUM_TASKS, bool)
  out_weights, out_logits = [], []
  for step_losses in np.asarray(losses, np.float64):
    if famo.accepts(step_losses):
      valid = famo.valid(step_losses)
      famo.update_logits(previous, step_losses, valid & has_previous)
      stand_in = np.where(valid, step_losses, previous)
      weights = np.where(valid, famo.weights(stand_in), weights)
      previous, has_previous = stand_in, has_previous | valid
    out_weights.append(weights)
    out_logits.append(famo.logits.copy())
  return np.array(out_weights), np.array(out_logits)


ONE_PASS_CASES = [
    dict(),
    dict(learning_rate=0.3, weight_decay=0.05, optimizer="sgd"),
    # Bounds below zero accept the zero loss of task 2.
    dict(learning_rate=0.1, weight_decay=0.0, min_losses=[0.5, -0.1, -1.0]),
]


def logits_check(expected_logits):
  def check(step, unused_previous_state, state):
    # Adam divides by |ĝ|: float32 rounding of a small gradient shows.
    np.testing.assert_allclose(state.logits, expected_logits[step],
                               rtol=1e-5, atol=2e-6)
  return check


@pytest.mark.parametrize("kwargs", ONE_PASS_CASES)
def test_one_pass_golden_values_optax_face(kwargs):
  expected_weights, expected_logits = one_pass_reference(LOSSES, **kwargs)
  reference = ReferenceFamo(**kwargs)
  num_rejected = sum(not reference.accepts(l) for l in LOSSES)
  state = harness.check_optax_face(
      optax_mtl.famo(NUM_TASKS, **kwargs), LOSSES, GRADS, expected_weights,
      weights_rtol=2e-5, update_atol=1e-5,
      check_step=logits_check(expected_logits))
  # Each bad loss excluded its task only.
  assert int(state.num_skipped) == num_rejected == 0
  np.testing.assert_array_equal(
      state.num_rejected_losses,
      np.sum([~reference.valid(l) for l in LOSSES], axis=0))
  assert int(np.sum(state.num_rejected_losses)) == (
      2 if "min_losses" in kwargs else NUM_REJECTED)
  assert not np.allclose(expected_logits[-1], 0.0, atol=1e-2)


def test_one_pass_golden_values_value_and_grad_face():
  kwargs = ONE_PASS_CASES[1]
  expected_weights, expected_logits = one_pass_reference(LOSSES, **kwargs)
  state = harness.check_value_and_grad_face(
      optax_mtl.famo(NUM_TASKS, **kwargs), LOSSES, GRADS[0],
      expected_weights, weights_rtol=2e-5, grads_atol=1e-5,
      check_step=logits_check(expected_logits))
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [1, 1, 1])


def test_weights_are_convex_and_follow_the_logits():
  strategy = optax_mtl.famo(NUM_TASKS)
  state = strategy.init(None)
  losses = np.array([[2.0, 0.5, 10.0], [1.0, 0.5, 9.9], [0.5, 0.49, 9.8]],
                    np.float32)
  for step_losses in losses:
    _, state = strategy.update(jnp.eye(NUM_TASKS), state,
                               task_losses=step_losses)
    np.testing.assert_allclose(np.sum(state.weights), 1.0, rtol=1e-6)
    assert np.all(np.asarray(state.weights) > 0)
  # Task 1 improved most: its logit fell; task 3 improved least.
  assert state.logits[0] < state.logits[1] < state.logits[2]


# ---------------------------------------------------------------------------
# The authors' variant: losses re-measured after the model's step.
# ---------------------------------------------------------------------------

# (losses of the step, losses of the same batch after the update).
REMEASURED = [
    ([2.0, 0.5, 10.0], [1.6, 0.49, 9.0]),
    ([1.5, 0.4, 8.0], [1.4, 0.30, 7.9]),
    ([NAN, 0.3, 7.0], [1.0, 0.2, 6.0]),  # Task 0 excluded from the step.
    ([1.2, 0.3, 6.0], [1.0, 0.25, NAN]),  # Task 2's re-measurement bad.
    ([1.0, 0.25, 5.0], [0.9, 0.2, 4.0]),
    ([0.8, 0.2, 4.5], [0.7, 0.19, 4.4]),
]


def remeasured_reference(pairs, **kwargs):
  """Weights and logits per step, and the counts (skipped, per task)."""
  famo = ReferenceFamo(**kwargs)
  weights = np.full(NUM_TASKS, 1.0 / NUM_TASKS)
  previous = np.ones(NUM_TASKS)
  skipped, rejected = 0, np.zeros(NUM_TASKS, int)
  out_weights, out_logits = [], []
  for step_losses, next_losses in pairs:
    valid = famo.valid(step_losses)
    rejected += ~valid
    if famo.accepts(step_losses):
      previous = np.where(valid, step_losses, previous)
      weights = np.where(valid, famo.weights(previous), weights)
      next_losses = np.asarray(next_losses, np.float64)
      usable = np.isfinite(next_losses) & (next_losses > famo.bounds)
      rejected += valid & ~usable
      if (valid & usable).any():
        famo.update_logits(previous, next_losses, valid & usable)
      else:
        skipped += 1
    else:
      skipped += 1
    out_weights.append(weights)
    out_logits.append(famo.logits.copy())
  return np.array(out_weights), np.array(out_logits), skipped, rejected


@pytest.mark.parametrize("kwargs", [dict(learning_rate=0.1),
                                    dict(optimizer="sgd", learning_rate=0.5,
                                         weight_decay=0.1)])
def test_remeasured_golden_values(kwargs):
  expected_weights, expected_logits, skipped, rejected = (
      remeasured_reference(REMEASURED, **kwargs))
  strategy = optax_mtl.famo(NUM_TASKS, remeasured_losses=True, **kwargs)
  update_fn = jax.jit(strategy.update)
  logits_fn = jax.jit(lambda state, losses: optax_mtl.famo_update_logits(
      strategy, state, losses))
  state = strategy.init(None)
  grads = harness.scripted_grads(REMEASURED)
  for step, (step_losses, next_losses) in enumerate(REMEASURED):
    update, state = update_fn(grads[step], state,
                              task_losses=np.asarray(step_losses, np.float32))
    np.testing.assert_allclose(state.weights, expected_weights[step],
                               rtol=2e-5)
    np.testing.assert_allclose(update, expected_weights[step] @ grads[step],
                               rtol=1e-5, atol=1e-6)
    state = logits_fn(state, np.asarray(next_losses, np.float32))
    np.testing.assert_allclose(state.logits, expected_logits[step],
                               rtol=1e-5, atol=2e-6)
    assert not np.any(state.has_previous_losses)
  # A NaN of task 0 in a step, a NaN of task 2 in a re-measurement: each
  # excluded its task only.
  assert int(state.num_skipped) == skipped == 0
  np.testing.assert_array_equal(state.num_rejected_losses, rejected)
  np.testing.assert_array_equal(rejected, [1, 0, 1])


def test_remeasured_value_and_grad_face_in_a_training_loop():
  """Both faces of the authors' loop: step, update θ, re-measure, update ξ."""
  directions = GRADS[0]
  scripted = np.array([2.0, 0.5, 10.0], np.float32)

  def loss_fn(params):
    return jnp.asarray(scripted) * jnp.exp(jnp.asarray(directions) @ params)

  strategy = optax_mtl.famo(NUM_TASKS, learning_rate=0.2,
                            remeasured_losses=True)
  reference = ReferenceFamo(learning_rate=0.2)
  step_fn = optax_mtl.value_and_grad(loss_fn, strategy)

  @jax.jit
  def train_step(params, state):
    (task_losses, grads), state = step_fn(params, state)
    params = params - 0.05 * grads
    next_losses = loss_fn(params)
    state = optax_mtl.famo_update_logits(strategy, state, next_losses)
    return params, state, task_losses, next_losses, grads

  # The optax face on the same run, the state inside a chain.
  chain = optax.chain(strategy, optax.sgd(0.05))

  @jax.jit
  def optax_step(params, opt_state):
    task_grads = jax.jacrev(loss_fn)(params)
    updates, opt_state = chain.update(task_grads, opt_state, params,
                                      task_losses=loss_fn(params))
    params = optax.apply_updates(params, updates)
    return params, optax_mtl.famo_update_logits(strategy, opt_state,
                                                loss_fn(params))

  params = optax_params = jnp.zeros(directions.shape[1])
  state, opt_state = strategy.init(params), chain.init(params)
  for _ in range(5):
    params, state, task_losses, next_losses, grads = train_step(params, state)
    expected_weights = reference.weights(task_losses)
    reference.update_logits(task_losses, next_losses)
    np.testing.assert_allclose(state.weights, expected_weights, rtol=2e-5)
    np.testing.assert_allclose(
        grads, (expected_weights * np.asarray(task_losses)) @ directions,
        rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.logits, reference.logits, rtol=1e-4,
                               atol=1e-5)
    optax_params, opt_state = optax_step(optax_params, opt_state)
    np.testing.assert_allclose(optax_params, params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt_state[0].logits, state.logits, rtol=1e-5,
                               atol=1e-6)
  assert np.all(np.abs(reference.logits) > 1e-3)


def test_remeasured_with_next_step_losses_equals_one_pass():
  """Fed the next step's losses, the authors' variant is the one-pass one."""
  losses = np.array([[2.0, 0.5, 10.0], [1.5, 0.45, 9.0], [1.2, 0.3, 8.5],
                     [1.0, 0.28, 7.0]], np.float32)
  one_pass = optax_mtl.famo(NUM_TASKS, learning_rate=0.1)
  remeasured = optax_mtl.famo(NUM_TASKS, learning_rate=0.1,
                              remeasured_losses=True)
  state_a, state_b = one_pass.init(None), remeasured.init(None)
  for step, step_losses in enumerate(losses):
    _, state_a = one_pass.update(jnp.eye(NUM_TASKS), state_a,
                                 task_losses=step_losses)
    _, state_b = remeasured.update(jnp.eye(NUM_TASKS), state_b,
                                   task_losses=step_losses)
    np.testing.assert_allclose(state_a.weights, state_b.weights, rtol=1e-6)
    if step + 1 < len(losses):
      state_b = optax_mtl.famo_update_logits(remeasured, state_b,
                                             losses[step + 1])


def test_update_logits_once_per_step_and_inside_recompute_every():
  strategy = optax_mtl.recompute_every(
      optax_mtl.famo(2, remeasured_losses=True), 2)
  state = strategy.init(None)
  _, state = strategy.update(jnp.eye(2), state,
                             task_losses=jnp.array([1.0, 3.0]))
  state = optax_mtl.famo_update_logits(strategy, state,
                                       jnp.array([0.5, 2.9]))
  logits = np.asarray(state.inner_state.logits)
  assert isinstance(state, optax_mtl.RecomputeEveryState)
  assert logits[1] > logits[0]
  # A second call has nothing to pair with: no change, nothing counted.
  state = optax_mtl.famo_update_logits(strategy, state,
                                       jnp.array([0.1, 2.0]))
  np.testing.assert_array_equal(state.inner_state.logits, logits)
  assert int(state.inner_state.num_skipped) == 0


def test_update_logits_errors():
  one_pass = optax_mtl.famo(2)
  with pytest.raises(ValueError, match=r"remeasured_losses=True"):
    optax_mtl.famo_update_logits(one_pass, one_pass.init(None), jnp.ones(2))
  ema = optax_mtl.loss_ema(2)
  with pytest.raises(ValueError, match=r"remeasured_losses=True"):
    optax_mtl.famo_update_logits(ema, ema.init(None), jnp.ones(2))
  with pytest.raises(ValueError, match=r"must be an optax_mtl strategy"):
    optax_mtl.famo_update_logits(optax.sgd(0.1), None, jnp.ones(2))
  famo = optax_mtl.famo(2, remeasured_losses=True)
  with pytest.raises(ValueError, match=r"state holds no optax_mtl.FamoState"):
    optax_mtl.famo_update_logits(famo, ema.init(None), jnp.ones(2))
  with pytest.raises(ValueError, match=r"task_losses must have shape \(2,\)"):
    optax_mtl.famo_update_logits(famo, famo.init(None), jnp.ones(3))


def test_learning_rate_can_be_injected():
  injected = optax.inject_hyperparams(
      optax_mtl.famo, static_args=("num_tasks",))(
          num_tasks=NUM_TASKS, learning_rate=0.2, weight_decay=0.01)
  state = injected.init(jnp.zeros(2))
  for step_losses in LOSSES[:3]:
    _, state = injected.update(jnp.ones((NUM_TASKS, 2)), state,
                               task_losses=step_losses)
  expected_weights, expected_logits = one_pass_reference(
      LOSSES[:3], learning_rate=0.2, weight_decay=0.01)
  np.testing.assert_allclose(state.inner_state.logits, expected_logits[-1],
                             rtol=1e-5)
  np.testing.assert_allclose(state.inner_state.weights, expected_weights[-1],
                             rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tasks=0), r"num_tasks must be an integer >= 1, got 0"),
    (dict(learning_rate=0.0),
     r"learning_rate must lie in \(0.0, inf[)\]], got 0.0"),
    (dict(weight_decay=-0.1),
     r"weight_decay must lie in \[0.0, inf[)\]], got -0.1"),
    (dict(weight_decay=INF), r"weight_decay must be finite, got inf"),
    (dict(remeasured_losses=1), r"remeasured_losses must be True or False"),
    (dict(optimizer="adamw"),
     r"optimizer must be one of \('adam', 'sgd'\), got 'adamw'"),
    (dict(min_losses=[0.0, 1.0]),
     r"min_losses must be a number or 3 numbers, got shape \(2,\)"),
    (dict(min_losses="0"), r"min_losses must be a number or 3 numbers, got '0'"),
    (dict(min_losses=[0.0, NAN, 0.0]), r"min_losses must be finite"),
    (dict(eps=-1e-8), r"eps must lie in \[0.0, inf[)\]], got -1e-08"),
])
def test_hyperparameter_errors(kwargs, message):
  harness.check_rejects(optax_mtl.famo, kwargs, message)


def test_the_state_field_of_optax_mtl_0_1_warns_and_reads_the_same():
  """0.1 named ``FamoState.optimizer_state`` ``logits_optimizer``."""
  state = optax_mtl.famo(2).init(None)
  with pytest.warns(DeprecationWarning,
                    match="logits_optimizer .*FamoState.optimizer_state"):
    assert state.logits_optimizer is state.optimizer_state
