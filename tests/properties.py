"""Properties of a multi-task strategy, each written once (torchjd-style).

Every check takes a strategy's name in tests/strategies.py and runs the
strategy's one jitted update (``strategies.jitted_update``) on task
gradients shaped like the parameters of one small problem (:data:`PARAMS`),
so that the contract, the properties, the diagnostics and the checkpoint
tests share one compilation per strategy. tests/test_properties.py runs
each check on the strategies whose case declares it.

An update ``d`` is compared with a tolerance relative to the size of the
terms it sums, ``Σ_k |w_k| ‖g_k‖``: the case's ``rtol`` is float32
round-off for a closed-form rule and the stopping tolerance of an
iterative solver.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tests import strategies

NUM_TASKS = strategies.NUM_TASKS


# --------------------------------------------------------------------------
# The problem: a shared tanh trunk and one linear head per task, task losses
# of very different scales.
# --------------------------------------------------------------------------


def loss_fn(params, inputs, targets):
  """Per-task mean squared errors, f32[T]."""
  hidden = jnp.tanh(inputs @ params["trunk"])
  predictions = hidden @ params["heads"].T
  return jnp.mean((predictions - targets) ** 2, axis=0)


def _make_problem():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {"trunk": jax.random.normal(keys[0], (5, 8)) * 0.5,
            "heads": jax.random.normal(keys[1], (NUM_TASKS, 8)) * 0.5}
  inputs = jax.random.normal(keys[2], (32, 5))
  true_trunk = jax.random.normal(keys[3], (5, 8))
  scales = jnp.array([1.0, 10.0, 0.1])
  targets = jnp.tanh(inputs @ true_trunk)[:, :NUM_TASKS] * scales
  return params, inputs, targets


PARAMS, INPUTS, TARGETS = _make_problem()


@jax.jit
def _task_grads_and_losses(params, inputs, targets):
  return (jax.jacrev(loss_fn)(params, inputs, targets),
          loss_fn(params, inputs, targets))


def task_grads_and_losses(params, inputs=INPUTS, targets=TARGETS):
  """The per-task gradients (a leading task axis) and losses at ``params``."""
  return _task_grads_and_losses(params, inputs, targets)


def random_task_grads(rng: np.random.Generator, num_tasks: int = NUM_TASKS):
  """Random task gradients f32, shaped like PARAMS with a task axis."""
  return jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=(num_tasks, *p.shape)),
                            jnp.float32), PARAMS)


def random_losses(rng: np.random.Generator, low: float = 0.1,
                  high: float = 10.0, num_tasks: int = NUM_TASKS):
  """Log-uniform positive losses f32[T] in [low, high]."""
  return jnp.asarray(np.exp(rng.uniform(np.log(low), np.log(high),
                                        num_tasks)), jnp.float32)


def random_steps(seed: int, num_steps: int, low: float = 0.1,
                 high: float = 10.0):
  """``num_steps`` pairs (task gradients, losses)."""
  rng = np.random.default_rng(seed)
  return [(random_task_grads(rng), random_losses(rng, low, high))
          for _ in range(num_steps)]


def update(name: str, task_grads, state, task_losses):
  """One step of the strategy's shared compiled update.

  The compiled update donates the state it is given: it is given a copy,
  so that ``state`` stays usable.
  """
  return strategies.jitted_update(name)(
      task_grads, jax.tree.map(jnp.copy, state), PARAMS,
      task_losses=task_losses)


def run(name: str, steps: Sequence[tuple[Any, Any]], state=None):
  """The updates and states of the strategy's jitted update over ``steps``."""
  if state is None:
    state = strategies.strategy(name).init(PARAMS)
  updates, states = [], []
  for task_grads, losses in steps:
    combined, state = update(name, task_grads, state, losses)
    updates.append(combined)
    states.append(state)
  return updates, states


def flat(tree) -> np.ndarray:
  """The leaves of a params-shaped tree as one float64 vector."""
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                         for leaf in jax.tree.leaves(tree)])


def flat_jacobian(task_grads) -> np.ndarray:
  """Task gradients (a leading task axis) as a float64 matrix [T, P]."""
  return np.concatenate(
      [np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1)
       for leaf in jax.tree.leaves(task_grads)], axis=1)


def weighted_sum(weights, task_grads):
  return jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), task_grads)


def term_size(weights, task_grads) -> float:
  """``Σ_k |w_k| ‖g_k‖``, the scale of the round-off of ``Σ_k w_k g_k``."""
  norms = np.linalg.norm(flat_jacobian(task_grads), axis=1)
  return float(np.sum(np.abs(np.asarray(weights, np.float64)) * norms))


def assert_close_updates(actual, expected, *, rtol: float, size: float,
                         message: str = ""):
  """``|actual - expected| <= rtol · size`` entrywise (flattened)."""
  difference = np.max(np.abs(flat(actual) - flat(expected)), initial=0.0)
  assert difference <= rtol * size, (
      f"{message}: max difference {difference:.3g} > {rtol} × {size:.3g}")


def assert_finite_and_shaped(name: str, combined, state):
  assert jax.tree.structure(combined) == jax.tree.structure(PARAMS), name
  for leaf, param in zip(jax.tree.leaves(combined), jax.tree.leaves(PARAMS)):
    assert leaf.shape == param.shape and leaf.dtype == param.dtype, name
    assert np.all(np.isfinite(leaf)), name
  assert state.weights.shape == (NUM_TASKS,), name
  assert np.all(np.isfinite(state.weights)), name


# --------------------------------------------------------------------------
# Every strategy.
# --------------------------------------------------------------------------

SCALES = (0.0, 1e-10, 1e-5, 1.0, 1e5, 1e10, 1e15)


def check_finite_on_scaled_inputs(name: str):
  """Losses and gradients scaled by 0, 1e-10 … 1e15: a finite, params-shaped
  update; nothing rejected unless the losses are zero."""
  case = strategies.STRATEGIES[name]
  steps = random_steps(seed=1, num_steps=2)
  layout = strategies.state_layout(strategies.strategy(name).init(PARAMS))
  for scale in SCALES:
    scaled = [(jax.tree.map(lambda g: g * scale, task_grads), losses * scale)
              for task_grads, losses in steps]
    updates, states = run(name, scaled)
    for combined, state in zip(updates, states):
      assert_finite_and_shaped(f"{name} at scale {scale}", combined, state)
      assert strategies.state_layout(state) == layout, (name, scale)
    skipped = int(states[-1].num_skipped)
    if scale == 0.0:
      assert skipped == (len(steps) if case.positive_losses else 0), name
      assert not np.any(flat(updates[-1])), name
    else:
      assert skipped == 0, (name, scale)


def _bad_losses(case, losses):
  bad = [losses.at[1].set(value) for value in (jnp.nan, jnp.inf, -jnp.inf)]
  if case.positive_losses:
    bad += [losses.at[1].set(0.0), losses.at[2].set(-1.0)]
  return bad


def _all_bad_losses(case, losses):
  """Every task's loss bad: the only losses a per-task strategy rejects as a
  whole step."""
  values = [jnp.nan, jnp.inf, -jnp.inf] + ([0.0, -1.0]
                                          if case.positive_losses else [])
  return [jnp.full_like(losses, value) for value in values]


def check_rejected_step_keeps_state(name: str):
  """A rejected step changes nothing but ``num_skipped`` (bit for bit) and
  applies the previous weights; a zero or negative loss is rejected if and
  only if the case says ``positive_losses``. For a ``per_task`` case a
  step is rejected as a whole only when no loss is valid (every bad loss
  still counted in ``num_rejected_losses``)."""
  case = strategies.STRATEGIES[name]
  (task_grads, losses), (next_grads, _) = random_steps(seed=2, num_steps=2)
  _, state = update(name, task_grads, strategies.strategy(name).init(PARAMS),
                    losses)
  bad_losses = (_all_bad_losses if case.per_task else _bad_losses)(case,
                                                                   losses)
  rejected_inputs = [(next_grads, bad) for bad in bad_losses]
  if case.needs != "losses":
    # No task with a finite gradient (one such task alone is excluded, see
    # check_non_finite_gradient_excludes_its_task).
    nan_grads = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), next_grads)
    rejected_inputs.append((nan_grads, losses))
  for grads, bad in rejected_inputs:
    combined, new_state = update(name, grads, state, bad)
    assert int(new_state.num_skipped) == int(state.num_skipped) + 1, (name,
                                                                      bad)
    kept = new_state._replace(num_skipped=state.num_skipped)
    if case.per_task:
      bad = ~np.isfinite(np.asarray(bad)) | (
          case.positive_losses & (np.asarray(bad) <= 0))
      np.testing.assert_array_equal(
          new_state.num_rejected_losses,
          np.asarray(state.num_rejected_losses) + bad, err_msg=name)
      kept = kept._replace(num_rejected_losses=state.num_rejected_losses)
    if "num_rejected_gradients" in state._fields:
      # Every task of the all-NaN gradients is counted; none otherwise.
      np.testing.assert_array_equal(
          new_state.num_rejected_gradients,
          np.asarray(state.num_rejected_gradients) + (grads is not next_grads),
          err_msg=name)
      kept = kept._replace(
          num_rejected_gradients=state.num_rejected_gradients)
    jax.tree.map(np.testing.assert_array_equal, kept, state)
    if case.needs != "gradients" and grads is next_grads:
      expected = weighted_sum(state.weights, grads)
      assert_close_updates(combined, expected, rtol=1e-5,
                           size=term_size(state.weights, grads), message=name)
  if not case.positive_losses:
    for accepted in (losses.at[1].set(0.0), losses.at[2].set(-1.0)):
      _, new_state = update(name, next_grads, state, accepted)
      assert int(new_state.num_skipped) == int(state.num_skipped), name
      if case.per_task:
        np.testing.assert_array_equal(new_state.num_rejected_losses,
                                      state.num_rejected_losses)


def check_non_finite_gradient_excludes_its_task(name: str):
  """A NaN in one task's gradient excludes that task: the step goes on for
  the others (``num_skipped`` unchanged), no NaN reaches the update, a
  weighting keeps the excluded task's previous weight in its state, and
  ``num_rejected_gradients`` (where the state has it) counts that task
  alone."""
  case = strategies.STRATEGIES[name]
  if case.needs == "losses":
    return  # One backward pass of Σ w_k L_k: see optax.apply_if_finite.
  (task_grads, losses), (next_grads, _) = random_steps(seed=3, num_steps=2)
  _, state = update(name, task_grads, strategies.strategy(name).init(PARAMS),
                    losses)
  nan_grads = jax.tree.map(lambda g: g.at[0].set(jnp.nan), next_grads)
  combined, new_state = update(name, nan_grads, state, losses)
  assert int(new_state.num_skipped) == int(state.num_skipped), name
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(combined)
             ), name
  if case.needs == "gramian":
    assert float(new_state.weights[0]) == float(state.weights[0]), name
  if "num_rejected_gradients" in state._fields:
    np.testing.assert_array_equal(
        new_state.num_rejected_gradients,
        np.asarray(state.num_rejected_gradients) + (np.arange(NUM_TASKS) == 0),
        err_msg=name)


def check_per_task(name: str):
  """A bad loss of one task excludes that task only.

  The step is accepted (``num_skipped`` unchanged), the task's
  ``num_rejected_losses`` grows by one, it keeps its weight and every one
  of its per-task statistics (any [T] leaf) bit for bit, the other tasks'
  statistics are those of a step with every loss valid, and the update is
  the weighted sum with the new weights.
  """
  case = strategies.STRATEGIES[name]
  (task_grads, losses), (next_grads, next_losses) = random_steps(
      seed=5, num_steps=2)
  _, state = update(name, task_grads, strategies.strategy(name).init(PARAMS),
                    losses)
  _, normal = update(name, next_grads, state, next_losses)
  for task, value in ((1, jnp.nan), (0, jnp.inf), (2, -jnp.inf),
                      (1, 0.0), (2, -1.0)):
    bad = next_losses.at[task].set(value)
    combined, new_state = update(name, next_grads, state, bad)
    if not case.positive_losses and np.isfinite(value):
      continue  # An ordinary loss here (checked by rejected_step_keeps_state).
    message = f"{name}: loss {value} of task {task}"
    assert int(new_state.num_skipped) == int(state.num_skipped), message
    expected_counts = np.asarray(state.num_rejected_losses).copy()
    expected_counts[task] += 1
    np.testing.assert_array_equal(new_state.num_rejected_losses,
                                  expected_counts, err_msg=message)
    others = np.arange(NUM_TASKS) != task
    fields = [f for f in new_state._fields
              if f not in ("num_rejected_losses", "num_skipped")]
    for field in fields:
      for leaf, before, after_normal in zip(
          *(jax.tree.leaves(getattr(tree, field))
            for tree in (new_state, state, normal))):
        if np.shape(leaf)[:1] != (NUM_TASKS,):
          continue
        np.testing.assert_array_equal(leaf[task], before[task],
                                      err_msg=f"{message}, {field}")
        # Weights may couple the tasks; so does FAMO's logits step (a
        # softmax over the tasks whose losses are valid), with its optimizer.
        coupled = ("weights", "logits") + (
            ("optimizer_state",) if "logits" in new_state._fields else ())
        if field not in coupled:
          np.testing.assert_array_equal(
              np.asarray(leaf)[others], np.asarray(after_normal)[others],
              err_msg=f"{message}, {field}")
    expected = weighted_sum(new_state.weights, next_grads)
    assert_close_updates(combined, expected, rtol=1e-5,
                         size=term_size(new_state.weights, next_grads),
                         message=message)


def check_faces_agree(name: str, num_steps: int = 3):
  """``value_and_grad`` gives the optax face's losses, weights and update."""
  step = strategies.jitted_value_and_grad(name, loss_fn)
  params = PARAMS
  engine_state = optax_state = strategies.strategy(name).init(params)
  for _ in range(num_steps):
    (losses, grads), engine_state = step(params, engine_state, INPUTS,
                                         TARGETS)
    task_grads, face_losses = task_grads_and_losses(params)
    updates, optax_state = update(name, task_grads, optax_state,
                                  face_losses)
    np.testing.assert_allclose(losses, face_losses, rtol=1e-6)
    # The two faces build the Jacobian by different programs (vmap of the
    # VJP and jacrev); float32 round-off, amplified by an ill-conditioned
    # solve (Aligned-MTL's eigendecomposition), sets the tolerance.
    np.testing.assert_allclose(engine_state.weights, optax_state.weights,
                               rtol=1e-3, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                         atol=1e-5),
                 grads, updates)
    params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)


# --------------------------------------------------------------------------
# Declared in the table.
# --------------------------------------------------------------------------

PERMUTATIONS = ((2, 0, 1), (1, 0, 2))


def check_permutation_equivariant(name: str, num_steps: int = 3):
  """Permuting the tasks at every step permutes the weights; the update is
  the same."""
  case = strategies.STRATEGIES[name]
  steps = random_steps(seed=3, num_steps=num_steps)
  updates, states = run(name, steps)
  for permutation in PERMUTATIONS:
    order = np.asarray(permutation)
    permuted = [(jax.tree.map(lambda g, order=order: g[order], task_grads),
                 losses[order]) for task_grads, losses in steps]
    permuted_updates, permuted_states = run(name, permuted)
    for index, (task_grads, _) in enumerate(steps):
      size = term_size(states[index].weights, task_grads)
      assert_close_updates(permuted_updates[index], updates[index],
                           rtol=case.rtol, size=size,
                           message=f"{name} {permutation} step {index}")
      np.testing.assert_allclose(
          permuted_states[index].weights, states[index].weights[order],
          rtol=case.rtol, atol=case.rtol * float(
              np.max(np.abs(states[index].weights))))


def check_scale_invariant_per_task(name: str, num_steps: int = 4):
  """One task's loss and gradient times c > 0 at every step: same update."""
  case = strategies.STRATEGIES[name]
  steps = random_steps(seed=4, num_steps=num_steps, low=1e-3, high=1e3)
  updates, states = run(name, steps)
  for task in range(NUM_TASKS):
    for factor in (1e-3, 7.0, 1e3):
      scale = np.ones(NUM_TASKS, np.float32)
      scale[task] = factor
      scaled = [(jax.tree.map(lambda g, s=scale: g * s.reshape(
          (-1,) + (1,) * (g.ndim - 1)), task_grads), losses * scale)
                for task_grads, losses in steps]
      scaled_updates, _ = run(name, scaled)
      for index, (task_grads, _) in enumerate(steps):
        assert_close_updates(
            scaled_updates[index], updates[index], rtol=case.rtol,
            size=term_size(states[index].weights, task_grads),
            message=f"{name}: task {task} × {factor}, step {index}")


def embedded_task_grads(matrix, seed: int = 0):
  """Task gradients ``M Qᵀ`` shaped like PARAMS, for a small matrix ``M``
  [T, k] and random orthonormal columns ``Q`` [P, k]: their Gramian is
  ``M Mᵀ``."""
  matrix = np.asarray(matrix, np.float64)
  size = sum(leaf.size for leaf in jax.tree.leaves(PARAMS))
  basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(
      size=(size, matrix.shape[1])))
  flat_grads = matrix @ basis.T
  leaves, treedef = jax.tree.flatten(PARAMS)
  offsets = np.cumsum([0] + [leaf.size for leaf in leaves])
  return jax.tree.unflatten(treedef, [
      jnp.asarray(flat_grads[:, start:stop].reshape(
          (matrix.shape[0],) + leaf.shape), jnp.float32)
      for leaf, start, stop in zip(leaves, offsets[:-1], offsets[1:])])


def _in_plane(norms, degrees):
  """Rows of the given norms at the given angles, in a plane [T, 2]."""
  radians = np.radians(degrees)
  return np.stack([norms * np.cos(radians), norms * np.sin(radians)], 1)


# Task gradients in a plane or in 3-D, each a counterexample to the
# non-conflicting property of some strategy that lacks it.
CONFLICTING_MATRICES = {
    # One dominant task, one small task opposed to it: the mean gradient,
    # CAGrad and Aligned-MTL conflict with the small task.
    "dominant": [[10.0, 0.0, 0.0], [-1.0, 0.3, 0.0], [0.2, 1.0, 0.1]],
    # IMTL-G's equal projections are negative ones here.
    "spread": _in_plane(np.array([3.0, 1.0, 0.2]), np.array([0, 120, 170])),
    # PCGrad (seed 0) conflicts with the third task.
    "pcgrad": [[0.0, 1.3], [-0.7, 0.4], [3.0, -2.3]],
    # Pareto stationary: the gradients positively span the plane, so d = 0
    # is the only non-conflicting direction in it.
    "stationary": _in_plane(np.array([1.4, 0.7, 4.8]),
                            np.array([198, 32, 315])),
}


def _conflicting_jacobians():
  """Random task gradients, and the CONFLICTING_MATRICES."""
  rng = np.random.default_rng(5)
  jacobians = [random_task_grads(rng) for _ in range(2)]
  return jacobians + [embedded_task_grads(matrix)
                      for matrix in CONFLICTING_MATRICES.values()]


def check_non_conflicting(name: str):
  """``g_k · d >= 0`` for every task, on conflicting gradients."""
  case = strategies.STRATEGIES[name]
  for task_grads in _conflicting_jacobians():
    (combined,), _ = run(name, [(task_grads, jnp.ones(NUM_TASKS))])
    jacobian = flat_jacobian(task_grads)
    products = jacobian @ flat(combined)
    scale = np.max(np.sum(jacobian**2, axis=1))
    assert np.all(products >= -case.rtol * scale), (name, products)


def check_linear_under_scaling(name: str):
  """``d(diag(a c1 + b c2) J) = a d(diag(c1) J) + b d(diag(c2) J)``."""
  case = strategies.STRATEGIES[name]
  rng = np.random.default_rng(6)
  losses = jnp.ones(NUM_TASKS)
  # Random scalings, and scalings that favour one task then another (a
  # projection then lands on different faces of a cone).
  favour = 0.05 + 0.95 * np.eye(NUM_TASKS, dtype=np.float32)
  for task_grads in _conflicting_jacobians():
    pairs = [rng.uniform(0.1, 1.0, (2, NUM_TASKS)).astype(np.float32),
             favour[[0, 1]], favour[[2, 0]]]
    for c1, c2 in pairs:
      a, b = rng.uniform(0.1, 1.0, 2).astype(np.float32)

      def direction(c, task_grads=task_grads):
        scaled = jax.tree.map(
            lambda g: g * c.reshape((-1,) + (1,) * (g.ndim - 1)), task_grads)
        (combined,), (state,) = run(name, [(scaled, losses)])
        return combined, term_size(state.weights, scaled)

      d1, size1 = direction(c1)
      d2, size2 = direction(c2)
      d, size = direction(a * c1 + b * c2)
      expected = jax.tree.map(lambda x, y, a=a, b=b: a * x + b * y, d1, d2)
      assert_close_updates(d, expected, rtol=case.rtol,
                           size=size + a * size1 + b * size2,
                           message=f"{name}, scalings {c1} and {c2}")


def check_mean_without_conflict(name: str):
  """``d`` is the mean gradient when no two gradients conflict (G >= 0)."""
  case = strategies.STRATEGIES[name]
  rng = np.random.default_rng(7)
  for _ in range(3):
    task_grads = jax.tree.map(jnp.abs, random_task_grads(rng))
    (combined,), _ = run(name, [(task_grads, jnp.ones(NUM_TASKS))])
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), task_grads)
    assert_close_updates(combined, mean, rtol=case.rtol,
                         size=term_size(jnp.full(NUM_TASKS, 1 / NUM_TASKS),
                                        task_grads), message=name)


# Property name -> check; the declared ones run on the strategies whose case
# sets the attribute of the same name.
EVERY_STRATEGY = {
    "finite_on_scaled_inputs": check_finite_on_scaled_inputs,
    "rejected_step_keeps_state": check_rejected_step_keeps_state,
    "non_finite_gradient_excludes_its_task": (
        check_non_finite_gradient_excludes_its_task),
    "faces_agree": check_faces_agree,
}
DECLARED = {
    "per_task": check_per_task,
    "permutation_equivariant": check_permutation_equivariant,
    "scale_invariant_per_task": check_scale_invariant_per_task,
    "non_conflicting": check_non_conflicting,
    "linear_under_scaling": check_linear_under_scaling,
    "mean_without_conflict": check_mean_without_conflict,
}
