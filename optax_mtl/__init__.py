"""optax_mtl: multi-task loss weighting and gradient balancing for JAX.

Every strategy is a factory ``optax_mtl.<name>(num_tasks, ...)`` returning an
``optax.GradientTransformationExtraArgs`` whose ``update(task_grads, state,
params=None, *, task_losses)`` combines per-task gradients, and
:func:`value_and_grad` turns a per-task loss function into a training step
that computes only what the strategy needs.
"""

from optax_mtl._src.base import MultiTaskStrategy
from optax_mtl._src.base import Needs
from optax_mtl._src.base import PeriodicState
from optax_mtl._src.base import Weighting
from optax_mtl._src.engine import value_and_grad
from optax_mtl._src.tree import cosine_matrix
from optax_mtl._src.tree import gramian
from optax_mtl._src.weighting._equal import EqualState
from optax_mtl._src.weighting._equal import equal
from optax_mtl._src.weighting._normalized_gradients import NormalizedGradientsState
from optax_mtl._src.weighting._normalized_gradients import normalized_gradients

__version__ = "0.1.0"

__all__ = (
    "EqualState",
    "MultiTaskStrategy",
    "Needs",
    "NormalizedGradientsState",
    "PeriodicState",
    "Weighting",
    "cosine_matrix",
    "equal",
    "gramian",
    "normalized_gradients",
    "value_and_grad",
)
