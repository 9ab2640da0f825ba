"""gramian_mode="per_layer": the Gramian from layer inputs and cotangents.

Every Gramian is checked against ``J Jᵀ`` computed in NumPy (float64) from
the Jacobian that ``jax.jacrev`` returns: the per-objective gradients
written out, the definition of the Gramian.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from optax_mtl import nnx as mtl_nnx
from optax_mtl._src import per_layer

NUM_TASKS = 3
BATCH = 5


def _normal(key, shape, scale=1.0):
  return scale * jax.random.normal(key, shape)


def _heads(params, features):
  """T linear heads on ``features[N, H]``: ``[N, T]``."""
  return (jnp.einsum("nh,tho->nto", features, params["heads"]["w"])[..., 0]
          + params["heads"]["b"])


def _task_losses(predictions, targets):
  return jnp.mean((predictions - targets) ** 2, axis=0)


def mlp_problem(key):
  keys = jax.random.split(key, 6)
  params = {"trunk": [{"w": _normal(keys[0], (4, 8), 0.5),
                       "b": _normal(keys[1], (8,), 0.1)},
                      {"w": _normal(keys[2], (8, 6), 0.4), "b": jnp.zeros(6)}],
            "heads": {"w": _normal(keys[3], (NUM_TASKS, 6, 1)),
                      "b": jnp.zeros(NUM_TASKS)}}

  def loss_fn(params, x, y):
    hidden = x
    for layer in params["trunk"]:
      hidden = jnp.tanh(hidden @ layer["w"] + layer["b"])
    return _task_losses(_heads(params, hidden), y)

  data = (_normal(keys[4], (BATCH, 4)), _normal(keys[5], (BATCH, NUM_TASKS)))
  return params, loss_fn, data


def conv_problem(key):
  keys = jax.random.split(key, 7)
  params = {"conv": {"w": _normal(keys[0], (3, 3, 2, 4), 0.3),
                     "b": _normal(keys[1], (4,), 0.1)},
            "dense": {"w": _normal(keys[2], (4 * 4 * 4, 6), 0.1),
                      "b": jnp.zeros(6)},
            "heads": {"w": _normal(keys[3], (NUM_TASKS, 6, 1)),
                      "b": jnp.zeros(NUM_TASKS)}}

  def loss_fn(params, x, y):
    hidden = jax.lax.conv_general_dilated(
        x, params["conv"]["w"], (2, 2), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    hidden = jax.nn.relu(hidden + params["conv"]["b"])
    hidden = hidden.reshape(hidden.shape[0], -1)
    hidden = jnp.tanh(hidden @ params["dense"]["w"] + params["dense"]["b"])
    return _task_losses(_heads(params, hidden), y)

  data = (_normal(keys[4], (BATCH, 8, 8, 2)),
          _normal(keys[5], (BATCH, NUM_TASKS)))
  return params, loss_fn, data


def residual_problem(key):
  """A residual block whose second layer is the transposed first (tied)."""
  keys = jax.random.split(key, 6)
  params = {"embed": _normal(keys[0], (4, 6), 0.5),
            "block": {"w1": _normal(keys[1], (6, 6), 0.4),
                      "b1": _normal(keys[2], (6,), 0.1),
                      "w2": _normal(keys[3], (6, 6), 0.4)},
            "heads": {"w": _normal(keys[4], (NUM_TASKS, 6, 1)),
                      "b": jnp.zeros(NUM_TASKS)}}

  def loss_fn(params, x, y):
    hidden = x @ params["embed"]
    block = params["block"]
    hidden = hidden + jax.nn.gelu(hidden @ block["w1"] + block["b1"]) @ (
        block["w2"].T)
    return _task_losses(_heads(params, hidden), y)

  data = (_normal(keys[5], (BATCH, 4)),
          _normal(jax.random.fold_in(key, 1), (BATCH, NUM_TASKS)))
  return params, loss_fn, data


def twice_problem(key):
  """One weight read by two layers, one by a scan, one under remat."""
  keys = jax.random.split(key, 6)
  params = {"shared": _normal(keys[0], (5, 5), 0.4),
            "stack": _normal(keys[1], (2, 5, 5), 0.4),
            "remat": _normal(keys[2], (5, 5), 0.4),
            "heads": {"w": _normal(keys[3], (NUM_TASKS, 5, 1)),
                      "b": jnp.zeros(NUM_TASKS)}}

  @jax.checkpoint
  def remat_layer(weight, hidden):
    return jnp.tanh(hidden @ weight)

  def loss_fn(params, x, y):
    hidden = jnp.tanh(x @ params["shared"])
    hidden = jnp.tanh(hidden @ params["shared"])
    hidden, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), hidden,
                             params["stack"])
    hidden = remat_layer(params["remat"], hidden)
    return _task_losses(_heads(params, hidden), y)

  data = (_normal(keys[4], (BATCH, 5)), _normal(keys[5], (BATCH, NUM_TASKS)))
  return params, loss_fn, data


PROBLEMS = {"mlp": mlp_problem, "conv": conv_problem,
            "residual": residual_problem, "twice": twice_problem}


def reference_gramian(loss_fn, params, args, mask=None, has_aux=False):
  """``J Jᵀ`` in float64 NumPy, J from jax.jacrev (flattened leaf by leaf)."""
  jacobian = jax.jit(jax.jacrev(loss_fn, has_aux=has_aux))(params, *args)
  if has_aux:
    jacobian = jacobian[0]
  leaves = jax.tree.leaves(jacobian)
  mask_leaves = ([True] * len(leaves) if mask is None
                 else jax.tree.leaves(mask))
  rows = [np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1)
          for leaf, keep in zip(leaves, mask_leaves) if keep]
  flat = np.concatenate(rows, axis=1)
  return flat @ flat.T


def per_layer_gramian(loss_fn, params, args, mask=None, has_aux=False,
                      num_objectives=NUM_TASKS, **kwargs):
  """The per-layer Gramian under jit, as a float64 NumPy array."""

  def gramian(params, args):
    linearized = per_layer.linearize(loss_fn, params, args, has_aux,
                                     **kwargs)
    return linearized.gramian(mask, num_objectives)

  return np.asarray(jax.jit(gramian)(params, args), np.float64)


def assert_gramians_close(actual, expected, dtype):
  # Relative to the largest entry: the sums of products differ only in
  # their order and rounding (a few ε of the dtype times the depth).
  rtol = 1e-5 if dtype == np.float32 else 1e-12
  scale = np.max(np.abs(expected))
  np.testing.assert_array_less(np.max(np.abs(actual - expected)),
                               rtol * scale)


def _cast(tree, dtype):
  return jax.tree.map(lambda leaf: leaf.astype(dtype), tree)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gramian_is_that_of_the_jacobian(name, dtype):
  with jax.enable_x64(dtype == np.float64):
    params, loss_fn, data = PROBLEMS[name](jax.random.key(0))
    params, data = _cast(params, dtype), _cast(data, dtype)
    expected = reference_gramian(loss_fn, params, data)
    actual = per_layer_gramian(loss_fn, params, data)
    assert_gramians_close(actual, expected, dtype)


@pytest.mark.parametrize("name", ["conv", "twice"])
def test_gramian_of_the_shared_parameters(name):
  params, loss_fn, data = PROBLEMS[name](jax.random.key(1))
  mask = jax.tree.map(lambda _: True, params)
  mask["heads"] = jax.tree.map(lambda _: False, params["heads"])
  expected = reference_gramian(loss_fn, params, data, mask)
  actual = per_layer_gramian(loss_fn, params, data, mask)
  assert_gramians_close(actual, expected, np.float32)


def test_dense_layers_are_found_and_the_rest_falls_back():
  params, loss_fn, data = PROBLEMS["twice"](jax.random.key(0))
  flat, tree = jax.tree.flatten(params)
  program = per_layer.trace(
      lambda p, a: loss_fn(jax.tree.unflatten(tree, p), *a), flat, data)
  names = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  dense = {names[c.leaves[0]] for c in program.consumers
           if c.dense is not None}
  other = {names[leaf] for c in program.consumers if c.dense is None
           for leaf in c.leaves}
  # The heads' weight is dense; "shared" is read by two dense layers (each a
  # consumer); the scan and the remat'd layer are consumers as a whole.
  assert "['heads']['w']" in dense and "['shared']" in dense
  assert {"['stack']", "['remat']", "['heads']['b']"} <= other
  reads = [c.leaves for c in program.consumers]
  assert reads.count((names.index("['shared']"),)) == 2
  assert not program.fallback


def test_a_parameter_that_is_a_loss_falls_back():
  params = {"w": jnp.array([[1.0, 2.0], [3.0, -1.0]]), "s": jnp.array(0.5)}

  def loss_fn(params, x):
    data_loss = jnp.mean((x @ params["w"]) ** 2, axis=0)
    return jnp.concatenate([data_loss, (params["s"] ** 2)[None]])

  x = jnp.array([[1.0, 0.5], [-0.3, 2.0], [0.7, 0.1]])
  expected = reference_gramian(loss_fn, params, (x,))
  actual = per_layer_gramian(loss_fn, params, (x,), num_objectives=3)
  assert_gramians_close(actual, expected, np.float32)


class Model(nnx.Module):
  """A trunk with BatchNorm and Dropout, and one head per task."""

  def __init__(self, rngs):
    self.trunk = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.trunk2 = nnx.Linear(8, 6, rngs=rngs)
    self.heads = nnx.Linear(6, NUM_TASKS, rngs=rngs)

  def __call__(self, x):
    hidden = self.drop(jax.nn.relu(self.norm(self.trunk(x))))
    return self.heads(jnp.tanh(self.trunk2(hidden)))


def nnx_loss(model, x, y):
  return _task_losses(model(x), y)


def _nnx_data(key):
  keys = jax.random.split(key)
  return (_normal(keys[0], (BATCH + 3, 4)),
          _normal(keys[1], (BATCH + 3, NUM_TASKS)))


def test_nnx_model_gramian():
  model = Model(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(rest)

  def pure_loss(pure_params, x, y):
    copy = nnx.merge(graphdef, pure_params, rest)
    return nnx_loss(copy, x, y), nnx.as_pure(nnx.state(copy, nnx.Not(
        nnx.Param)))

  data = _nnx_data(jax.random.key(2))
  pure = nnx.as_pure(params)
  expected = reference_gramian(pure_loss, pure, data, has_aux=True)
  actual = jax.jit(lambda p, d: per_layer.linearize(
      pure_loss, p, d, True).gramian(None, NUM_TASKS))(pure, data)
  assert_gramians_close(np.asarray(actual, np.float64), expected, np.float32)


@pytest.mark.parametrize("strategy", ["upgrad"])
def test_nnx_step_agrees_with_the_jacobian_mode(strategy):
  data = _nnx_data(jax.random.key(3))
  results = {}
  for mode in ("jacobian", "per_layer"):
    model = Model(nnx.Rngs(0))
    tx = getattr(optax_mtl, strategy)(num_tasks=NUM_TASKS)
    step = nnx.jit(mtl_nnx.value_and_grad(
        nnx_loss, tx, shared=nnx.Not(nnx.PathContains("heads")),
        gramian_mode=mode))
    state = tx.init(nnx.state(model, nnx.Param))
    (losses, grads), _ = step(model, state, *data)
    results[mode] = (losses, nnx.as_pure(grads), model.norm.mean[...])
  for expected, actual in zip(jax.tree.leaves(results["jacobian"]),
                              jax.tree.leaves(results["per_layer"])):
    np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("strategy, name", [("upgrad", "conv"),
                                            ("mgda", "mlp")])
def test_step_agrees_with_the_jacobian_mode(strategy, name):
  params, loss_fn, data = PROBLEMS[name](jax.random.key(4))
  shared = jax.tree.map(lambda _: True, params)
  shared["heads"] = False
  grads = {}
  for mode in ("jacobian", "per_layer"):
    tx = getattr(optax_mtl, strategy)(num_tasks=NUM_TASKS)
    step = jax.jit(optax_mtl.value_and_grad(loss_fn, tx, shared=shared,
                                            gramian_mode=mode))
    (_, grads[mode]), _ = step(params, tx.init(params), *data)
  for expected, actual in zip(jax.tree.leaves(grads["jacobian"]),
                              jax.tree.leaves(grads["per_layer"])):
    np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=1e-6)


def test_refused_options():
  tx = optax_mtl.upgrad(num_tasks=NUM_TASKS)
  loss_fn = lambda params, x: params * x
  with pytest.raises(ValueError, match="encoder_fn"):
    optax_mtl.value_and_grad(loss_fn, tx, gramian_mode="per_layer",
                             encoder_fn=lambda params, x: x)
  with pytest.raises(ValueError, match="axis_name='data'"):
    optax_mtl.value_and_grad(loss_fn, tx, gramian_mode="per_layer",
                             axis_name="data")
  with pytest.raises(ValueError, match="batch_axis must be .* got -1"):
    optax_mtl.value_and_grad(loss_fn, tx, gramian_mode="per_layer",
                             batch_axis=-1)
  with pytest.raises(ValueError, match="per_layer"):
    optax_mtl.value_and_grad(loss_fn, tx, gramian_mode="layers")


# --------------------------------------------------------------------------
# Instance-wise objectives (batch_axis): one loss per example.
# --------------------------------------------------------------------------


def iwrm_mlp(params, x, y):
  hidden = x
  for layer in params["trunk"]:
    hidden = jnp.tanh(hidden @ layer["w"] + layer["b"])
  return jnp.sum((_heads(params, hidden) - y) ** 2, axis=1)


def iwrm_conv(params, x, y):
  """A convolution, then a dense layer applied at every position (rows per
  example > 1), then a dense layer on the flattened features."""
  hidden = jax.lax.conv_general_dilated(
      x, params["conv"]["w"], (2, 2), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  hidden = jax.nn.relu(hidden + params["conv"]["b"])
  hidden = jnp.tanh(hidden @ params["pointwise"])  # [N, 4, 4, 4]
  hidden = jnp.tanh(hidden.reshape(hidden.shape[0], -1) @ params["dense"]["w"]
                    + params["dense"]["b"])
  return jnp.sum((_heads(params, hidden) - y) ** 2, axis=1)


IWRM = {"mlp": (mlp_problem, iwrm_mlp), "conv": (conv_problem, iwrm_conv)}


def _iwrm_problem(name, key, dtype):
  make, loss_fn = IWRM[name]
  params, _, data = make(key)
  if name == "conv":
    params["pointwise"] = _normal(jax.random.fold_in(key, 7), (4, 4), 0.5)
  return _cast(params, dtype), loss_fn, _cast(data, dtype)


@pytest.mark.parametrize("name", sorted(IWRM))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_example_gramian_is_that_of_the_per_example_jacobian(name, dtype):
  with jax.enable_x64(dtype == np.float64):
    params, loss_fn, data = _iwrm_problem(name, jax.random.key(5), dtype)
    expected = reference_gramian(loss_fn, params, data)
    actual = per_layer_gramian(loss_fn, params, data, num_objectives=BATCH,
                               batch_axis=0)
    assert_gramians_close(actual, expected, dtype)


def test_example_gramian_of_the_shared_parameters():
  params, loss_fn, data = _iwrm_problem("mlp", jax.random.key(6), np.float32)
  mask = jax.tree.map(lambda _: True, params)
  mask["heads"] = jax.tree.map(lambda _: False, params["heads"])
  expected = reference_gramian(loss_fn, params, data, mask)
  actual = per_layer_gramian(loss_fn, params, data, mask,
                             num_objectives=BATCH, batch_axis=0)
  assert_gramians_close(actual, expected, np.float32)


def test_iwrm_upgrad_step_agrees_with_the_jacobian_mode():
  params, loss_fn, data = _iwrm_problem("mlp", jax.random.key(7), np.float32)
  grads = {}
  for mode in ("jacobian", "per_layer"):
    tx = optax_mtl.upgrad(num_tasks=BATCH)
    step = jax.jit(optax_mtl.value_and_grad(loss_fn, tx, gramian_mode=mode,
                                            batch_axis=0))
    (_, grads[mode]), _ = step(params, tx.init(params), *data)
  for expected, actual in zip(jax.tree.leaves(grads["jacobian"]),
                              jax.tree.leaves(grads["per_layer"])):
    np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=1e-6)


def test_iwrm_refusals():
  params, loss_fn, (x, y) = _iwrm_problem("mlp", jax.random.key(8),
                                          np.float32)
  with pytest.raises(ValueError, match="no array argument has the batch"):
    per_layer.linearize(loss_fn, params, (x, y), False, batch_axis=1)
  with pytest.raises(ValueError, match=r"shape \(batch,\)"):
    per_layer.linearize(lambda p, x, y: loss_fn(p, x, y)[None], params,
                        (x, y), False, batch_axis=0)

  def mixes(params, x, y):  # a parameter applied to the batch mean
    mean = jnp.mean(x, axis=0) @ params["trunk"][0]["w"]
    return loss_fn(params, x, y) + jnp.sum(mean ** 2)

  with pytest.raises(ValueError, match="read another example"):
    per_layer.linearize(mixes, params, (x, y), False, batch_axis=0)

  def shared_term(params, x, y, probe):  # a term common to all examples
    common = jnp.sum((probe @ params["trunk"][0]["w"]) ** 2)
    return loss_fn(params, x, y) + common

  with pytest.raises(ValueError, match="no example axis"):
    per_layer.linearize(shared_term, params, (x, y, jnp.ones((2, 4))), False,
                        batch_axis=0)


def _nnx_example_loss(model, x, y):
  return jnp.sum((model(x) - y) ** 2, axis=1)


def test_iwrm_nnx_model_with_running_batchnorm_and_dropout():
  model = Model(nnx.Rngs(0))
  model.norm.use_running_average = True  # Examples stay apart.
  model.norm.mean[...] = jnp.linspace(-0.5, 0.5, 8)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(rest)

  def pure_loss(pure_params, x, y):
    copy = nnx.merge(graphdef, pure_params, rest)
    return _nnx_example_loss(copy, x, y)

  data = _nnx_data(jax.random.key(9))
  pure = nnx.as_pure(params)
  expected = reference_gramian(pure_loss, pure, data)
  actual = per_layer_gramian(pure_loss, pure, data,
                             num_objectives=BATCH + 3, batch_axis=0)
  assert_gramians_close(actual, expected, np.float32)


def test_iwrm_refuses_batchnorm_in_training_mode():
  model = Model(nnx.Rngs(0))
  tx = optax_mtl.upgrad(num_tasks=BATCH + 3)
  step = mtl_nnx.value_and_grad(_nnx_example_loss, tx,
                                gramian_mode="per_layer", batch_axis=0)
  with pytest.raises(ValueError, match="BatchNorm in training mode"):
    step(model, tx.init(nnx.state(model, nnx.Param)),
         *_nnx_data(jax.random.key(9)))


def test_the_jacobian_route_where_no_layer_is_cheaper():
  # A batch of 64 on layers of width 8 or less: every dense layer's
  # Gramian is cheaper through its per-task gradients, so the step takes
  # the Jacobian mode's route (from the same forward pass).
  params, loss_fn, _ = PROBLEMS["mlp"](jax.random.key(10))
  keys = jax.random.split(jax.random.key(11))
  data = (_normal(keys[0], (64, 4)), _normal(keys[1], (64, NUM_TASKS)))
  linearized = per_layer.linearize(loss_fn, params, data, False)
  assert not linearized.saves(None, NUM_TASKS)
  small = per_layer.linearize(loss_fn, params, (data[0][:3], data[1][:3]),
                              False)
  assert small.saves(None, NUM_TASKS)
  grads = {}
  for mode in ("jacobian", "per_layer"):
    tx = optax_mtl.upgrad(num_tasks=NUM_TASKS)
    step = jax.jit(optax_mtl.value_and_grad(loss_fn, tx, gramian_mode=mode))
    (_, grads[mode]), _ = step(params, tx.init(params), *data)
  for expected, actual in zip(jax.tree.leaves(grads["jacobian"]),
                              jax.tree.leaves(grads["per_layer"])):
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)
