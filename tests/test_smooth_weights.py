"""Tests of optax_mtl.smooth_weights (Zhou et al. 2022, CR-MOGM).

The reference is the paper's recursion in NumPy,

  λ_k = α λ_{k−1} + (1 − α) λ̂_k,   λ_0 = λ̂_1 or the given weights,

over the weights λ̂_k of the wrapped strategy run on its own (its rule is
tested in its own module), skipping the rejected steps.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
LOSSES = harness.REJECTED_IN_MIDDLE  # NaN, zero and inf losses in it.
GRADS = harness.scripted_grads(LOSSES)


def bare_weights(strategy, losses=LOSSES, grads=GRADS):
  """λ̂ per step of the wrapped strategy alone, and which tasks it accepted
  (bool[T]: all or none, or per task for a per-task strategy)."""
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  weights, accepted = [], []
  for step_losses, step_grads in zip(losses, grads):
    before = state
    _, state = update(step_grads, state, task_losses=step_losses)
    weights.append(np.asarray(state.weights, np.float64))
    ok = np.full(NUM_TASKS, int(state.num_skipped) == int(before.num_skipped))
    if "num_rejected_losses" in state._fields:
      ok &= np.asarray(state.num_rejected_losses) == np.asarray(
          before.num_rejected_losses)
    accepted.append(ok)
  return np.stack(weights), accepted


def reference(raw, accepted, decay, initial=None, start=None):
  """The recursion; a task excluded from a step (or a rejected step) keeps
  its λ. Per task, λ_0 is its first accepted λ̂ (``initial`` if given);
  until then its weight is ``start``, the wrapped strategy's initial one."""
  smoothed = np.full(NUM_TASKS, np.nan) if initial is None else np.asarray(
      initial, np.float64)
  out = []
  for weights, ok in zip(raw, accepted):
    ok = np.asarray(ok, bool)
    started = ~np.isnan(smoothed)
    update = np.where(started, decay * smoothed + (1 - decay) * weights,
                      weights)
    smoothed = np.where(ok, update, smoothed)
    out.append(np.where(np.isnan(smoothed), start, smoothed))
  return np.stack(out)


CASES = [
    ("mgda", {}, 0.5, None),
    ("upgrad", {}, 0.9, [1.0, 0.0, 0.0]),
    ("geometric_mean", {}, 0.7, None),  # Positive losses, per task.
    ("dwa", {}, 0.3, [0.5, 1.0, 1.5]),
    ("cosmos", dict(penalty=0.5), 0.8, None),
]


@pytest.mark.parametrize("name, kwargs, decay, initial", CASES)
def test_golden_values_optax_face(name, kwargs, decay, initial):
  factory = getattr(optax_mtl, name)
  raw, accepted = bare_weights(factory(NUM_TASKS, **kwargs))
  expected = reference(raw, accepted, decay, initial,
                       factory(NUM_TASKS, **kwargs).init(None).weights)
  strategy = optax_mtl.smooth_weights(factory(NUM_TASKS, **kwargs), decay,
                                      initial)
  state = harness.check_optax_face(strategy, LOSSES, GRADS, expected,
                                   weights_rtol=1e-5)
  # The wrapped strategy ran on its own weights.
  np.testing.assert_allclose(state.inner_state.weights, raw[-1], rtol=1e-6)


def test_golden_values_value_and_grad_face():
  """value_and_grad's task gradients are L_k · directions[k] (the harness's
  model), so λ̂ is the bare MGDA's on those."""
  directions = GRADS[0]
  grads = np.asarray(LOSSES)[:, :, None] * directions[None]
  grads = np.where(np.isfinite(grads), grads, 0).astype(np.float32)
  raw, accepted = bare_weights(optax_mtl.mgda(NUM_TASKS), LOSSES, grads)
  expected = reference(raw, accepted, 0.6, None,
                       optax_mtl.mgda(NUM_TASKS).init(None).weights)
  harness.check_value_and_grad_face(
      optax_mtl.smooth_weights(optax_mtl.mgda(NUM_TASKS), 0.6), LOSSES,
      directions, expected,
      accepted=lambda step_losses: bool(np.all(np.isfinite(step_losses))),
      weights_rtol=1e-4, grads_atol=1e-4)


def test_needs_are_the_wrapped_strategys():
  """The engine computes what the weighting needs: a smoothed loss-only
  strategy stays one backward pass (no Jacobian, no Gramian)."""
  for factory in (optax_mtl.loss_ema, optax_mtl.mgda):
    bare = factory(NUM_TASKS)
    smoothed = optax_mtl.smooth_weights(bare, 0.5)
    assert (optax_mtl.weighting_of(smoothed).needs
            is optax_mtl.weighting_of(bare).needs)
  assert optax_mtl.weighting_of(optax_mtl.smooth_weights(
      optax_mtl.loss_ema(NUM_TASKS))).needs is optax_mtl.Needs.LOSSES


def test_decay_zero_is_the_bare_strategy_and_one_keeps_lambda_zero():
  raw, accepted = bare_weights(optax_mtl.upgrad(NUM_TASKS))
  state = harness.check_optax_face(
      optax_mtl.smooth_weights(optax_mtl.upgrad(NUM_TASKS), 0.0), LOSSES,
      GRADS, raw, weights_rtol=1e-6)
  del state, accepted
  frozen = np.tile([0.2, 0.3, 0.5], (len(LOSSES), 1))
  harness.check_optax_face(
      optax_mtl.smooth_weights(optax_mtl.upgrad(NUM_TASKS), 1.0,
                               [0.2, 0.3, 0.5]),
      LOSSES, GRADS, frozen, weights_rtol=1e-7)


def test_rejected_step_keeps_everything_but_the_count():
  strategy = optax_mtl.smooth_weights(optax_mtl.pcd(NUM_TASKS), 0.5)
  _, state = strategy.update(GRADS[0], strategy.init(None),
                             task_losses=LOSSES[0])
  update, new_state = strategy.update(GRADS[1], state,
                                      task_losses=LOSSES[2])  # A NaN.
  assert int(new_state.num_skipped) == 1
  jax.tree.map(np.testing.assert_array_equal,
               new_state._replace(num_skipped=state.num_skipped), state)
  np.testing.assert_allclose(update, np.asarray(state.weights) @ GRADS[1],
                             rtol=1e-5)


def test_with_recompute_every_in_either_order():
  """Smoothed at each recomputation; the weights are reused in between."""
  raw, accepted = bare_weights(optax_mtl.mgda(NUM_TASKS), LOSSES[:2],
                               GRADS[:2])
  del accepted
  for strategy in (
      optax_mtl.recompute_every(
          optax_mtl.smooth_weights(optax_mtl.mgda(NUM_TASKS), 0.5), 2),
      optax_mtl.smooth_weights(
          optax_mtl.recompute_every(optax_mtl.mgda(NUM_TASKS), 2), 0.5)):
    state = strategy.init(None)
    weights = []
    for index in (0, 1, 1):  # Steps 0 and 2 recompute, on GRADS 0 and 1.
      _, state = strategy.update(GRADS[index], state,
                                 task_losses=jnp.ones(NUM_TASKS))
      smoothed = (state.inner_state
                  if isinstance(state, optax_mtl.RecomputeEveryState)
                  else state)
      weights.append(np.asarray(smoothed.weights))
    np.testing.assert_allclose(weights[0], raw[0], rtol=1e-5)
    np.testing.assert_allclose(weights[1], raw[0], rtol=1e-5)
    np.testing.assert_allclose(weights[2], 0.5 * raw[0] + 0.5 * raw[1],
                               rtol=1e-5)


def test_decay_can_be_injected_and_vmapped():
  """optax.inject_hyperparams (the paper's schedule of α) and a vmap over
  α (a sweep) give the plain factory's weights."""
  injected = optax.inject_hyperparams(
      lambda decay: optax_mtl.smooth_weights(optax_mtl.mgda(NUM_TASKS),
                                             decay))(decay=0.25)
  plain = optax_mtl.smooth_weights(optax_mtl.mgda(NUM_TASKS), 0.25)
  injected_state, plain_state = injected.init(None), plain.init(None)
  for index in range(3):
    _, injected_state = injected.update(GRADS[index], injected_state,
                                        task_losses=LOSSES[index])
    _, plain_state = plain.update(GRADS[index], plain_state,
                                  task_losses=LOSSES[index])
  np.testing.assert_allclose(injected_state.inner_state.weights,
                             plain_state.weights, rtol=1e-6)

  def run(decay):
    strategy = optax_mtl.smooth_weights(optax_mtl.mgda(NUM_TASKS), decay)
    state = strategy.init(None)
    for index in range(3):
      _, state = strategy.update(GRADS[index], state,
                                 task_losses=LOSSES[index])
    return state.weights

  decays = jnp.array([0.0, 0.25, 0.9])
  batched = jax.jit(jax.vmap(run))(decays)
  for decay, weights in zip(decays.tolist(), batched):
    np.testing.assert_allclose(weights, run(decay), rtol=1e-5)


def test_state_holds_the_wrapped_state_and_its_conventional_fields():
  strategy = optax_mtl.smooth_weights(optax_mtl.upgrad(NUM_TASKS), 0.5)
  state = strategy.init(None)
  assert isinstance(state, optax_mtl.SmoothWeightsState)
  assert state.inner_state.solution.shape == (NUM_TASKS, NUM_TASKS)
  with pytest.warns(DeprecationWarning, match="state.inner_state.solution"):
    assert state.solution is state.inner_state.solution  # 0.1 read through.
  assert "gradient_cosines" in state._fields
  assert "gradient_cosines" not in optax_mtl.smooth_weights(
      optax_mtl.loss_ema(NUM_TASKS)).init(None)._fields
  diagnostics = optax_mtl.diagnostics(state)
  assert "mtl/weights/0" in diagnostics and "mtl/solver_gap" in diagnostics


@pytest.mark.parametrize("strategy, kwargs, message", [
    (lambda: optax_mtl.graddrop(NUM_TASKS), {},
     "smooth_weights needs a strategy that computes weights"),
    (lambda: optax_mtl.mgda(NUM_TASKS), dict(decay=1.5),
     re.escape("decay must lie in [0.0, 1.0], got 1.5")),
    (lambda: optax_mtl.mgda(NUM_TASKS), dict(decay=float("nan")),
     "decay must lie in"),
    (lambda: optax_mtl.mgda(NUM_TASKS), dict(initial_weights=[1.0, 2.0]),
     re.escape("initial_weights must be 3 numbers, got shape (2,)")),
    (lambda: optax_mtl.mgda(NUM_TASKS),
     dict(initial_weights=[1.0, float("inf"), 2.0]),
     "initial_weights must be finite"),
    (lambda: optax.sgd(0.1), {}, "strategy must be an optax_mtl strategy"),
])
def test_bad_arguments_are_rejected(strategy, kwargs, message):
  with pytest.raises(ValueError, match=message):
    optax_mtl.smooth_weights(strategy(), **kwargs)
