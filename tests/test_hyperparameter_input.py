"""Hyperparameters as a user passes them to a strategy's factory.

What is guaranteed, for every numeric hyperparameter and flag of every
strategy of the table (found from the factories' signatures, plus the ones
named below, which are checked even if a signature changes):

- a non-finite number (inf, -inf, NaN) raises a ValueError naming the
  argument when the strategy is built;
- a flag that is not a boolean (``"no"``, 1, 0.0, None) raises a ValueError
  naming the argument (it is never read as its truth value);
- a NumPy scalar (``np.float32``, ``np.float64``, ``np.int64``,
  ``np.bool_``, e.g. from a config file or ``np.sum(mask)``) builds the very
  same computation as the Python number of the same value: init and three
  updates trace to the same operations and the same constants.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import strategies

NUM_TASKS = 3
INF, NAN = float("inf"), float("nan")


def _parameters(predicate):
  cases = []
  for name in strategies.NAMES:
    signature = inspect.signature(strategies.factory(name))
    for parameter in signature.parameters.values():
      if parameter.name != "num_tasks" and predicate(parameter.default):
        cases.append((name, parameter.name, parameter.default))
  return cases


def _with_defaults(named):
  """``(name, parameter, default)`` for each ``(name, parameter)``."""
  return [(name, parameter, inspect.signature(strategies.factory(name))
           .parameters[parameter].default) for name, parameter in named]


def _union(*case_lists):
  return sorted({case: None for cases in case_lists for case in cases})


def _is_float(value):
  return isinstance(value, float)


def _is_int(value):
  return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value):
  return isinstance(value, bool)


# Checked by name as well as found from the signatures.
NAMED_FLOAT_PARAMETERS = _with_defaults([
    ("lbtw", "alpha"), ("gradnorm", "learning_rate"), ("gradnorm", "alpha"),
    ("cagrad", "c"), ("mgda", "min_relative_norm"),
    ("normalized_gradients", "min_relative_norm"),
    ("loss_ema", "beta"), ("uncertainty", "learning_rate")])
NAMED_FLAGS = _with_defaults([
    ("equal", "mean"), ("lbtw", "normalize"), ("loss_ema", "normalize")])

FLOAT_PARAMETERS = _union(_parameters(_is_float), NAMED_FLOAT_PARAMETERS)
FLAGS = _union(_parameters(_is_bool), NAMED_FLAGS)
# Optional real hyperparameters (default None) of the loss strategies.
OPTIONAL_FLOAT_PARAMETERS = [
    (name, "max_weight") for name in (
        "loss_ema", "rema", "dwema", "log_loss", "initial_loss",
        "geometric_mean", "uncertainty")] + [("geometric_mean", "gamma")]


@pytest.mark.parametrize(
    "name, parameter",
    [case[:2] for case in FLOAT_PARAMETERS] + OPTIONAL_FLOAT_PARAMETERS)
@pytest.mark.parametrize("value", [INF, -INF, NAN])
def test_non_finite_hyperparameter_is_rejected(name, parameter, value):
  """alpha=inf, c=inf, learning_rate=inf, eps=inf, ... raise ValueError."""
  factory = functools.partial(strategies.build, name)
  with pytest.raises(ValueError, match=parameter):
    factory(**{parameter: value})


# Three steps of ordinary losses: the weights read their hyperparameters
# from the first step (an EMA's beta from the second, DWA's temperature from
# the third).
_RNG = np.random.default_rng(5)
_PARAMS = jnp.zeros(4)
_STEPS = [(jnp.asarray(_RNG.normal(size=(NUM_TASKS, 4)), jnp.float32),
           jnp.asarray(_RNG.uniform(0.1, 10.0, NUM_TASKS), jnp.float32))
          for _ in range(3)]


def _traced_steps(strategy):
  """The jaxpr of ``init`` and three updates: its text and its constants."""

  def steps():
    state = strategy.init(_PARAMS)
    for task_grads, losses in _STEPS:
      update, state = strategy.update(task_grads, state, _PARAMS,
                                      task_losses=losses)
    return update, state

  closed = jax.make_jaxpr(steps)()
  return str(closed.jaxpr), [np.asarray(c).tolist() for c in closed.consts]


def assert_same_computation(name, numpy_kwargs, python_kwargs):
  """The strategy built with NumPy scalars traces exactly as with Python
  numbers (the same operations, literals and constants)."""
  numpy_trace = _traced_steps(strategies.build(name, **numpy_kwargs))
  python_trace = _traced_steps(strategies.build(name, **python_kwargs))
  assert numpy_trace[0] == python_trace[0], (name, numpy_kwargs)
  assert numpy_trace[1] == python_trace[1], (name, numpy_kwargs)


@pytest.mark.parametrize("name, parameter, default", FLOAT_PARAMETERS)
@pytest.mark.parametrize("numpy_type", [np.float32, np.float64])
def test_numpy_float_hyperparameter_is_the_python_number(
    name, parameter, default, numpy_type):
  """beta=np.float32(0.5) and the like."""
  value = numpy_type(default)
  assert_same_computation(name, {parameter: value},
                          {parameter: float(value)})


@pytest.mark.parametrize(
    "name, parameter, value",
    [(name, parameter, default) for name, parameter, default in
     _parameters(_is_int) if parameter != "seed"]
    + [(name, "steps_per_epoch", 4) for name in ("dwa", "lbtw")])
def test_numpy_integer_hyperparameter_is_the_python_number(
    name, parameter, value):
  """steps_per_epoch=np.int64(100), max_iters=np.int64(...)."""
  assert_same_computation(name, {parameter: np.int64(value)},
                          {parameter: value})


@pytest.mark.parametrize("name", strategies.NAMES)
def test_numpy_num_tasks_is_accepted(name):
  """num_tasks=np.int64(3), e.g. from np.sum(mask)."""
  strategy = strategies.build(name, num_tasks=np.int64(NUM_TASKS))
  assert strategy.init(_PARAMS).weights.shape == (NUM_TASKS,)


@pytest.mark.parametrize("name, parameter, default", FLAGS)
def test_non_boolean_flag_is_rejected(name, parameter, default):
  """equal(mean="no") raises instead of meaning mean=True; np.bool_ is the
  Python boolean."""
  factory = functools.partial(strategies.build, name)
  for value in ("no", 1, 0.0, None):
    with pytest.raises(ValueError, match=parameter):
      factory(**{parameter: value})
  assert_same_computation(name, {parameter: np.bool_(default)},
                          {parameter: default})


def test_equal_mean_flag():
  np.testing.assert_allclose(
      optax_mtl.equal(NUM_TASKS, mean=np.bool_(True)).init(None).weights,
      1.0 / NUM_TASKS)


@pytest.mark.parametrize("value", ["no", 1, [True, "no", False],
                                   [1, 0, 1]])
def test_uncertainty_classification_must_be_booleans(value):
  with pytest.raises(ValueError, match="classification"):
    optax_mtl.uncertainty(NUM_TASKS, classification=value)


def test_uncertainty_classification_accepts_numpy_booleans():
  state = optax_mtl.uncertainty(
      NUM_TASKS, classification=[np.bool_(True), False, np.bool_(False)]
  ).init(None)
  np.testing.assert_allclose(state.weights, [1.0, 0.5, 0.5])
