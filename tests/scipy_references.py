"""Exact references by SciPy, shared by the strategies' tests."""

import numpy as np
from scipy import optimize


def simplex_projection(vector):
  """argmin_{w ∈ Δ} ‖w − v‖², by SciPy's SLSQP (an exact QP reference)."""
  vector = np.asarray(vector, np.float64)
  size = len(vector)
  result = optimize.minimize(
      lambda w: np.sum((w - vector) ** 2), np.full(size, 1.0 / size),
      jac=lambda w: 2 * (w - vector), method="SLSQP",
      bounds=[(0, None)] * size,
      constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0}],
      options={"ftol": 1e-15, "maxiter": 500})
  return result.x
