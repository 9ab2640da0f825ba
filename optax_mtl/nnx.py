"""optax_mtl for Flax NNX: training steps that take the ``nnx.Module`` itself.

Import it explicitly (optax_mtl itself does not need Flax)::

  from optax_mtl import nnx as mtl_nnx

* :func:`value_and_grad` — the training-step face: ``step(model,
  strategy_state, *args)`` returns the losses and the combined gradient as an
  ``nnx.State`` for ``nnx.Optimizer.update``, and updates the model's
  BatchNorm statistics and Dropout RNG state as ``nnx.value_and_grad`` would.
  ``shared=`` takes an NNX filter; ``encoder_fn=`` balances the tasks on the
  shared features at about one backward pass's cost.
* :func:`value_and_jacobian` — the optax face: the per-task gradients for
  ``nnx.Optimizer(model, optax.chain(strategy, ...), wrt=nnx.Param)``.
* :func:`shared_mask` — an NNX filter as the mask that
  :func:`optax_mtl.with_shared_parameters` takes.
"""

from optax_mtl._src.nnx import shared_mask
from optax_mtl._src.nnx import value_and_grad
from optax_mtl._src.nnx import value_and_jacobian

__all__ = (
    "shared_mask",
    "value_and_grad",
    "value_and_jacobian",
)
