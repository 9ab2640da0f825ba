"""The optax contract, for every strategy of the table (tests/strategies.py).

Each strategy runs through ``strategies.jitted_update`` (compiled once per
process, shared with the properties, diagnostics and checkpoint tests). The
optax wrappers (chain, apply_if_finite, MultiSteps) do not depend on the
rule: they run on three representative strategies.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
from tests import properties
from tests import strategies

NUM_TASKS = strategies.NUM_TASKS
NAMES = strategies.NAMES
PARAMS = properties.PARAMS


def test_the_table_lists_every_strategy():
  """Every public factory of a strategy has its line in tests/strategies.py."""
  factories = strategies.strategy_factories()
  assert {"equal", "mgda", "upgrad"} <= factories
  named = {name for name, case in strategies.STRATEGIES.items()
           if case.factory is None}  # The others are wrapped strategies.
  missing = sorted(factories - named - set(strategies.SAMPLED_STRATEGIES))
  unknown = sorted(named - factories)
  assert not missing, f"add a line to tests/strategies.py for {missing}"
  assert not unknown, f"not a strategy factory of optax_mtl: {unknown}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_tasks", [0, -1, 2.0, True, None])
def test_num_tasks_must_be_a_positive_integer(name, num_tasks):
  strategies.check_rejects(
      strategies.factory(name), strategies.STRATEGIES[name].kwargs,
      re.escape(f"num_tasks must be an integer >= 1, got {num_tasks!r}"),
      num_tasks=num_tasks)


@pytest.mark.parametrize("name", NAMES)
def test_initial_state_follows_the_conventions(name):
  """weights, num_skipped, and the fields the case's needs and solver imply."""
  case = strategies.STRATEGIES[name]
  strategy = strategies.strategy(name)
  assert optax_mtl.weighting_of(strategy).needs.value == case.needs
  state = strategy.init(PARAMS)
  assert isinstance(state, tuple) and hasattr(state, "_fields"), name
  assert state.weights.shape == (NUM_TASKS,)
  assert state.weights.dtype == jnp.float32
  assert state.num_skipped.shape == () and state.num_skipped.dtype == jnp.int32
  assert int(state.num_skipped) == 0
  if case.needs == "gramian":
    assert state.gradient_cosines.shape == (NUM_TASKS, NUM_TASKS)
    assert state.gradient_cosines.dtype == jnp.float32
  if case.needs == "losses":
    assert "gradient_cosines" not in state._fields
  solver_fields = {"solver_iterations": jnp.int32, "solver_gap": jnp.float32,
                   "solver_converged": jnp.bool_, "solver_outcome": jnp.int32}
  for field, dtype in solver_fields.items():
    assert (field in state._fields) == case.has_solver, (name, field)
    if case.has_solver:
      assert getattr(state, field).shape == (), field
      assert getattr(state, field).dtype == dtype, field
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf, jax.Array), (name, type(leaf))


@pytest.mark.parametrize("name", NAMES)
def test_update_is_the_weighted_sum_and_ignores_unknown_arguments(name):
  case = strategies.STRATEGIES[name]
  strategy = strategies.strategy(name)
  task_grads, losses = properties.task_grads_and_losses(PARAMS)
  state = strategy.init(PARAMS)
  updates, new_state = properties.update(name, task_grads, state, losses)
  assert int(new_state.num_skipped) == 0
  if case.needs != "gradients":
    expected = properties.weighted_sum(new_state.weights, task_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-6),
                 updates, expected)

  # An unknown keyword argument is accepted, and no part of the program
  # reads it (traced, not compiled).
  def with_unknown_argument(unknown):
    return strategy.update(task_grads, state, PARAMS, task_losses=losses,
                           unknown_argument=unknown)

  jaxpr = jax.make_jaxpr(with_unknown_argument)(jnp.ones(2)).jaxpr
  (unknown,) = jaxpr.invars
  used = [var for eqn in jaxpr.eqns for var in eqn.invars] + list(
      jaxpr.outvars)
  assert not any(var is unknown for var in used), name


@pytest.mark.parametrize("name", NAMES)
def test_task_losses_is_a_keyword_argument_required_where_read(name):
  """``task_losses`` is keyword-only; a strategy whose rule reads the losses
  requires it, one that reads only the gradients runs without it."""
  strategy = strategies.strategy(name)
  task_grads, losses = properties.task_grads_and_losses(PARAMS)
  state = strategy.init(PARAMS)
  with pytest.raises(TypeError):  # Keyword-only: not a fourth positional.
    strategy.update(task_grads, state, PARAMS, losses)  # pylint: disable=E1121
  weighting = optax_mtl.weighting_of(strategy)
  reads_losses = optax_mtl._src.step._rule_reads_losses(  # pylint: disable=protected-access
      weighting, task_grads, state)
  chained = optax.chain(strategy, optax.sgd(0.1))
  if reads_losses:
    with pytest.raises(TypeError, match="task_losses"):
      strategy.update(task_grads, state, PARAMS)
    with pytest.raises(TypeError, match="task_losses"):
      chained.update(task_grads, chained.init(PARAMS), PARAMS)
  else:
    assert strategies.STRATEGIES[name].needs != "losses", name
    update, _ = jax.jit(chained.update)(task_grads, chained.init(PARAMS),
                                        PARAMS)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(update))


@pytest.mark.parametrize("name", NAMES)
def test_donated_state_keeps_its_layout_without_recompiling(name):
  """``jit(update, donate_argnums=1)`` runs step after step: no field shares
  a buffer with another, the state keeps its types, shapes and dtypes, and
  the second call reuses the first compilation."""
  task_grads, losses = properties.task_grads_and_losses(PARAMS)
  state = strategies.strategy(name).init(PARAMS)
  layout = strategies.state_layout(state)
  donated = strategies.jitted_update(name)  # donate_argnums=1
  compiled = None
  for step in range(3):
    with warnings.catch_warnings():
      # "Some donated buffers were not usable" is an error here.
      warnings.simplefilter("error")
      _, new_state = donated(task_grads, state, PARAMS,
                             task_losses=losses * (1.0 + 0.1 * step))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state)), name
    assert type(new_state) is type(state)
    assert strategies.state_layout(new_state) == layout, name
    state = new_state
    if compiled is None:
      compiled = donated._cache_size()  # pylint: disable=protected-access
    assert donated._cache_size() == compiled  # pylint: disable=protected-access
  assert int(state.num_skipped) == 0


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_gives_the_plain_factorys_update(name):
  """``optax.inject_hyperparams`` with the case's static arguments: the
  numeric hyperparameters live in the state as arrays, and the update equals
  the plain factory's with the same values."""
  case = strategies.STRATEGIES[name]
  factory = strategies.factory(name)
  arguments = {**case.kwargs, **case.hyperparams}
  injected = optax.inject_hyperparams(factory, static_args=case.static_args)(
      num_tasks=NUM_TASKS, **arguments)
  plain = factory(NUM_TASKS, **arguments)

  @jax.jit
  def both(task_grads, losses, injected_state, plain_state):
    return (injected.update(task_grads, injected_state, PARAMS,
                            task_losses=losses),
            plain.update(task_grads, plain_state, PARAMS, task_losses=losses))

  injected_state = injected.init(PARAMS)
  assert set(case.hyperparams) <= set(injected_state.hyperparams), name
  for key, value in case.hyperparams.items():
    np.testing.assert_allclose(injected_state.hyperparams[key], value,
                               rtol=1e-7)
  plain_state = plain.init(PARAMS)
  # A hyperparameter as a float32 array instead of a Python float changes
  # the rounding, and so where an iterative solver stops.
  rtol = max(case.rtol, 1e-5)
  for task_grads, losses in properties.random_steps(seed=8, num_steps=2):
    (injected_update, injected_state), (plain_update, plain_state) = both(
        task_grads, losses, injected_state, plain_state)
    np.testing.assert_allclose(injected_state.inner_state.weights,
                               plain_state.weights, rtol=rtol, atol=1e-7)
    properties.assert_close_updates(
        injected_update, plain_update, rtol=rtol,
        size=properties.term_size(plain_state.weights, task_grads),
        message=name)
  assert int(plain_state.num_skipped) == 0


# --------------------------------------------------------------------------
# optax wrappers, on three representative strategies.
# --------------------------------------------------------------------------

def _shared(name):
  """A strategy of the table and its shared compiled update."""
  return strategies.strategy(name), (
      lambda grads, state, losses: properties.update(name, grads, state,
                                                     losses))


def _recompute_every():
  strategy = optax_mtl.recompute_every(strategies.build("mgda"), 2)
  update = jax.jit(strategy.update)
  return strategy, lambda grads, state, losses: update(
      grads, state, PARAMS, task_losses=losses)


REPRESENTATIVES = {
    "loss_only": lambda: _shared("loss_ema"),
    "gramian": lambda: _shared("upgrad"),
    "recompute_every": _recompute_every,
}
NUM_STEPS = 4
NAN_STEP = 2  # The step of the apply_if_finite stream with a NaN gradient.


def _weights(state):
  """The weights of a strategy state (inside a wrapper's inner_state)."""
  return getattr(state, "inner_state", state).weights


def _wrapper_runs(strategy, bare_update):
  """The bare strategy, and its three wrapped versions in one compiled scan.

  Returns per step the updates and weights of ``bare_update`` (clean
  inputs, and inputs with a NaN gradient at NAN_STEP), and the updates and
  strategy weights of ``chain(strategy, adam)``,
  ``chain(strategy, apply_if_finite(adam))`` (on the NaN stream) and
  ``chain(strategy, MultiSteps(adam, 2))``.
  """
  adam = optax.adam(1e-2)
  wrapped = {
      "chain": optax.chain(strategy, adam),
      "apply_if_finite": optax.chain(
          strategy, optax.apply_if_finite(adam, max_consecutive_errors=3)),
      "multi_steps": optax.chain(
          strategy, optax.MultiSteps(adam, every_k_schedule=2)),
  }
  steps = properties.random_steps(seed=9, num_steps=NUM_STEPS)
  task_grads = jax.tree.map(lambda *g: jnp.stack(g), *[s[0] for s in steps])
  losses = jnp.stack([s[1] for s in steps])
  nan_grads = jax.tree.map(lambda g: g.at[NAN_STEP, 0].set(jnp.nan),
                           task_grads)

  out = {}
  for key, stream in (("bare", task_grads), ("bare_nan", nan_grads)):
    state, updates, weights = strategy.init(PARAMS), [], []
    for index in range(NUM_STEPS):
      update, state = bare_update(_step(stream, index), state, losses[index])
      updates.append(update)
      weights.append(_weights(state))
    out[key] = (jax.tree.map(lambda *u: jnp.stack(u), *updates),
                jnp.stack(weights))

  @jax.jit
  def scan(task_grads, nan_grads, losses):
    def body(states, inputs):
      grads, nan_step_grads, step_losses = inputs
      out = {}
      new_states = {}
      for key, tx in wrapped.items():
        stream = nan_step_grads if key == "apply_if_finite" else grads
        update, new_states[key] = tx.update(stream, states[key], PARAMS,
                                            task_losses=step_losses)
        out[key] = (update, _weights(new_states[key][0]))
      return new_states, out

    initial = {key: tx.init(PARAMS) for key, tx in wrapped.items()}
    return jax.lax.scan(body, initial, (task_grads, nan_grads, losses))[1]

  return {**out, **scan(task_grads, nan_grads, losses)}


def _step(tree, index):
  return jax.tree.map(lambda leaf: leaf[index], tree)


def _assert_trees_close(actual, expected, message):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-7, err_msg=message), actual, expected)


@pytest.mark.parametrize("kind", sorted(REPRESENTATIVES))
def test_wrappers_apply_adam_to_the_strategys_update(kind):
  out = _wrapper_runs(*REPRESENTATIVES[kind]())
  adam = optax.adam(1e-2)
  bare_updates, bare_weights = out["bare"]
  for key in ("chain", "multi_steps"):
    # The strategy's state advances at every (micro) step as on its own.
    np.testing.assert_allclose(out[key][1], bare_weights, rtol=1e-6,
                               err_msg=key)

  # chain: adam applied to the strategy's update.
  adam_state = adam.init(PARAMS)
  for index in range(NUM_STEPS):
    expected, adam_state = adam.update(_step(bare_updates, index), adam_state,
                                       PARAMS)
    _assert_trees_close(_step(out["chain"][0], index), expected,
                        f"chain, step {index}")

  # apply_if_finite: the step with a NaN gradient gives zeros and leaves
  # adam's state alone; the other steps are adam's. A strategy that reads
  # the gradients excludes the task with the NaN itself: every update it
  # returns is finite, and adam applies to all of them.
  nan_updates, nan_weights = out["bare_nan"]
  np.testing.assert_allclose(out["apply_if_finite"][1], nan_weights, rtol=1e-6)
  adam_state = adam.init(PARAMS)
  for index in range(NUM_STEPS):
    bare = _step(nan_updates, index)
    finite = all(bool(jnp.all(jnp.isfinite(leaf)))
                 for leaf in jax.tree.leaves(bare))
    assert finite == (index != NAN_STEP or kind != "loss_only"), index
    if finite:
      expected, adam_state = adam.update(bare, adam_state, PARAMS)
    else:
      expected = jax.tree.map(jnp.zeros_like, PARAMS)
    _assert_trees_close(_step(out["apply_if_finite"][0], index), expected,
                        f"apply_if_finite, step {index}")

  # MultiSteps(k=2): zeros on the first micro-step, then adam applied to the
  # mean of the two updates.
  adam_state = adam.init(PARAMS)
  for index in range(NUM_STEPS):
    if index % 2 == 0:
      expected = jax.tree.map(jnp.zeros_like, PARAMS)
    else:
      mean = jax.tree.map(lambda a, b: (a + b) / 2,
                          _step(bare_updates, index - 1),
                          _step(bare_updates, index))
      expected, adam_state = adam.update(mean, adam_state, PARAMS)
    _assert_trees_close(_step(out["multi_steps"][0], index), expected,
                        f"multi_steps, step {index}")


def test_inject_hyperparams_without_static_num_tasks():
  """``optax.inject_hyperparams(optax_mtl.loss_ema)(num_tasks=3, beta=0.1)``:
  num_tasks arrives as a concrete int32 array, read as its value outside
  jit; inside jit it is traced, and the error names the static_args to
  pass."""
  injected = optax.inject_hyperparams(optax_mtl.loss_ema)(num_tasks=NUM_TASKS,
                                                      beta=0.1)
  state = injected.init(PARAMS)
  assert int(state.hyperparams["num_tasks"]) == NUM_TASKS
  plain = optax_mtl.loss_ema(NUM_TASKS, beta=0.1)
  task_grads, losses = next(iter(properties.random_steps(seed=3,
                                                         num_steps=1)))
  update, new_state = injected.update(task_grads, state, PARAMS,
                                      task_losses=losses)
  plain_update, plain_state = plain.update(task_grads, plain.init(PARAMS),
                                           PARAMS, task_losses=losses)
  np.testing.assert_allclose(new_state.inner_state.weights,
                             plain_state.weights, rtol=1e-6)
  properties.assert_close_updates(
      update, plain_update, rtol=1e-6,
      size=properties.term_size(plain_state.weights, task_grads))
  with pytest.raises(ValueError, match=r"static_args=\('num_tasks',\)"):
    jax.jit(lambda s: injected.update(task_grads, s, PARAMS,
                                      task_losses=losses))(state)
