"""optax_mtl.nnx: training steps that take an ``nnx.Module``.

The model is a small conv net with BatchNorm and Dropout in its trunk and
three heads of different kinds: a 3-way classification, a regression whose
loss is 100× the others, and a head that predicts a 2×2 patch (another
output shape) through its own BatchNorm. Every reference is computed with
Flax's own transforms (``nnx.grad``, ``nnx.value_and_grad``) on clones of
the model taken before the step, so the references draw the same Dropout
masks as the step does.
"""

import functools
import os
import subprocess
import sys
import textwrap

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_mtl
from optax_mtl import nnx as mtl_nnx

NUM_TASKS = 3
TRUNK = nnx.PathContains("trunk")


class Net(nnx.Module):
  """Conv trunk (BatchNorm, Dropout) and three heads of different kinds."""

  def __init__(self, rngs: nnx.Rngs, dropout: bool = True):
    # No bias before a BatchNorm: its gradient is rounding noise, which Adam
    # would blow up into full-size steps that differ between the faces.
    self.trunk = nnx.Sequential(
        nnx.Conv(1, 4, (3, 3), use_bias=False, rngs=rngs),
        nnx.BatchNorm(4, rngs=rngs),
        nnx.relu, nnx.Dropout(0.25 if dropout else 0.0, rngs=rngs),
        lambda h: h.reshape(h.shape[0], -1),
        nnx.Linear(6 * 6 * 4, 8, rngs=rngs), nnx.tanh)
    self.heads = nnx.Dict(
        digit=nnx.Linear(8, 3, rngs=rngs),
        ink=nnx.Linear(8, 1, rngs=rngs),
        patch=nnx.Sequential(
            nnx.Linear(8, 4, use_bias=False, rngs=rngs),
            nnx.BatchNorm(4, rngs=rngs)))

  def __call__(self, images):
    return self.predict(self.trunk(images))

  def predict(self, features):
    return {"digit": self.heads["digit"](features),
            "ink": self.heads["ink"](features)[:, 0],
            "patch": self.heads["patch"](features).reshape(-1, 2, 2)}


def make_model(seed=0, dropout=True):
  return Net(nnx.Rngs(seed, dropout=seed + 1), dropout)


def make_batch(seed):
  keys = jax.random.split(jax.random.key(seed), 4)
  images = jax.random.normal(keys[0], (8, 6, 6, 1))
  targets = {"digit": jax.random.randint(keys[1], (8,), 0, 3),
             "ink": jnp.mean(images, axis=(1, 2, 3)) * 3.0,
             "patch": jax.random.normal(keys[3], (8, 2, 2))}
  return images, targets


def losses_from_outputs(outputs, targets):
  return jnp.stack([
      optax.softmax_cross_entropy_with_integer_labels(
          outputs["digit"], targets["digit"]).mean(),
      100.0 * jnp.mean((outputs["ink"] - targets["ink"]) ** 2),
      jnp.mean((outputs["patch"] - targets["patch"]) ** 2)])


def task_losses(model, images, targets):
  return losses_from_outputs(model(images), targets)


def task_losses_with_outputs(model, images, targets):
  outputs = model(images)
  return losses_from_outputs(outputs, targets), outputs


def trunk_features(model, images, targets):
  del targets
  return model.trunk(images)


def heads_losses(model, features, images, targets):
  del images
  return losses_from_outputs(model.predict(features), targets)


def non_params(model):
  """The non-parameter state as NumPy arrays (RNG keys as their data)."""
  def to_numpy(leaf):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)
  return jax.tree.map(to_numpy,
                      nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param))))


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    if np.issubdtype(np.asarray(e).dtype, np.floating):
      np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
    else:
      np.testing.assert_array_equal(a, e)


@nnx.jit
def _per_task_grads(clones, images, targets):
  return [nnx.grad(lambda model, task=task: task_losses(
      model, images, targets)[task])(clone)
          for task, clone in enumerate(clones)]


def per_task_grads(model_before, images, targets):
  """∇L_k of each task, each from a fresh clone (same Dropout masks)."""
  clones = [nnx.clone(model_before) for _ in range(NUM_TASKS)]
  return [nnx.as_pure(grads)
          for grads in _per_task_grads(clones, images, targets)]


def expected_grads(task_grads, weights, shared):
  """Σ_k w_k ∇L_k on shared parameters, Σ_k ∇L_k (own task's) elsewhere."""
  def combine(path, *leaves):
    is_shared = shared is None or "trunk" in jax.tree_util.keystr(path)
    task_weights = weights if is_shared else np.ones(NUM_TASKS)
    return sum(w * np.asarray(leaf) for w, leaf in zip(task_weights, leaves))
  return jax.tree_util.tree_map_with_path(combine, *task_grads)


# A plain NNX step on the summed losses: the reference for the threaded state.
plain_step = nnx.jit(nnx.value_and_grad(
    lambda model, images, targets: jnp.sum(task_losses(model, images,
                                                       targets))))


# --------------------------------------------------------------------------
# The step: gradients and threaded state against Flax's own transforms.
# --------------------------------------------------------------------------

CONFIGS = {
    # name: (strategy factory, value_and_grad options)
    "loss_only": (lambda: optax_mtl.loss_ema(NUM_TASKS), {}),
    "loss_only_aux": (lambda: optax_mtl.loss_ema(NUM_TASKS), {"has_aux": True}),
    "gramian": (lambda: optax_mtl.upgrad(NUM_TASKS), {"shared": TRUNK}),
    "gramian_all_shared": (lambda: optax_mtl.mgda(NUM_TASKS), {}),
    "low_memory": (lambda: optax_mtl.upgrad(NUM_TASKS),
                   {"shared": TRUNK, "gramian_mode": "low_memory"}),
    "recompute_every": (
        lambda: optax_mtl.recompute_every(optax_mtl.upgrad(NUM_TASKS), 2),
        {"shared": TRUNK}),
    "features": (lambda: optax_mtl.upgrad(NUM_TASKS),
                 {"shared": TRUNK, "encoder_fn": trunk_features}),
}


def _loss_fn(options):
  if "encoder_fn" in options:
    return heads_losses
  if options.get("has_aux"):
    return task_losses_with_outputs
  return task_losses


@pytest.mark.parametrize("config", list(CONFIGS))
def test_step_matches_flax_transforms(config):
  factory, options = CONFIGS[config]
  strategy = factory()
  model = make_model()
  step = nnx.jit(mtl_nnx.value_and_grad(_loss_fn(options), strategy,
                                        **options))
  strategy_state = strategy.init(nnx.state(model, nnx.Param))
  plain = nnx.clone(model)
  for seed in range(2):  # The second step starts from the threaded state.
    images, targets = make_batch(seed)
    before = nnx.clone(model)
    out, strategy_state = step(model, strategy_state, images, targets)
    plain_loss, _ = plain_step(plain, images, targets)

    if options.get("has_aux"):
      (losses, aux), grads = out
    else:
      (losses, grads), aux = out, None
    reference_losses = task_losses(nnx.clone(before), images, targets)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    np.testing.assert_allclose(jnp.sum(losses), plain_loss, rtol=1e-5)
    if options.get("has_aux"):
      np.testing.assert_allclose(
          aux["patch"], nnx.clone(before)(images)["patch"], rtol=1e-5,
          atol=1e-6)
    # BatchNorm statistics and Dropout RNG state advance exactly as in a plain
    # nnx.value_and_grad step (once per step, whatever the strategy).
    assert_trees_close(non_params(model), non_params(plain), rtol=1e-6,
                       atol=1e-7)
    assert not np.array_equal(non_params(model)["trunk"]["layers"][1]["mean"],
                              non_params(before)["trunk"]["layers"][1]["mean"])

    # The gradients: an nnx.State of the Params, like nnx.grad's.
    assert isinstance(grads, nnx.State)
    assert (jax.tree.structure(nnx.state(model, nnx.Param))
            == jax.tree.structure(grads))
    weights = np.asarray(
        getattr(strategy_state, "inner_state", strategy_state).weights)
    if config not in ("loss_only", "loss_only_aux"):
      assert not np.allclose(weights, weights[0])  # A real balancing.
    expected = expected_grads(per_task_grads(before, images, targets), weights,
                              options.get("shared"))
    assert_trees_close(nnx.as_pure(grads), expected, rtol=2e-4, atol=1e-5)


def test_features_fn_balances_on_the_feature_gradients():
  """The Gramian of ∂L_k/∂features, computed with nnx.grad, task by task."""
  strategy = optax_mtl.upgrad(NUM_TASKS)
  model = make_model()
  images, targets = make_batch(0)
  before = nnx.clone(model)
  step = nnx.jit(mtl_nnx.value_and_grad(heads_losses, strategy, shared=TRUNK,
                                        encoder_fn=trunk_features))
  _, state = step(model, strategy.init(None), images, targets)

  reference = nnx.clone(before)
  features = reference.trunk(images)
  feature_grads = np.stack([np.ravel(nnx.grad(
      lambda m, z: heads_losses(m, z, images, targets)[task], argnums=1)(
          reference, features)) for task in range(NUM_TASKS)])
  gramian = feature_grads @ feature_grads.T
  norms = np.sqrt(np.diag(gramian))
  np.testing.assert_allclose(state.gradient_cosines,
                             gramian / np.outer(norms, norms), atol=1e-5)
  # Not the Gramian of the parameter gradients: the options differ.
  full_grads = per_task_grads(before, images, targets)
  flat = np.stack([np.concatenate([np.ravel(leaf) for leaf in
                                   jax.tree.leaves(grads["trunk"])])
                   for grads in full_grads])
  full_cosines = (flat @ flat.T) / np.outer(np.linalg.norm(flat, axis=1),
                                            np.linalg.norm(flat, axis=1))
  assert not np.allclose(state.gradient_cosines, full_cosines, atol=1e-3)


def test_features_fn_with_a_rule_on_the_gradients():
  """GradDrop transforms the feature gradients: the trunk may update float
  state (BatchNorm), and a Dropout stream in it gives a clear error."""
  strategy = optax_mtl.graddrop(NUM_TASKS)
  step = mtl_nnx.value_and_grad(heads_losses, strategy, shared=TRUNK,
                                encoder_fn=trunk_features)
  images, targets = make_batch(0)
  model = make_model(dropout=False)
  plain = nnx.clone(model)
  (losses, grads), _ = step(model, strategy.init(None), images, targets)
  plain_loss, _ = plain_step(plain, images, targets)
  np.testing.assert_allclose(jnp.sum(losses), plain_loss, rtol=1e-5)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))
  assert_trees_close(non_params(model), non_params(plain), rtol=1e-6,
                     atol=1e-7)
  with pytest.raises(ValueError, match="cannot yet run a trunk"):
    step(make_model(), strategy.init(None), images, targets)


def test_strategy_sampling_several_minibatches():
  """MoDo maps the step over 3 minibatches, all from the same state."""
  strategy = optax_mtl.modo(NUM_TASKS)
  batches = [make_batch(seed) for seed in range(3)]
  images = jnp.stack([batch[0] for batch in batches])
  targets = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                         *[batch[1] for batch in batches])
  model = make_model()
  before = nnx.clone(model)
  (losses, grads), state = nnx.jit(mtl_nnx.value_and_grad(
      task_losses, strategy, shared=TRUNK))(model, strategy.init(None),
                                            images, targets)
  plains = [nnx.clone(before) for _ in batches]
  plain_losses = [plain_step(plain, *batch)[0] for plain, batch in
                  zip(plains, batches)]
  np.testing.assert_allclose(jnp.sum(losses), np.mean(plain_losses),
                             rtol=1e-5)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))
  assert np.all(np.isfinite(state.weights))
  # Statistics: the mean of the minibatches' updates; counters: once.
  plain_states = [non_params(plain) for plain in plains]
  expected = jax.tree.map(
      lambda *leaves: np.mean(leaves, axis=0)
      if np.issubdtype(leaves[0].dtype, np.floating) else leaves[0],
      *plain_states)
  assert_trees_close(non_params(model), expected, rtol=1e-5, atol=1e-6)


def test_runs_eagerly_like_under_jit():
  strategy = optax_mtl.imtl_g(NUM_TASKS)
  step = mtl_nnx.value_and_grad(task_losses, strategy, shared=TRUNK)
  images, targets = make_batch(0)
  eager_model, jit_model = make_model(), make_model()
  state = strategy.init(None)
  (eager_losses, eager_grads), eager_state = step(eager_model, state, images,
                                                  targets)
  (jit_losses, jit_grads), jit_state = nnx.jit(step)(jit_model, state, images,
                                                     targets)
  np.testing.assert_allclose(eager_losses, jit_losses, rtol=1e-5)
  np.testing.assert_allclose(eager_state.weights, jit_state.weights,
                             rtol=1e-4)
  assert_trees_close(nnx.as_pure(eager_grads), nnx.as_pure(jit_grads),
                     rtol=1e-4)
  assert_trees_close(non_params(eager_model), non_params(jit_model))


# --------------------------------------------------------------------------
# Both faces train, agree, and resume bitwise from an Orbax checkpoint.
# --------------------------------------------------------------------------

NUM_STEPS, RESUME_AT = 4, 2
FACE_STRATEGIES = {
    "loss_ema": lambda: optax_mtl.loss_ema(NUM_TASKS),
    "upgrad": lambda: optax_mtl.upgrad(NUM_TASKS),
}


@functools.cache
def face_setup(face, strategy_name):
  """The transformation and the jitted step of one face, built once.

  Every run of a face shares them, so ``nnx.jit`` compiles the step once.
  """
  strategy = FACE_STRATEGIES[strategy_name]()
  if face == "optax":
    # The optax face: the strategy is the chain's first link, told which
    # parameters are shared by the mask of an NNX filter.
    strategy = optax_mtl.with_shared_parameters(
        strategy, mtl_nnx.shared_mask(make_model(), TRUNK))
    tx = optax.chain(strategy, optax.adam(1e-2))
    jacobian_fn = mtl_nnx.value_and_jacobian(task_losses)

    @nnx.jit
    def train_step(model, optimizer, strategy_state, images, targets):
      losses, task_grads = jacobian_fn(model, images, targets)
      optimizer.update(model, task_grads, task_losses=losses)
      return losses, strategy_state
  else:
    tx = optax.adam(1e-2)
    step = mtl_nnx.value_and_grad(task_losses, strategy, shared=TRUNK)

    @nnx.jit
    def train_step(model, optimizer, strategy_state, images, targets):
      (losses, grads), strategy_state = step(model, strategy_state, images,
                                             targets)
      optimizer.update(model, grads)
      return losses, strategy_state

  return strategy, tx, train_step


class Trainer:
  """Model, optimizer and strategy state of one face."""

  def __init__(self, face, strategy_name, seed=0):
    self.face = face
    self.model = make_model(seed)
    strategy, tx, self.train_step = face_setup(face, strategy_name)
    self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)
    self.strategy_state = (None if face == "optax" else
                           strategy.init(nnx.state(self.model, nnx.Param)))

  def run(self, first, last):
    losses = []
    for seed in range(first, last):
      step_losses, self.strategy_state = self.train_step(
          self.model, self.optimizer, self.strategy_state, *make_batch(seed))
      losses.append(np.asarray(step_losses))
    return losses

  def checkpoint_tree(self):
    return {"model": nnx.state(self.model),
            "optimizer": nnx.state(self.optimizer),
            "strategy": self.strategy_state}

  def restore(self, tree):
    nnx.update(self.model, tree["model"])
    nnx.update(self.optimizer, tree["optimizer"])
    self.strategy_state = tree["strategy"]

  def strategy_weights(self):
    if self.face == "optax":
      return np.asarray(self.optimizer.opt_state[0].weights)
    return np.asarray(self.strategy_state.weights)


@pytest.fixture(scope="module")
def face_runs(tmp_path_factory):
  """Per (face, strategy): an uninterrupted run and a saved-restored one."""
  checkpointer = ocp.StandardCheckpointer()
  runs = {}
  for strategy_name in FACE_STRATEGIES:
    for face in ("optax", "step"):
      uninterrupted = Trainer(face, strategy_name)
      losses = uninterrupted.run(0, NUM_STEPS)
      interrupted = Trainer(face, strategy_name)
      interrupted_losses = interrupted.run(0, RESUME_AT)
      path = tmp_path_factory.mktemp("ckpt") / f"{face}_{strategy_name}"
      checkpointer.save(path, interrupted.checkpoint_tree())
      checkpointer.wait_until_finished()
      # Restored into fresh objects built from another seed.
      resumed = Trainer(face, strategy_name, seed=7)
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                              resumed.checkpoint_tree())
      resumed.restore(checkpointer.restore(path, abstract))
      resumed_losses = interrupted_losses + resumed.run(RESUME_AT, NUM_STEPS)
      runs[face, strategy_name] = (uninterrupted, losses, resumed,
                                   resumed_losses)
  return runs


@pytest.mark.parametrize("strategy_name", list(FACE_STRATEGIES))
@pytest.mark.parametrize("face", ["optax", "step"])
def test_orbax_resume_is_bitwise(face_runs, face, strategy_name):
  uninterrupted, losses, resumed, resumed_losses = face_runs[face,
                                                             strategy_name]
  np.testing.assert_array_equal(np.stack(losses), np.stack(resumed_losses))
  for name in ("model", "optimizer"):
    expected = jax.tree.leaves(nnx.as_pure(
        uninterrupted.checkpoint_tree()[name]))
    actual = jax.tree.leaves(nnx.as_pure(resumed.checkpoint_tree()[name]))
    for a, e in zip(actual, expected):
      if jnp.issubdtype(e.dtype, jax.dtypes.prng_key):
        a, e = jax.random.key_data(a), jax.random.key_data(e)
      np.testing.assert_array_equal(a, e)
  np.testing.assert_array_equal(resumed.strategy_weights(),
                                uninterrupted.strategy_weights())


@pytest.mark.parametrize("strategy_name", list(FACE_STRATEGIES))
def test_both_faces_follow_the_same_trajectory(face_runs, strategy_name):
  optax_run, optax_losses = face_runs["optax", strategy_name][:2]
  step_run, step_losses = face_runs["step", strategy_name][:2]
  np.testing.assert_allclose(np.stack(optax_losses), np.stack(step_losses),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(optax_run.strategy_weights(),
                             step_run.strategy_weights(), rtol=1e-3,
                             atol=1e-6)
  assert_trees_close(nnx.as_pure(nnx.state(optax_run.model, nnx.Param)),
                     nnx.as_pure(nnx.state(step_run.model, nnx.Param)),
                     rtol=1e-3, atol=1e-5)
  assert_trees_close(non_params(optax_run.model), non_params(step_run.model),
                     rtol=1e-3, atol=1e-5)


def test_value_and_jacobian_matches_per_task_grads():
  model = make_model()
  images, targets = make_batch(0)
  before = nnx.clone(model)
  (losses, outputs), task_grads = mtl_nnx.value_and_jacobian(
      task_losses_with_outputs, has_aux=True)(model, images, targets)
  np.testing.assert_allclose(losses, task_losses(nnx.clone(before), images,
                                                 targets), rtol=1e-5)
  assert outputs["patch"].shape == (8, 2, 2)
  for task, expected in enumerate(per_task_grads(before, images, targets)):
    assert_trees_close(jax.tree.map(lambda leaf: leaf[task],
                                    nnx.as_pure(task_grads)), expected,
                       rtol=1e-4, atol=1e-5)
  plain = nnx.clone(before)
  nnx.value_and_grad(lambda m: jnp.sum(task_losses(m, images, targets)))(plain)
  assert_trees_close(non_params(model), non_params(plain), rtol=1e-6,
                     atol=1e-7)


# --------------------------------------------------------------------------
# NNX filters as the declaration of the shared parameters.
# --------------------------------------------------------------------------


def _selected(mask):
  return sorted(".".join(map(str, path)) for path, flag in
                nnx.to_flat_state(mask) if flag)


@pytest.mark.parametrize("shared_filter, expected", [
    (TRUNK, ["trunk.layers.0.kernel", "trunk.layers.1.bias",
             "trunk.layers.1.scale",
             "trunk.layers.5.bias", "trunk.layers.5.kernel"]),
    (nnx.All(TRUNK, nnx.PathContains("kernel")),
     ["trunk.layers.0.kernel", "trunk.layers.5.kernel"]),
    (nnx.Any(nnx.PathContains("digit"), nnx.PathContains("ink")),
     ["heads.digit.bias", "heads.digit.kernel", "heads.ink.bias",
      "heads.ink.kernel"]),
    (nnx.All(nnx.Not(nnx.PathContains("heads")), nnx.PathContains("bias")),
     ["trunk.layers.1.bias", "trunk.layers.5.bias"]),
    (lambda path, variable: variable[...].ndim == 4,
     ["trunk.layers.0.kernel"]),
    (nnx.Param, None),  # Every parameter.
])
def test_shared_mask_of_nnx_filters(shared_filter, expected):
  model = make_model()
  mask = mtl_nnx.shared_mask(model, shared_filter)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  if expected is None:
    expected = _selected(jax.tree.map(lambda _: True, params))
  assert _selected(mask) == expected
  assert _selected(mtl_nnx.shared_mask(nnx.state(model), shared_filter)) == (
      expected)


def test_shared_filter_decides_who_gets_their_own_gradient():
  """Only the kernels are shared: every bias gets the unweighted gradient."""
  strategy = optax_mtl.mgda(NUM_TASKS)
  shared = nnx.All(TRUNK, nnx.PathContains("kernel"))
  model = make_model()
  images, targets = make_batch(0)
  before = nnx.clone(model)
  (_, grads), state = mtl_nnx.value_and_grad(task_losses, strategy,
                                             shared=shared)(
                                                 model, strategy.init(None),
                                                 images, targets)
  task_grads = per_task_grads(before, images, targets)
  weights = np.asarray(state.weights)
  dense = grads["trunk"]["layers"][5]
  np.testing.assert_allclose(
      dense["kernel"][...],
      sum(w * g["trunk"]["layers"][5]["kernel"]
          for w, g in zip(weights, task_grads)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      dense["bias"][...],
      sum(g["trunk"]["layers"][5]["bias"] for g in task_grads),
      rtol=1e-4, atol=1e-6)
  assert not np.allclose(weights, 1.0)


def test_shared_declared_on_the_strategy():
  """with_shared_parameters(strategy, shared_mask(...)) is shared=filter."""
  images, targets = make_batch(0)
  model = make_model()
  declared = optax_mtl.with_shared_parameters(
      optax_mtl.imtl_g(NUM_TASKS), mtl_nnx.shared_mask(model, TRUNK))
  strategy = optax_mtl.imtl_g(NUM_TASKS)
  (_, declared_grads), _ = mtl_nnx.value_and_grad(task_losses, declared)(
      model, declared.init(None), images, targets)
  (_, grads), _ = mtl_nnx.value_and_grad(task_losses, strategy, shared=TRUNK)(
      make_model(), strategy.init(None), images, targets)
  assert_trees_close(nnx.as_pure(declared_grads), nnx.as_pure(grads))


@pytest.mark.parametrize("name", ["moco", "db_mtl", "excess_mtl"])
def test_params_shaped_states_initialise_from_the_nnx_param_state(name):
  """init(nnx.state(model, nnx.Param)), as documented, runs on both faces."""
  images, targets = make_batch(0)
  strategy = getattr(optax_mtl, name)(NUM_TASKS)
  model = make_model(dropout=False)
  state = strategy.init(nnx.state(model, nnx.Param))
  step = nnx.jit(mtl_nnx.value_and_grad(task_losses, strategy, shared=TRUNK))
  (losses, grads), state = step(model, state, images, targets)
  (_, grads), state = step(model, state, images, targets)
  assert np.all(np.isfinite(losses))
  assert all(np.all(np.isfinite(leaf))
             for leaf in jax.tree.leaves(nnx.as_pure(grads)))
  assert int(state.num_skipped) == 0
  # The optax face, with the state nnx.Optimizer builds.
  model = make_model(dropout=False)
  optimizer = nnx.Optimizer(model, optax.chain(strategy, optax.sgd(1e-2)),
                            wrt=nnx.Param)
  jacobian_fn = mtl_nnx.value_and_jacobian(task_losses)
  losses, task_grads = jacobian_fn(model, images, targets)
  optimizer.update(model, task_grads, task_losses=losses)
  assert all(np.all(np.isfinite(leaf))
             for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_features_fn_still_works_with_a_deprecation_warning_naming_encoder_fn():
  strategy = optax_mtl.upgrad(NUM_TASKS)
  images, targets = make_batch(0)
  with pytest.warns(DeprecationWarning, match="encoder_fn"):
    old = mtl_nnx.value_and_grad(heads_losses, strategy, shared=TRUNK,
                                 features_fn=trunk_features)
  new = mtl_nnx.value_and_grad(heads_losses, strategy, shared=TRUNK,
                               encoder_fn=trunk_features)
  (_, old_grads), _ = old(make_model(dropout=False), strategy.init(None),
                          images, targets)
  (_, new_grads), _ = new(make_model(dropout=False), strategy.init(None),
                          images, targets)
  assert_trees_close(nnx.as_pure(old_grads), nnx.as_pure(new_grads))
  with pytest.raises(TypeError, match="unexpected keyword argument"):
    mtl_nnx.value_and_grad(heads_losses, strategy, feature_fn=trunk_features)


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


def test_errors_are_clear():
  strategy = optax_mtl.upgrad(NUM_TASKS)
  model = make_model()
  images, targets = make_batch(0)
  state = strategy.init(None)
  with pytest.raises(ValueError, match="selects no nnx.Param"):
    mtl_nnx.value_and_grad(task_losses, strategy,
                           shared=nnx.PathContains("encoder"))(
                               model, state, images, targets)
  with pytest.raises(ValueError, match=r"nnx.PathContains\('trunk'\) selects"):
    mtl_nnx.shared_mask(model, "trunk")
  with pytest.raises(ValueError, match="must be an NNX filter"):
    mtl_nnx.value_and_grad(task_losses, strategy, shared=3.5)
  with pytest.raises(ValueError, match="must be an NNX filter"):
    mtl_nnx.shared_mask(model, {"trunk": True})
  with pytest.raises(ValueError, match="pass has_aux=True"):
    mtl_nnx.value_and_grad(task_losses_with_outputs, strategy)(
        model, state, images, targets)
  with pytest.raises(ValueError, match=r"list of 3 items: .*jnp\.stack"):
    mtl_nnx.value_and_grad(lambda *a: list(task_losses(*a)), strategy)(
        model, state, images, targets)
  with pytest.raises(ValueError, match=r"\(task_losses, aux\)"):
    mtl_nnx.value_and_grad(task_losses, strategy, has_aux=True)(
        model, state, images, targets)
  with pytest.raises(ValueError, match="nnx.Module to train"):
    mtl_nnx.value_and_grad(task_losses, strategy)(
        nnx.state(model, nnx.Param), state, images, targets)
  with pytest.raises(ValueError, match="Keep nnx.Rngs"):
    mtl_nnx.value_and_grad(lambda m, x, t, rngs: task_losses(m, x, t),
                           strategy)(model, state, images, targets,
                                     nnx.Rngs(0))
  with pytest.raises(ValueError, match="gramian_mode"):
    mtl_nnx.value_and_grad(task_losses, strategy, gramian_mode="fast")
  with pytest.raises(ValueError, match="optax_mtl strategy"):
    mtl_nnx.value_and_grad(task_losses,
                           optax.chain(strategy, optax.adam(1e-3)))
  with pytest.raises(ValueError, match="encoder_fn must be a callable"):
    mtl_nnx.value_and_grad(heads_losses, strategy, encoder_fn="trunk")
  with pytest.raises(ValueError, match=r"shape \(num_tasks,\)"):
    mtl_nnx.value_and_jacobian(lambda m, x, t: jnp.sum(task_losses(m, x, t)))(
        model, images, targets)
  # Nothing above touched the model's state.
  assert_trees_close(non_params(model), non_params(make_model()))


def test_optax_mtl_imports_without_flax():
  """``import optax_mtl`` works without Flax; ``optax_mtl.nnx`` needs it."""
  script = textwrap.dedent("""
      import sys
      sys.modules["flax"] = None  # Any import of flax now fails.
      import optax_mtl
      assert not [name for name, module in sys.modules.items()
                  if module is not None and name.split(".")[0] == "flax"]
      try:
        import optax_mtl.nnx
      except ImportError:
        print("ok")
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, check=False,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.stdout.strip() == "ok", result.stderr
