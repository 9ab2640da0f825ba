"""Exact references (SciPy, or NumPy by enumeration), shared by the
strategies' tests."""

import itertools

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


def project_onto_dual_cone(jacobian, vector):
  """argmin_{Jy >= 0} ‖y − x‖, by enumerating the active constraints.

  The projection onto a polyhedral cone is the projection onto the null
  space of the rows active there: try every subset, keep the closest point
  that satisfies ``J y >= 0``.
  """
  jacobian = np.asarray(jacobian, np.float64)
  best, best_distance = None, np.inf
  for size in range(len(jacobian) + 1):
    for active in itertools.combinations(range(len(jacobian)), size):
      rows = jacobian[list(active)]
      point = vector - (np.linalg.pinv(rows) @ (rows @ vector) if size
                        else 0.0)
      if np.all(jacobian @ point >= -1e-10):
        distance = np.linalg.norm(point - vector)
        if distance < best_distance - 1e-14:
          best, best_distance = point, distance
  return best


def golden_section(function, low, high, iterations=100):
  """The minimiser of a unimodal ``function`` on [low, high] by golden
  sections (the bracket shrinks by 0.618 an iteration)."""
  ratio = (np.sqrt(5) - 1) / 2
  for _ in range(iterations):
    left, right = high - ratio * (high - low), low + ratio * (high - low)
    if function(left) <= function(right):
      high = right
    else:
      low = left
  return (low + high) / 2
