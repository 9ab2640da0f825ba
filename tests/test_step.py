"""The shared step, the wrappers and the engine's handling of unusual input."""

import functools
import inspect
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl

NUM_TASKS = 2


def loss_fn(params, inputs):
  hidden = jnp.tanh(inputs @ params["trunk"])
  predictions = hidden @ params["heads"].T
  return jnp.mean((predictions - jnp.arange(float(NUM_TASKS))) ** 2, axis=0)


def make_params():
  keys = jax.random.split(jax.random.key(1), 3)
  params = {"trunk": jax.random.normal(keys[0], (3, 4)),
            "heads": jax.random.normal(keys[1], (NUM_TASKS, 4))}
  return params, jax.random.normal(keys[2], (8, 3))


# --------------------------------------------------------------------------
# The strategy carries its weighting: the rule is part of the strategy.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rebuild", ["replace_init", "pytree", "static_jit"])
def test_rebuilt_strategy_still_runs_in_value_and_grad(rebuild):
  params, inputs = make_params()
  strategy = optax_mtl.mgda(NUM_TASKS)
  if rebuild == "replace_init":
    rebuilt = strategy._replace(init=lambda p: strategy.init(p))
  elif rebuild == "pytree":
    leaves, treedef = jax.tree.flatten(strategy)
    rebuilt = jax.tree.unflatten(treedef, leaves)
  else:
    rebuilt = strategy._replace()  # An equal strategy, a distinct object.
  assert rebuilt is not strategy
  assert optax_mtl.weighting_of(rebuilt) is optax_mtl.weighting_of(strategy)
  if rebuild == "static_jit":  # The strategy as a static argument of jit.
    seen = []

    def static_step(s, *args):
      seen.append(optax_mtl.weighting_of(s))  # At trace time.
      return optax_mtl.value_and_grad(loss_fn, s)(*args)

    step = functools.partial(jax.jit(static_step, static_argnums=0), rebuilt)
  else:
    step = jax.jit(optax_mtl.value_and_grad(loss_fn, rebuilt))
  expected = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))(
      params, strategy.init(params), inputs)
  got = step(params, rebuilt.init(params), inputs)
  if rebuild == "static_jit":
    assert seen and seen[0] is optax_mtl.weighting_of(strategy)
  for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(have, want)


def test_a_chain_is_refused_with_a_clear_message():
  chained = optax.chain(optax_mtl.loss_ema(NUM_TASKS), optax.adam(1e-3))
  with pytest.raises(ValueError, match="optax_mtl strategy .* got"):
    optax_mtl.value_and_grad(loss_fn, chained)
  with pytest.raises(ValueError, match="optax_mtl strategy"):
    optax_mtl.recompute_every(chained, 2)


def test_missing_task_losses_is_a_type_error_naming_it():
  strategy = optax_mtl.loss_ema(NUM_TASKS)
  with pytest.raises(TypeError, match="task_losses"):
    strategy.update(jnp.eye(NUM_TASKS), strategy.init(None))  # pylint: disable=missing-kwoa


# --------------------------------------------------------------------------
# The wrappers.
# --------------------------------------------------------------------------


def test_recompute_every_state_names_its_inner_state_and_forwards_nothing():
  strategy = optax_mtl.recompute_every(optax_mtl.mgda(NUM_TASKS), 3)
  state = strategy.init(None)
  assert isinstance(state, optax_mtl.RecomputeEveryState)
  assert state._fields == ("inner_state", "steps_since_update")
  assert isinstance(state.inner_state, optax_mtl.MgdaState)
  with pytest.raises(AttributeError):
    _ = state.no_such_field
  with pytest.raises(ValueError, match="already recomputes"):
    optax_mtl.recompute_every(strategy, 2)


def test_recompute_every_state_old_spellings_warn_and_read_the_same():
  state = optax_mtl.recompute_every(optax_mtl.mgda(NUM_TASKS), 3).init(None)
  with pytest.warns(DeprecationWarning,
                    match=r"RecomputeEveryState\.inner_state"):
    inner = state.inner
  assert inner is state.inner_state
  with pytest.warns(DeprecationWarning,
                    match=r"state\.inner_state\.solver_gap"):
    gap = state.solver_gap
  assert gap is state.inner_state.solver_gap


def test_recompute_every_counts_rejected_losses_on_reuse_steps():
  strategy = optax_mtl.recompute_every(optax_mtl.loss_ema(NUM_TASKS), 4)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  _, state = update(jnp.eye(2), state, task_losses=jnp.array([1.0, 2.0]))
  for bad in (jnp.nan, jnp.inf, 0.0):
    _, state = update(jnp.eye(2), state, task_losses=jnp.array([1.0, bad]))
  # loss_ema is per task: each bad loss is counted for its task, no step is
  # rejected as a whole; a step with no valid loss is.
  inner = state.inner_state
  assert int(inner.num_skipped) == 0
  np.testing.assert_array_equal(inner.num_rejected_losses, [0, 3])
  assert int(state.steps_since_update) == 4
  np.testing.assert_allclose(inner.weights, [1.0, 0.5])
  _, state = update(jnp.eye(2), state, task_losses=jnp.array([0.0, jnp.nan]))
  assert int(state.inner_state.num_skipped) == 1
  np.testing.assert_array_equal(state.inner_state.num_rejected_losses, [1, 4])


@pytest.mark.parametrize("wrapper", ["recompute_every", "smooth_weights"])
def test_weight_wrappers_refuse_a_gradient_rule_when_wrapping(wrapper):
  wrap = (functools.partial(optax_mtl.recompute_every, every=2)
          if wrapper == "recompute_every" else optax_mtl.smooth_weights)
  with pytest.raises(ValueError, match=r"graddrop is a GradientRule.*"
                     r"optax_mtl\.mgda"):
    wrap(optax_mtl.graddrop(NUM_TASKS))


def test_with_shared_parameters_accepts_a_prefix_and_rejects_a_wrong_tree():
  task_grads = {"trunk": {"w": jnp.ones((2, 3)), "b": jnp.ones((2,))},
                "heads": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
  prefix = optax_mtl.with_shared_parameters(
      optax_mtl.imtl_g(2), {"trunk": True, "heads": False})
  update, _ = prefix.update(task_grads, prefix.init(None),
                            task_losses=jnp.ones(2))
  np.testing.assert_allclose(update["heads"], [1.0, 3.0])
  wrong = optax_mtl.with_shared_parameters(
      optax_mtl.imtl_g(2), {"trunk": True, "head": False})
  with pytest.raises(ValueError, match="structure of the params"):
    wrong.update(task_grads, wrong.init(None), task_losses=jnp.ones(2))
  not_bools = optax_mtl.with_shared_parameters(
      optax_mtl.imtl_g(2), {"trunk": 1, "heads": 0})
  with pytest.raises(ValueError, match="Python bools"):
    not_bools.update(task_grads, not_bools.init(None), task_losses=jnp.ones(2))


# --------------------------------------------------------------------------
# The engine on unusual input.
# --------------------------------------------------------------------------


def test_a_tuple_without_has_aux_says_to_pass_has_aux():
  params, inputs = make_params()
  strategy = optax_mtl.loss_ema(NUM_TASKS)
  step = optax_mtl.value_and_grad(
      lambda p, x: (loss_fn(p, x), {"aux": 1.0}), strategy)
  with pytest.raises(ValueError, match="has_aux=True"):
    step(params, strategy.init(params), inputs)


def test_task_losses_as_a_list_are_stacked():
  strategy = optax_mtl.loss_ema(NUM_TASKS)
  update, state = strategy.update(
      jnp.eye(2), strategy.init(None),
      task_losses=[jnp.asarray(2.0), jnp.asarray(4.0)])
  np.testing.assert_allclose(state.weights, [0.5, 0.25])
  np.testing.assert_allclose(update, [0.5, 0.25])


@pytest.mark.parametrize("name", ["loss_ema", "mgda"])
@pytest.mark.parametrize("mode", ["jacobian", "low_memory"])
def test_integer_parameters_get_a_zero_gradient(name, mode):
  params, inputs = make_params()
  params = dict(params, step=jnp.asarray(3, jnp.int32))
  strategy = getattr(optax_mtl, name)(NUM_TASKS)
  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy,
                                          gramian_mode=mode))
  (_, grads), state = step(params, strategy.init(params), inputs)
  assert grads["step"].dtype == jax.dtypes.float0
  plain = {k: v for k, v in params.items() if k != "step"}
  (_, expected), _ = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))(
      plain, strategy.init(plain), inputs)
  for key in plain:
    np.testing.assert_allclose(grads[key], expected[key], rtol=1e-5)
  assert int(state.num_skipped) == 0


def test_empty_params_give_a_clear_error():
  strategy = optax_mtl.mgda(NUM_TASKS)
  step = optax_mtl.value_and_grad(lambda p: jnp.ones(NUM_TASKS), strategy)
  with pytest.raises(ValueError, match="params has no array leaves"):
    step({}, strategy.init({}))
  with pytest.raises(ValueError, match="task_grads has no array leaves"):
    strategy.update({}, strategy.init({}), task_losses=jnp.ones(NUM_TASKS))


def test_float16_losses_give_the_optax_face_gradient():
  """Weights like 1/L overflow float16; the step must not return -inf."""
  params = jnp.ones(3, jnp.float16)
  target = jnp.full(3, 0.9983, jnp.float16)

  def float16_loss(p, x):
    return jnp.stack([jnp.sum((p - x) ** 2), jnp.sum(p ** 2)])

  strategy = optax_mtl.log_loss(2)
  (losses, grads), state = jax.jit(optax_mtl.value_and_grad(
      float16_loss, strategy))(params, strategy.init(params), target)
  assert float(losses[0]) < 1.5e-5  # 1/L is beyond float16's range.
  task_grads = jax.jacrev(float16_loss)(params, target)
  expected, _ = strategy.update(task_grads, strategy.init(params),
                                task_losses=losses)
  assert bool(jnp.all(jnp.isfinite(grads)))
  np.testing.assert_allclose(np.asarray(grads, np.float32),
                             np.asarray(expected, np.float32), rtol=1e-2)
  assert int(state.num_skipped) == 0


def test_update_is_not_jitted_inside_and_jit_compiles_it_once():
  strategy = optax_mtl.mgda(3)
  assert not hasattr(strategy.update, "_compiled")
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for scale in (1.0, 2.0, 3.0, 4.0):
    _, state = update(jnp.eye(3) * scale, state, task_losses=jnp.ones(3))
  assert update._cache_size() == 1  # pylint: disable=protected-access


# --------------------------------------------------------------------------
# The guard.
# --------------------------------------------------------------------------


class _CountState(NamedTuple):
  weights: jax.Array  # f32[T].
  num_skipped: jax.Array  # i32[].
  total: jax.Array  # f32[], a statistic that can overflow.


def _overflowing_sum():
  """Adds the losses into a statistic that overflows on a huge loss."""

  def init():
    return _CountState(**optax_mtl.common_state_fields(NUM_TASKS),
                       total=jnp.zeros([], jnp.float32))

  def rule(task_losses, state, gramian):
    del gramian
    total = state.total + jnp.sum(task_losses) * 1e30
    return jnp.ones(NUM_TASKS), state._replace(total=total)

  return optax_mtl.as_gradient_transformation(optax_mtl.Weighting(
      num_tasks=NUM_TASKS, needs=optax_mtl.Needs.LOSSES, init=init,
      rule=rule, requires_positive_losses=False))


def test_guard_rejects_a_step_whose_new_state_is_not_finite():
  strategy = _overflowing_sum()
  update = jax.jit(strategy.update)
  _, state = update(jnp.eye(2), strategy.init(None), task_losses=jnp.ones(2))
  _, rejected = update(jnp.eye(2), state, task_losses=jnp.full(2, 1e10))
  assert int(rejected.num_skipped) == 1
  np.testing.assert_array_equal(rejected.total, state.total)
  _, recovered = update(jnp.eye(2), rejected, task_losses=jnp.ones(2))
  assert int(recovered.num_skipped) == 1
  np.testing.assert_allclose(recovered.total, 4e30)


def _sum_of_absolute_values(deprecated_weighting=False):
  """A gradient rule: the coordinate-wise sum of |g_k| (a test rule)."""

  def init(params):
    del params
    return _CountState(**optax_mtl.common_state_fields(NUM_TASKS),
                       total=jnp.zeros([], jnp.float32))

  def rule(task_losses, state, task_grads):
    del task_losses
    return jax.tree.map(lambda g: jnp.sum(jnp.abs(g), axis=0),
                        task_grads), state

  if deprecated_weighting:  # The spelling of optax_mtl 0.1.
    return optax_mtl.as_gradient_transformation(optax_mtl.Weighting(
        num_tasks=NUM_TASKS, needs=optax_mtl.Needs.GRADIENTS, init=init,
        rule=rule, requires_positive_losses=False))
  return optax_mtl.as_gradient_transformation(optax_mtl.GradientRule(
      num_tasks=NUM_TASKS, init=init, rule=rule))


def test_a_gradients_weighting_warns_and_is_the_same_gradient_rule():
  with pytest.warns(DeprecationWarning, match="optax_mtl.GradientRule"):
    old = _sum_of_absolute_values(deprecated_weighting=True)
  new = _sum_of_absolute_values()
  assert isinstance(optax_mtl.weighting_of(old), optax_mtl.GradientRule)
  grads = jnp.array([[1.0, -2.0], [-3.0, 0.5]])
  old_update, old_state = old.update(grads, old.init(None))
  new_update, new_state = new.update(grads, new.init(None))
  np.testing.assert_array_equal(old_update, new_update)
  for have, want in zip(old_state, new_state):
    np.testing.assert_array_equal(have, want)


@pytest.mark.parametrize("shared", [None, {"trunk": True, "heads": False}])
def test_gradient_strategies_read_the_jacobian_in_both_faces(shared):
  params, inputs = make_params()
  strategy = _sum_of_absolute_values()
  (losses, grads), state = jax.jit(optax_mtl.value_and_grad(
      loss_fn, strategy, shared=shared))(params, strategy.init(params), inputs)
  jacobian = jax.jacrev(loss_fn)(params, inputs)
  expected = {key: np.abs(np.asarray(value)).sum(axis=0)
              for key, value in jacobian.items()}
  if shared is not None:  # The heads get their own task's gradient.
    expected["heads"] = np.asarray(jacobian["heads"]).sum(axis=0)
  for key in expected:
    np.testing.assert_allclose(grads[key], expected[key], rtol=1e-5,
                               atol=1e-7)
  face = strategy if shared is None else optax_mtl.with_shared_parameters(
      strategy, shared)
  update, _ = face.update(jacobian, face.init(params), params,
                          task_losses=losses)
  for key in expected:
    np.testing.assert_allclose(update[key], expected[key], rtol=1e-5,
                               atol=1e-7)
  assert int(state.num_skipped) == 0


def test_gradient_strategies_exclude_a_task_with_a_non_finite_gradient():
  strategy = _sum_of_absolute_values()
  update, state = strategy.update(
      jnp.array([[1.0, jnp.nan], [0.0, 1.0]]), strategy.init(None),
      task_losses=jnp.ones(2))
  np.testing.assert_array_equal(update, [0.0, 1.0])  # Task 1's alone.
  assert int(state.num_skipped) == 0
  update, state = strategy.update(
      jnp.full((2, 2), jnp.nan), state, task_losses=jnp.ones(2))
  np.testing.assert_array_equal(update, [0.0, 0.0])  # No task left.
  assert int(state.num_skipped) == 1


def test_gradient_strategies_on_the_representation():
  params, inputs = make_params()
  strategy = _sum_of_absolute_values()
  encoder = lambda p, x: jnp.tanh(x @ p["trunk"])
  heads = lambda p, z, x: jnp.mean(
      (z @ p["heads"].T - jnp.arange(float(NUM_TASKS))) ** 2, axis=0)
  (_, grads), _ = jax.jit(optax_mtl.value_and_grad(
      heads, strategy, encoder_fn=encoder))(params, strategy.init(params),
                                            inputs)
  representation, encoder_vjp = jax.vjp(lambda p: encoder(p, inputs), params)
  representation_jacobian = jax.jacrev(
      lambda z: heads(params, z, inputs))(representation)
  combined = np.abs(np.asarray(representation_jacobian)).sum(axis=0)
  expected_trunk = encoder_vjp(jnp.asarray(combined))[0]["trunk"]
  np.testing.assert_allclose(grads["trunk"], expected_trunk, rtol=1e-5,
                             atol=1e-7)
  own_heads = jax.grad(lambda p: jnp.sum(heads(p, representation, inputs)))(
      params)["heads"]
  np.testing.assert_allclose(grads["heads"], own_heads, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# Rules that read the per-task gradients see the shared parameters only.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["moco", "db_mtl", "excess_mtl", "graddrop",
                                  "modo", "sdmgrad"])
def test_gradient_rules_read_only_the_shared_parameters(name):
  """With shared parameters declared, the heads' gradients do not move the
  trunk's update; each head gets its own task's gradient."""
  strategy = getattr(optax_mtl, name)(3)
  num_samples = optax_mtl.weighting_of(strategy).num_samples
  lead = (num_samples, 3) if num_samples > 1 else (3,)
  keys = jax.random.split(jax.random.key(0), 3)
  trunk = jax.random.normal(keys[0], lead + (4,))
  params = {"trunk": jnp.zeros(4), "heads": jnp.zeros(2)}
  shared = {"trunk": True, "heads": False}
  updates = []
  for key in keys[1:]:
    heads = 10.0 * jax.random.normal(key, lead + (2,))
    task_grads = {"trunk": trunk, "heads": heads}
    for face in ("optax", "step"):
      if face == "optax":
        wrapped = optax_mtl.with_shared_parameters(strategy, shared)
        update, _ = wrapped.update(task_grads, wrapped.init(params), params,
                                   task_losses=jnp.ones(3))
      else:  # The guard itself, as the training-step face calls it.
        update, _ = optax_mtl._src.step.guarded(
            optax_mtl.weighting_of(strategy), jnp.ones(3),
            strategy.init(params), lambda: task_grads, own_gradients=shared)
      mean_heads = heads.mean(axis=0) if num_samples > 1 else heads
      np.testing.assert_allclose(update["heads"], mean_heads.sum(axis=0),
                                 rtol=1e-6)
      updates.append(update["trunk"])
  # The same trunk update for both heads' gradients (jit and eager may
  # round differently, so each face against itself).
  np.testing.assert_array_equal(updates[0], updates[2])
  np.testing.assert_array_equal(updates[1], updates[3])


PARAMS_SHAPED = {"moco": optax_mtl.moco, "db_mtl": optax_mtl.db_mtl,
                 "excess_mtl": optax_mtl.excess_mtl,
                 "gradvac(groups='leaf')": functools.partial(
                     optax_mtl.gradvac, groups="leaf")}


@pytest.mark.parametrize("name", sorted(PARAMS_SHAPED))
def test_a_params_shaped_state_from_init_none_says_to_pass_the_params(name):
  strategy = PARAMS_SHAPED[name](3)
  assert optax_mtl.weighting_of(strategy).state_like_params
  with pytest.raises(ValueError, match=re.escape(name) + r" keeps .*"
                     r"strategy.init\(params\)"):
    strategy.init(None)


@pytest.mark.parametrize("name", sorted(PARAMS_SHAPED) + ["modo"])
def test_encoder_fn_is_refused_when_the_step_is_built(name):
  """A rule whose state is shaped like the params, or that samples
  minibatches, cannot read the representation: refused by value_and_grad
  itself, with the strategy's name and what to use instead."""
  factory = PARAMS_SHAPED.get(name, getattr(optax_mtl, name, None))
  with pytest.raises(ValueError, match=re.escape(name) + r" .*encoder_fn.*"
                     r"optax_mtl\.upgrad"):
    optax_mtl.value_and_grad(
        lambda p, z, x: jnp.sum(z @ p["heads"], axis=0), factory(3),
        encoder_fn=lambda p, x: jnp.tanh(x @ p["trunk"]))


# --------------------------------------------------------------------------
# Errors that say what to do.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["upgrad", "mgda", "pcgrad", "graddrop"])
def test_a_strategy_that_reads_only_gradients_needs_no_task_losses(name):
  strategy = getattr(optax_mtl, name)(2)
  grads = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  update, _ = strategy.update(grads, strategy.init(None))
  expected, _ = strategy.update(grads, strategy.init(None),
                                task_losses=jnp.array([3.0, 7.0]))
  np.testing.assert_array_equal(update, expected)


@pytest.mark.parametrize("name", ["loss_ema", "imtl", "gradnorm"])
def test_a_strategy_that_reads_the_losses_asks_for_them(name):
  strategy = getattr(optax_mtl, name)(2)
  with pytest.raises(TypeError, match=r"reads the per-task losses: pass "
                     r"task_losses="):
    strategy.update(jnp.eye(2), strategy.init(None))


def test_losses_as_a_list_or_a_dict_point_to_jnp_stack():
  params, inputs = make_params()
  strategy = optax_mtl.loss_ema(NUM_TASKS)
  as_list = lambda p, x: list(loss_fn(p, x))
  with pytest.raises(ValueError, match=r"list of 2 items: .*jnp\.stack"):
    optax_mtl.value_and_grad(as_list, strategy)(params, strategy.init(None),
                                                inputs)
  as_dict = lambda p, x: dict(zip("ab", loss_fn(p, x)))
  with pytest.raises(ValueError, match=r"got a dict with keys \['a', 'b'\]: "
                     r".*jnp\.stack"):
    optax_mtl.value_and_grad(as_dict, strategy)(params, strategy.init(None),
                                                inputs)


# --------------------------------------------------------------------------
# A rule rejects a step by returning accepted=False.
# --------------------------------------------------------------------------


def _rejecting(kind):
  """A rule that accepts a step only when the first loss is below 10."""

  def init(params=None):
    del params
    return _CountState(**optax_mtl.common_state_fields(NUM_TASKS),
                       total=jnp.zeros([], jnp.float32))

  def rule(task_losses, state, rule_input):
    state = state._replace(total=state.total + jnp.sum(task_losses))
    if kind == "gradient_rule":
      output = jax.tree.map(lambda g: jnp.sum(g, axis=0), rule_input)
    else:
      output = task_losses
    return output, state, task_losses[0] < 10.0

  if kind == "gradient_rule":
    return optax_mtl.as_gradient_transformation(optax_mtl.GradientRule(
        num_tasks=NUM_TASKS, init=init, rule=rule))
  return optax_mtl.as_gradient_transformation(optax_mtl.Weighting(
      num_tasks=NUM_TASKS, needs=optax_mtl.Needs.LOSSES, init=init,
      rule=rule, requires_positive_losses=False))


@pytest.mark.parametrize("kind", ["weighting", "gradient_rule"])
def test_a_rule_that_returns_accepted_false_rejects_the_step(kind):
  strategy = _rejecting(kind)
  update = jax.jit(strategy.update)
  grads = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  first, state = update(grads, strategy.init(None),
                        task_losses=jnp.array([1.0, 2.0]))
  rejected, kept = update(grads, state, task_losses=jnp.array([20.0, 2.0]))
  assert int(kept.num_skipped) == 1
  np.testing.assert_array_equal(kept.total, state.total)
  np.testing.assert_array_equal(kept.weights, state.weights)
  if kind == "weighting":  # The previous weights, applied again.
    np.testing.assert_array_equal(rejected, first)
  else:  # No update.
    np.testing.assert_array_equal(rejected, [0.0, 0.0])


# --------------------------------------------------------------------------
# Every engine mode counts an overflowing gradient.
# --------------------------------------------------------------------------


def test_the_sampled_mode_counts_an_overflowing_gradient():
  """The heads' gradient Σ_k ∇L_k overflows float32 although each task's is
  finite: the step is counted in num_skipped and gives a zero gradient."""
  strategy = optax_mtl.modo(NUM_TASKS)
  params = {"trunk": jnp.ones(3), "heads": jnp.ones(())}

  def loss_fn(p, x):
    shared = jnp.sum((p["trunk"] * x) ** 2)
    return jnp.stack([shared + 2e38 * p["heads"], 2.0 * shared
                      + 2e38 * p["heads"]]) * 1e-38

  step = jax.jit(optax_mtl.value_and_grad(
      lambda p, x: loss_fn(p, x) * 1e38, strategy,
      shared={"trunk": True, "heads": False}))
  batches = jnp.ones((3, 3))  # num_samples = 3 minibatches.
  (losses, grads), state = step(params, strategy.init(params), batches)
  assert bool(jnp.all(jnp.isfinite(losses)))
  assert int(state.num_skipped) == 1
  for leaf in jax.tree.leaves(grads):
    np.testing.assert_array_equal(leaf, jnp.zeros_like(leaf))


# --------------------------------------------------------------------------
# The two faces take the same options.
# --------------------------------------------------------------------------


def test_both_faces_share_option_names_and_order():
  pytest.importorskip("flax")
  from optax_mtl import nnx as mtl_nnx  # pylint: disable=import-outside-toplevel
  faces = [optax_mtl.value_and_grad, mtl_nnx.value_and_grad]
  options = [
      [name for name, parameter in inspect.signature(face).parameters.items()
       if parameter.kind is parameter.KEYWORD_ONLY] for face in faces]
  assert options[0] == options[1]
  assert options[0][:3] == ["has_aux", "encoder_fn", "shared"]


def test_has_aux_by_position_warns_and_gives_the_same_step():
  params, inputs = make_params()
  strategy = optax_mtl.mgda(NUM_TASKS)
  with_aux = lambda p, x: (loss_fn(p, x), {"inputs": x})
  with pytest.warns(DeprecationWarning, match="has_aux=True"):
    old = optax_mtl.value_and_grad(with_aux, strategy, True)  # pylint: disable=too-many-function-args
  new = optax_mtl.value_and_grad(with_aux, strategy, has_aux=True)
  got = old(params, strategy.init(params), inputs)
  expected = new(params, strategy.init(params), inputs)
  for have, want in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(have, want)


def test_the_nnx_face_refuses_an_option_when_the_step_is_built():
  pytest.importorskip("flax")
  from optax_mtl import nnx as mtl_nnx  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"moco keeps .*encoder_fn"):
    mtl_nnx.value_and_grad(lambda model, features: features,
                           optax_mtl.moco(NUM_TASKS),
                           encoder_fn=lambda model: model)
  with pytest.raises(ValueError, match="gramian_mode must be one of"):
    mtl_nnx.value_and_grad(lambda model: model, optax_mtl.mgda(NUM_TASKS),
                           gramian_mode="exact")
