"""Convolutions rewritten into the form XLA:CPU runs fast inside control flow.

The values must not change (checked against a direct convolution written in
NumPy and against the function as written); what changes is the form of the
convolutions in the compiled program, checked on XLA's optimised HLO: every
convolution, also inside ``lax.cond`` and ``lax.map``, ends up canonical
(``b01f_01io->b01f``), which is what keeps XLA:CPU off its naive loop nest.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from optax_mtl._src import conv_layout

# ε of float32 times the number of terms summed per output (9 taps x 4
# channels) and a margin for the order of summation.
RTOL = 50 * float(jnp.finfo(jnp.float32).eps) * 36


def direct_convolution(image, kernel):
  """NumPy reference: NCHW image, OIHW kernel, stride 1, VALID padding."""
  batch, _, height, width = image.shape
  out_channels, _, k_h, k_w = kernel.shape
  out = np.zeros((batch, out_channels, height - k_h + 1, width - k_w + 1))
  for row in range(out.shape[2]):
    for col in range(out.shape[3]):
      patch = image[:, :, row:row + k_h, col:col + k_w]
      out[:, :, row, col] = np.einsum("bchw,ochw->bo", patch, kernel)
  return out


def test_a_rewritten_nchw_convolution_matches_numpy():
  keys = jax.random.split(jax.random.key(0), 2)
  image = jax.random.normal(keys[0], (2, 4, 7, 6))
  kernel = jax.random.normal(keys[1], (5, 4, 3, 3))
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID")
  rewritten = conv_layout.canonical_convolutions(conv)
  assert conv_layout.has_noncanonical_convolution(
      jax.make_jaxpr(conv)(image, kernel))
  assert not conv_layout.has_noncanonical_convolution(
      jax.make_jaxpr(rewritten)(image, kernel))
  np.testing.assert_allclose(
      rewritten(image, kernel),
      direct_convolution(np.asarray(image, np.float64),
                         np.asarray(kernel, np.float64)), rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("layout,groups,strides,dilation", [
    (("NHWC", "HWIO", "NHWC"), 1, (2, 2), (1, 1)),
    (("NCHW", "OIHW", "NCHW"), 2, (1, 2), (2, 1)),
    (("NWC", "WIO", "NWC"), 1, (2,), (1,)),
    (("NCW", "OIW", "NCW"), 4, (1,), (2,)),
])
def test_gradients_through_rewritten_convolutions_are_unchanged(
    layout, groups, strides, dilation):
  keys = jax.random.split(jax.random.key(1), 2)
  image_sizes = {"N": 3, "C": 4, "H": 9, "W": 8}
  kernel_sizes = {"O": 8, "I": 4 // groups, "H": 3, "W": 3}
  image = jax.random.normal(keys[0], [image_sizes[d] for d in layout[0]])
  kernel = jax.random.normal(keys[1], [kernel_sizes[d] for d in layout[1]])

  def loss(kernel, image):
    out = jax.lax.conv_general_dilated(
        image, kernel, strides, "SAME", rhs_dilation=dilation,
        dimension_numbers=layout, feature_group_count=groups)
    return jnp.sum(jnp.tanh(out) ** 2)

  grad = jax.grad(loss, argnums=(0, 1))
  rewritten = conv_layout.canonical_convolutions(grad)
  assert not conv_layout.has_noncanonical_convolution(
      jax.make_jaxpr(rewritten)(kernel, image))
  for want, have in zip(grad(kernel, image), rewritten(kernel, image)):
    np.testing.assert_allclose(have, want, rtol=RTOL, atol=RTOL)


def test_a_function_without_convolutions_is_called_as_it_is():
  calls = []

  def fun(x):
    calls.append(1)
    return jnp.sin(x)

  out = conv_layout.canonical_convolutions(fun)(jnp.ones(3))
  np.testing.assert_array_equal(out, jnp.sin(jnp.ones(3)))
  assert len(calls) == 2  # Traced once to look, then called.


def test_convolutions_inside_jit_and_custom_jvp_are_rewritten():
  @jax.jit
  def inner(x, w):
    return jax.nn.relu(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME"))

  x = jnp.ones((1, 2, 5, 5))
  w = jnp.ones((3, 2, 3, 3))
  fun = lambda x, w: jax.grad(lambda w: jnp.sum(inner(x, w)))(w)
  assert conv_layout.has_noncanonical_convolution(jax.make_jaxpr(fun)(x, w))
  rewritten = conv_layout.canonical_convolutions(fun)
  assert not conv_layout.has_noncanonical_convolution(
      jax.make_jaxpr(rewritten)(x, w))
  np.testing.assert_allclose(rewritten(x, w), fun(x, w), rtol=RTOL)


# --------------------------------------------------------------------------
# The engine: recompute_every and low_memory on a conv trunk.
# --------------------------------------------------------------------------

NUM_TASKS = 3


def conv_model():
  keys = jax.random.split(jax.random.key(2), 5)
  params = {"c1": 0.3 * jax.random.normal(keys[0], (3, 3, 1, 4)),
            "c2": 0.2 * jax.random.normal(keys[1], (3, 3, 4, 8)),
            "heads": 0.1 * jax.random.normal(keys[2], (32, NUM_TASKS))}
  images = jax.random.normal(keys[3], (6, 4, 4, 1))
  targets = jax.random.normal(keys[4], (6, NUM_TASKS))

  def loss_fn(params, images, targets):
    dims = ("NHWC", "HWIO", "NHWC")
    hidden = jax.nn.relu(jax.lax.conv_general_dilated(
        images, params["c1"], (1, 1), "SAME", dimension_numbers=dims))
    hidden = jax.nn.relu(jax.lax.conv_general_dilated(
        hidden, params["c2"], (2, 2), "SAME", dimension_numbers=dims))
    out = hidden.reshape(hidden.shape[0], -1) @ params["heads"]
    return jnp.mean((out - targets) ** 2, axis=0)

  return params, loss_fn, (images, targets)


_CONV_LABELS = re.compile(r"convolution\([^)]*\).*?dim_labels=(\S+?),")


def nested_dim_labels(fun, *args):
  """The dim_labels of every convolution in XLA's optimised program outside
  its entry computation (in the bodies of cond, while, map)."""
  text = jax.jit(fun).lower(*args).compile().as_text()
  nested = text.split("\nENTRY ")[0]
  return _CONV_LABELS.findall(nested)


@pytest.mark.parametrize("variant", ["recompute_every", "low_memory"])
def test_every_compiled_convolution_is_canonical(variant):
  params, loss_fn, batch = conv_model()
  strategy = optax_mtl.upgrad(NUM_TASKS)
  if variant == "recompute_every":
    strategy = optax_mtl.recompute_every(strategy, 2)
    step = optax_mtl.value_and_grad(loss_fn, strategy)
  else:
    step = optax_mtl.value_and_grad(loss_fn, strategy,
                                    gramian_mode="low_memory")
  labels = nested_dim_labels(step, params, strategy.init(params), *batch)
  assert labels, "no convolution found inside control flow"
  assert set(labels) == {"b01f_01io->b01f"}, labels


def test_recompute_every_on_a_conv_trunk_gives_the_strategy_then_reuses():
  params, loss_fn, batch = conv_model()
  inner = optax_mtl.upgrad(NUM_TASKS)
  strategy = optax_mtl.recompute_every(inner, 2)
  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  (_, grads0), state = step(params, strategy.init(params), *batch)
  (_, want0), inner_state = jax.jit(optax_mtl.value_and_grad(loss_fn, inner))(
      params, inner.init(params), *batch)
  for have, want in zip(jax.tree.leaves(grads0), jax.tree.leaves(want0)):
    np.testing.assert_allclose(have, want, rtol=RTOL, atol=1e-6)
  moved = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads0)
  (_, grads1), _ = step(moved, state, *batch)
  # In between: one backward pass with the weights of the recomputing step.
  reused = jax.grad(lambda p: jnp.dot(inner_state.weights,
                                      loss_fn(p, *batch)))(moved)
  for have, want in zip(jax.tree.leaves(grads1), jax.tree.leaves(reused)):
    np.testing.assert_allclose(have, want, rtol=RTOL, atol=1e-6)


def test_low_memory_on_a_conv_trunk_matches_the_jacobian_mode():
  params, loss_fn, batch = conv_model()
  strategy = optax_mtl.upgrad(NUM_TASKS)
  outs = [jax.jit(optax_mtl.value_and_grad(loss_fn, strategy,
                                           gramian_mode=mode))(
              params, strategy.init(params), *batch)
          for mode in ("jacobian", "low_memory")]
  for have, want in zip(jax.tree.leaves(outs[1][0]),
                        jax.tree.leaves(outs[0][0])):
    np.testing.assert_allclose(have, want, rtol=RTOL, atol=1e-6)
