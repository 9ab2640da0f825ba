"""Multi-task evaluation metrics: Δm% and negative transfer.

Compare a multi-task model with single-task models of the same architecture
and budget, on one score per task (and one row per seed)::

    from optax_mtl import metrics
    delta = metrics.delta_m(mtl_scores, stl_scores.mean(0), higher_is_better)
    worse = metrics.negative_transfer_mask(mtl_scores, stl_scores,
                                           higher_is_better)

Definitions and conventions: ``optax_mtl/_src/metrics.py``.
"""

from optax_mtl._src.metrics import delta_m
from optax_mtl._src.metrics import mean_and_std
from optax_mtl._src.metrics import negative_transfer_count
from optax_mtl._src.metrics import negative_transfer_mask
from optax_mtl._src.metrics import relative_change

__all__ = (
    "delta_m",
    "mean_and_std",
    "negative_transfer_count",
    "negative_transfer_mask",
    "relative_change",
)
