"""Loss-based weights under extreme, vanishing and tiny losses.

What is guaranteed: a valid but extreme loss (anything finite and positive,
1e-30 to 1e30) never locks a strategy's state or fills it with NaN, ordinary
steps after it are all accepted, and no weight overflows float32 (every
loss-based weight is at most 1e30; ``normalize=True`` and ``max_weight``
bound them further). The expected values come from NumPy references written
here from each paper's formula, in float64, with the documented bounds
(ratios and weights clipped at 1e30) applied.
"""

import functools

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl

NUM_TASKS = 3
MAX_WEIGHT = 1e30  # The documented ceiling of every loss-based weight.
INF, NAN = float("inf"), float("nan")


def all_finite(tree):
  """Whether every floating-point leaf of a state is finite (in JAX)."""
  checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.all(jnp.stack(checks))


def softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


# --------------------------------------------------------------------------
# One extreme but valid pair of losses (1e-30, then 1e9) neither locks a
# state nor poisons it with NaN; ordinary steps after any valid losses are
# accepted.
# --------------------------------------------------------------------------

# Task 0 jumps from 1e-30 to 1e9 (both finite and positive: accepted), then
# every task has ordinary losses.
EXTREME_PAIR = np.concatenate([
    np.array([[1e-30, 1.0, 2.0], [1e9, 1.0, 2.0]]),
    np.random.default_rng(0).uniform(0.5, 2.0, (10, NUM_TASKS)),
])
JACOBIANS = np.random.default_rng(1).normal(
    size=(len(EXTREME_PAIR), NUM_TASKS, 4)) * np.array([[1.0], [3.0], [0.2]])


def ratio_history(losses):
  """r(t) = L(t−1)/L(t−2) (ones for t < 2), clipped at 1e30 as documented."""
  ratios = [np.ones(NUM_TASKS)] * min(2, len(losses))
  for t in range(2, len(losses)):
    ratios.append(np.minimum(losses[t - 1] / losses[t - 2], MAX_WEIGHT))
  return np.array(ratios)


def ema_history(losses, beta):
  """L̃(1) = L(1), L̃(t) = β L(t) + (1−β) L̃(t−1)."""
  averages = [losses[0]]
  for step_losses in losses[1:]:
    averages.append(beta * step_losses + (1 - beta) * averages[-1])
  return np.array(averages)


def dwa_factors(ratios, temperature):
  logits = np.minimum(ratios / temperature, MAX_WEIGHT)
  factors = np.array([NUM_TASKS * softmax(z) for z in logits])
  factors[:2] = 1.0
  return factors


def reference_dwa(losses, temperature=2.0):
  """MTAN Eq. 7 per step: T softmax(r(t)/τ)."""
  return dwa_factors(ratio_history(losses), temperature)


def reference_rema(losses, beta=0.1):
  """REMA: r(t) / L̃(t)."""
  return np.minimum(ratio_history(losses) / ema_history(losses, beta),
                    MAX_WEIGHT)


def reference_dwema(losses, beta=0.1, temperature=2.0):
  """DWEMA: the DWA factor divided by L̃(t)."""
  return np.minimum(
      dwa_factors(ratio_history(losses), temperature)
      / ema_history(losses, beta), MAX_WEIGHT)


def reference_gradnorm(jacobians, losses, alpha=1.5, learning_rate=0.025,
                       min_weight=1e-3):
  """GradNorm, Algorithm 1 of Chen et al. (2018), in float64."""
  weights = np.ones(NUM_TASKS)
  applied = []
  for jacobian, step_losses in zip(jacobians, losses):
    initial = losses[0]
    norms = np.linalg.norm(jacobian, axis=1)
    ratios = step_losses / initial
    rates = ratios / ratios.mean()
    targets = np.mean(weights * norms) * rates**alpha
    applied.append(weights.copy())
    weights = np.maximum(
        weights - learning_rate * np.sign(weights * norms - targets) * norms,
        min_weight)
    weights = NUM_TASKS * weights / weights.sum()
  return np.array(applied)


@pytest.mark.parametrize("name, factory, reference", [
    ("dwa", lambda: optax_mtl.dwa(NUM_TASKS), reference_dwa),
    ("rema", lambda: optax_mtl.rema(NUM_TASKS), reference_rema),
    ("dwema", lambda: optax_mtl.dwema(NUM_TASKS), reference_dwema),
    ("gradnorm", lambda: optax_mtl.gradnorm(NUM_TASKS),
     lambda losses: reference_gradnorm(JACOBIANS, losses)),
])
def test_extreme_loss_pair_does_not_lock_the_state(name, factory, reference):
  """After 1e-30 then 1e9, every later step is accepted, the state stays
  finite and the weights follow the paper's formula (ratios clipped at
  1e30)."""
  strategy = factory()
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  expected = reference(EXTREME_PAIR)
  for step, (losses, jacobian) in enumerate(zip(EXTREME_PAIR, JACOBIANS)):
    _, state = update(jnp.asarray(jacobian, jnp.float32), state,
                      task_losses=jnp.asarray(losses, jnp.float32))
    assert int(state.num_skipped) == 0, (name, step)
    assert bool(all_finite(state)), (name, step, state)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-4,
                               atol=1e-30, err_msg=f"{name}, step {step}")


# The strategies a run of extreme losses may leave in an odd but finite
# state; the first group forgets the extremes within the ordinary run.
FORGETFUL = {
    "dwa": lambda: optax_mtl.dwa(NUM_TASKS),
    "rema": lambda: optax_mtl.rema(NUM_TASKS),
    "dwema": lambda: optax_mtl.dwema(NUM_TASKS),
    "loss_ema": lambda: optax_mtl.loss_ema(NUM_TASKS),
    "lbtw": lambda: optax_mtl.lbtw(NUM_TASKS, steps_per_epoch=10),
    "log_loss": lambda: optax_mtl.log_loss(NUM_TASKS),
    "geometric_mean": lambda: optax_mtl.geometric_mean(NUM_TASKS),
}
# These keep something of the first steps by design: L(0) (gradnorm,
# initial_loss) or Adam's second moment of a huge ∂L/∂s (uncertainty).
REMEMBERING = {
    "gradnorm": lambda: optax_mtl.gradnorm(NUM_TASKS),
    "initial_loss": lambda: optax_mtl.initial_loss(NUM_TASKS),
    "uncertainty": lambda: optax_mtl.uncertainty(NUM_TASKS),
}
PREFIX_STEPS = 4
ORDINARY = np.random.default_rng(2).uniform(
    0.5, 2.0, (1000, NUM_TASKS)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def recovery_run(name):
  """A jitted run: ``prefix f32[4, T]`` then :data:`ORDINARY`; returns the
  weights, whether the state was finite, and num_skipped, per step."""
  strategy = {**FORGETFUL, **REMEMBERING}[name]()
  grads = jnp.asarray(JACOBIANS[0], jnp.float32)

  def run(prefix):
    def body(state, losses):
      _, state = strategy.update(grads, state, task_losses=losses)
      return state, (state.weights, all_finite(state), state.num_skipped)
    losses = jnp.concatenate([prefix, jnp.asarray(ORDINARY)])
    return jax.lax.scan(body, strategy.init(None), losses)[1]

  return jax.jit(run)


extreme_losses = st.lists(
    st.floats(-30.0, 30.0), min_size=PREFIX_STEPS * NUM_TASKS,
    max_size=PREFIX_STEPS * NUM_TASKS).map(
        lambda xs: (10.0 ** np.array(xs)).astype(np.float32).reshape(
            PREFIX_STEPS, NUM_TASKS))


@pytest.mark.parametrize("name", sorted({**FORGETFUL, **REMEMBERING}))
@settings(max_examples=15, deadline=None)
@given(prefix=extreme_losses)
def test_ordinary_steps_recover_after_any_valid_losses(name, prefix):
  """After any valid positive losses (1e-30 to 1e30) every step is
  accepted, the state stays finite and the weights stay finite and at most
  1e30; a strategy with a short memory then gives the weights of a run
  that never saw the extremes."""
  weights, finite, num_skipped = map(np.asarray, recovery_run(name)(prefix))
  assert num_skipped[-1] == 0
  assert finite.all()
  assert np.all(np.isfinite(weights)) and np.all(weights >= 0)
  assert np.all(weights <= MAX_WEIGHT * (1 + 1e-6))
  if name in FORGETFUL:
    benign, _, _ = recovery_run(name)(np.ones_like(prefix))
    np.testing.assert_allclose(weights[-1], benign[-1], rtol=1e-3)


def test_uncertainty_accepts_a_loss_whose_gradient_squared_overflows():
  """(∂L/∂s)² = 2.5e59 for a loss of 1e30: the step
  is accepted, and a run of ordinary steps after it is never rejected."""
  strategy = optax_mtl.uncertainty(NUM_TASKS)
  weights, finite, num_skipped = map(np.asarray, recovery_run("uncertainty")(
      np.array([[1.0, 1e30, 1.0]] * PREFIX_STEPS, np.float32)))
  assert num_skipped[-1] == 0 and finite.all()
  _, state = jax.jit(strategy.update)(
      jnp.eye(NUM_TASKS), strategy.init(None),
      task_losses=jnp.array([1.0, 1e30, 1.0]))
  # Adam's first step is learning_rate · sign(∂L/∂s) = -0.01 · (-1).
  np.testing.assert_allclose(state.log_variances, [0.0, 0.01, 0.0],
                             atol=1e-7)


# --------------------------------------------------------------------------
# Long runs whose losses approach 0: no weight overflows float32, and the
# weights that grow as 1/L̃ can be bounded.
# --------------------------------------------------------------------------

LONG_RUN_STEPS = 100_000
HALFWAY = LONG_RUN_STEPS // 2
# Each task's loss falls geometrically to 1e-30 (task 0), 1e-15 and 1e-6 by
# the middle of the run, then stays there.
DECAY_EXPONENTS = np.array([30.0, 15.0, 6.0])


def long_run_losses(step):
  progress = jnp.minimum(step / HALFWAY, 1.0)
  return (10.0 ** (-progress * DECAY_EXPONENTS)).astype(jnp.float32)


def long_run(strategy):
  """1e5 steps in one lax.scan; returns the weights f32[S, T], whether each
  state was finite, and the final num_skipped."""

  @jax.jit
  def run():
    grads = jnp.asarray(JACOBIANS[0], jnp.float32)

    def body(state, step):
      _, state = strategy.update(grads, state,
                                 task_losses=long_run_losses(step))
      return state, (state.weights, all_finite(state))
    state, (weights, finite) = jax.lax.scan(
        body, strategy.init(None), jnp.arange(LONG_RUN_STEPS))
    return weights, finite, state.num_skipped

  return map(np.asarray, run())


LONG_RUN_CASES = {
    # The paper's formulas: finite, at most 1e30.
    "loss_ema": dict(), "rema": dict(), "dwema": dict(), "log_loss": dict(),
    "initial_loss": dict(), "geometric_mean": dict(), "uncertainty": dict(),
    "dwa": dict(), "gradnorm": dict(), "lbtw": dict(normalize=False),
    # Bounded for SGD: weights that sum to T ...
    "loss_ema-normalize": dict(normalize=True),
    "rema-normalize": dict(normalize=True),
    "dwema-normalize": dict(normalize=True),
    "log_loss-normalize": dict(normalize=True),
    "initial_loss-normalize": dict(normalize=True),
    "uncertainty-normalize": dict(normalize=True),
    "lbtw-normalize": dict(normalize=True),
    # ... or a clip.
    "loss_ema-max_weight": dict(max_weight=10.0),
    "log_loss-max_weight": dict(max_weight=10.0),
    "geometric_mean-max_weight": dict(max_weight=10.0),
    "uncertainty-max_weight": dict(max_weight=10.0),
}


@pytest.mark.parametrize("case", sorted(LONG_RUN_CASES))
def test_long_run_with_vanishing_losses_keeps_weights_in_float32(case):
  """1e5 steps, losses down to 1e-30: no step rejected, no
  state or weight infinite, and each option's bound holds."""
  kwargs = LONG_RUN_CASES[case]
  name = case.split("-")[0]
  weights, finite, num_skipped = long_run(
      getattr(optax_mtl, name)(NUM_TASKS, **kwargs))
  assert int(num_skipped) == 0
  assert finite.all()
  assert np.all(np.isfinite(weights)) and np.all(weights >= 0)
  assert np.max(weights) <= MAX_WEIGHT * (1 + 1e-6)
  if kwargs.get("normalize") or name in ("dwa", "gradnorm"):
    np.testing.assert_allclose(weights.sum(1), NUM_TASKS, rtol=1e-5)
  if "max_weight" in kwargs:
    assert np.max(weights) <= kwargs["max_weight"]
    assert np.max(weights) == kwargs["max_weight"]  # The clip is reached.


def test_ema_long_run_matches_reference_with_and_without_normalize():
  """1/L̃ grows to ~1e30 as the losses fall; normalize=True keeps Σ w = T
  with the same relative weights."""
  losses = np.asarray(jax.vmap(long_run_losses)(
      jnp.arange(LONG_RUN_STEPS)), np.float64)
  average = np.empty_like(losses)
  average[0] = losses[0]
  for t in range(1, LONG_RUN_STEPS):
    average[t] = 0.1 * losses[t] + 0.9 * average[t - 1]
  inverse = np.minimum(1.0 / average, MAX_WEIGHT)
  steps = [0, 1000, HALFWAY // 2, HALFWAY, LONG_RUN_STEPS - 1]
  plain, _, _ = long_run(optax_mtl.loss_ema(NUM_TASKS))
  normalized, _, _ = long_run(optax_mtl.loss_ema(NUM_TASKS, normalize=True))
  np.testing.assert_allclose(plain[steps], inverse[steps], rtol=1e-3)
  expected = NUM_TASKS * inverse / inverse.sum(1, keepdims=True)
  np.testing.assert_allclose(normalized[steps], expected[steps], rtol=1e-3,
                             atol=1e-30)
  assert plain[-1].sum() > 1e29  # What plain SGD would multiply its step by.


# A scripted run of accepted, ordinary losses spanning three decades.
SCRIPTED = np.random.default_rng(4).uniform(-1.5, 1.5, (8, NUM_TASKS))
SCRIPTED = (10.0 ** SCRIPTED).astype(np.float32)
SCRIPTED[0, 0] = 0.05  # So that every strategy reaches max_weight.

# The paper's weights (float64) of each strategy with a 1/L-like scale.
PAPER_WEIGHTS = {
    "loss_ema": lambda l: 1.0 / ema_history(l, 0.1),
    "rema": reference_rema,
    "dwema": reference_dwema,
    "log_loss": lambda l: 1.0 / l,
    "initial_loss": lambda l: np.broadcast_to(1.0 / l[0], l.shape),
    "geometric_mean": lambda l: np.prod(l, 1, keepdims=True) ** (
        1 / NUM_TASKS) / (NUM_TASKS * l),
}


BOUNDING_OPTIONS = [dict(), dict(normalize=True), dict(max_weight=3.0),
                    dict(normalize=True, max_weight=1.2)]


@pytest.mark.parametrize("name, options", [
    (name, options) for name in sorted(PAPER_WEIGHTS)
    for options in BOUNDING_OPTIONS
    # geometric_mean takes max_weight only.
    if name != "geometric_mean" or "normalize" not in options], ids=str)
def test_bounding_options_match_the_reference(name, options):
  """normalize=True gives T w / Σ w, max_weight gives
  min(w, max_weight) (after normalising), w being the paper's weights."""
  strategy = getattr(optax_mtl, name)(NUM_TASKS, **options)
  expected = PAPER_WEIGHTS[name](SCRIPTED.astype(np.float64))
  if options.get("normalize"):
    expected = NUM_TASKS * expected / expected.sum(1, keepdims=True)
  expected = np.minimum(expected, options.get("max_weight", np.inf))
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for step, losses in enumerate(SCRIPTED):
    _, state = update(jnp.eye(NUM_TASKS), state, task_losses=losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-5,
                               err_msg=f"step {step}")
  assert int(state.num_skipped) == 0
  if "max_weight" in options:  # The scripted run reaches the clip.
    assert np.any(expected == options["max_weight"])


# The smallest losses float32 holds as normal numbers: 1/L ~ 5e37.
TINY_LOSSES = np.array([2e-38, 1e-35, 1.0], np.float32)


@pytest.mark.parametrize("name, reference", [
    ("log_loss", lambda l: 1.0 / l),
    ("loss_ema", lambda l: 1.0 / l),
    ("rema", lambda l: 1.0 / l),
    ("dwema", lambda l: 1.0 / l),
    ("initial_loss", lambda l: 1.0 / l),
    ("geometric_mean", lambda l: np.prod(l) ** (1 / NUM_TASKS) / (
        NUM_TASKS * l)),
])
def test_weights_of_the_smallest_losses_stop_at_1e30(name, reference):
  """Where 1/L reaches 5e37, every weight is at most 1e30 (the first
  step: no history yet)."""
  strategy = getattr(optax_mtl, name)(NUM_TASKS)
  _, state = jax.jit(strategy.update)(
      jnp.eye(NUM_TASKS), strategy.init(None), task_losses=TINY_LOSSES)
  expected = np.minimum(reference(TINY_LOSSES.astype(np.float64)),
                        MAX_WEIGHT)
  assert int(state.num_skipped) == 0
  np.testing.assert_allclose(state.weights, expected, rtol=1e-5)


def test_uncertainty_weights_stop_at_1e30():
  """s below -log(1e30 / c) gives the weight 1e30."""
  strategy = optax_mtl.uncertainty(NUM_TASKS,
                                   initial_log_variances=[-80.0, 0.0, 80.0])
  state = strategy.init(None)
  expected = np.minimum(0.5 * np.exp([80.0, 0.0, -80.0]), MAX_WEIGHT)
  np.testing.assert_allclose(state.weights, expected, rtol=1e-5)

