"""Small jittable solvers on the T×T Gramian ``G = J Jᵀ``.

Every iterative solver here runs in a ``lax.while_loop`` bounded by
``max_iters``, works in the dtype of the Gramian (float32 or float64), needs
no SciPy or cvxpy at run time, and returns a :class:`SolverResult` carrying its
diagnostics: iterations used, final optimality measure and a converged flag.
Under ``jit`` nothing can raise on a value, so a solver that runs out of
iterations says so in ``converged`` instead.

Each solver first divides the Gramian by its largest diagonal entry. The
problems solved are invariant under ``G → κ G`` (κ > 0), so the weights do not
change, and inputs whose entries range from 1e-10 to 1e10 are solved alike;
the reported ``gap`` is measured on the normalised problem (so it is relative
to the squared norm of the largest task gradient).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


class SolverResult(NamedTuple):
  """What an iterative solver returns."""

  weights: chex.Array  # [T] in the Gramian's dtype, the solution.
  iterations: chex.Array  # i32[], iterations used (0 for a closed form).
  gap: chex.Array  # [] Gramian's dtype, final optimality measure.
  converged: chex.Array  # bool[], gap <= tol within max_iters.


def default_tolerance(dtype) -> float:
  """The default ``tol`` of the solvers: 1e-6 in float32, 1e-12 in float64."""
  return 1e-12 if jnp.finfo(dtype).bits >= 64 else 1e-6


def _matvec(matrix, vector):
  return jnp.matmul(matrix, vector, precision=_HIGHEST)


def _normalise(gramian: chex.Array) -> chex.Array:
  """``G / max_i G_ii`` (``G`` itself when every diagonal entry is zero)."""
  gramian = jnp.asarray(gramian)
  if not jnp.issubdtype(gramian.dtype, jnp.floating):
    gramian = gramian.astype(jnp.float32)
  gramian = 0.5 * (gramian + gramian.T)
  scale = jnp.max(jnp.diag(gramian))
  return gramian / jnp.where(scale > 0, scale, jnp.ones_like(scale))


def _check_square(gramian: chex.Array) -> int:
  shape = jnp.shape(gramian)
  if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
    raise ValueError(f"gramian must be a square [T, T] matrix, got {shape}.")
  return shape[0]


def _check_iterations(max_iters, tol, dtype):
  if isinstance(max_iters, bool) or not isinstance(max_iters, int) or (
      max_iters < 1):
    raise ValueError(f"max_iters must be an integer >= 1, got {max_iters!r}.")
  if tol is None:
    return default_tolerance(dtype)
  if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (
      tol >= 0):
    raise ValueError(f"tol must be a real number >= 0 or None, got {tol!r}.")
  return float(tol)


# --------------------------------------------------------------------------
# Euclidean projection onto the probability simplex.
# --------------------------------------------------------------------------


def _check_warm_start(warm_start, num_tasks: int, dtype) -> chex.Array:
  warm_start = jnp.asarray(warm_start, dtype)
  if warm_start.shape != (num_tasks,):
    raise ValueError(f"warm_start must have shape ({num_tasks},), got "
                     f"{warm_start.shape}.")
  return warm_start


def _simplex_start(num_tasks: int, dtype, warm_start) -> chex.Array:
  """The Frank-Wolfe solvers' start: the uniform weights, or a guess.

  A guess (e.g. the previous training step's solution) is projected onto
  the simplex; a non-finite guess falls back to the uniform weights.
  """
  uniform = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
  if warm_start is None:
    return uniform
  warm_start = _check_warm_start(warm_start, num_tasks, dtype)
  finite = jnp.all(jnp.isfinite(warm_start))
  # The uniform weights lie on the simplex: projecting them changes nothing.
  return project_simplex(jnp.where(finite, warm_start, uniform))


def project_simplex(vector: chex.Array) -> chex.Array:
  r"""Euclidean projection onto the probability simplex (exact, no loop).

  .. math::
    \Pi_\Delta(x) = \operatorname*{argmin}_{w \ge 0,\ \mathbf 1^\top w = 1}
    \lVert w - x \rVert_2 = \max(x - \theta, 0),

  where the threshold ``θ`` is found by sorting ``x`` (Held, Wolfe & Crowder
  1974; Duchi et al. 2008). There is nothing to converge, so the projection is
  returned without diagnostics.

  Args:
    vector: ``x``, shape [T].

  Returns:
    The projection, shape [T], in the dtype of ``vector``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_mtl._src import solvers
    >>> solvers.project_simplex(jnp.array([0.5, 1.5, -1.0])).tolist()
    [0.0, 1.0, 0.0]
  """
  vector = jnp.asarray(vector)
  if not jnp.issubdtype(vector.dtype, jnp.floating):
    vector = vector.astype(jnp.float32)
  if vector.ndim != 1:
    raise ValueError(f"vector must have shape [T], got {vector.shape}.")
  size = vector.shape[0]
  descending = -jnp.sort(-vector)
  cumulative = jnp.cumsum(descending) - 1.0
  ranks = jnp.arange(1, size + 1, dtype=vector.dtype)
  # The support is the largest k with x_(k) > (Σ_{j<=k} x_(j) - 1) / k.
  in_support = descending * ranks > cumulative
  support_size = jnp.sum(in_support)
  threshold = cumulative[support_size - 1] / support_size.astype(vector.dtype)
  return jnp.maximum(vector - threshold, 0.0)


# --------------------------------------------------------------------------
# The min-norm point of the convex hull of the task gradients (MGDA).
# --------------------------------------------------------------------------


def solve_min_norm(
    gramian: chex.Array,
    *,
    max_iters: int = 500,
    tol: Optional[float] = None,
    warm_start: Optional[chex.Array] = None,
) -> SolverResult:
  r"""Weights of the min-norm point of the convex hull of the task gradients.

  .. math::
    w^\star = \operatorname*{argmin}_{w \in \Delta} w^\top G w,
    \qquad \Delta = \{w \ge 0,\ \mathbf 1^\top w = 1\},

  so that ``Σ_k w_k g_k`` is the min-norm point of ``conv{g_1 … g_T}``
  (Désidéri 2012; Sener & Koltun 2018, Algorithm 2).

  * ``T = 1``: ``w = [1]``; ``T = 2``: the closed form
    ``w_1 = clip((G_22 - G_12) / (G_11 + G_22 - 2 G_12), 0, 1)``.
  * ``T > 2``: pairwise Frank-Wolfe with exact line search (Lacoste-Julien &
    Jaggi 2015), started at the uniform weights or at ``warm_start``
    projected onto the simplex (e.g. the previous step's solution). Each
    step moves weight from the active task of largest ``(Gw)_k`` to the
    task of smallest ``(Gw)_k`` by the exact minimiser of the quadratic
    along that edge; it converges linearly on the simplex, where plain
    Frank-Wolfe slows down on ill-conditioned Gramians.

  The loop stops when the Frank-Wolfe duality gap
  ``2 (wᵀGw - min_k (Gw)_k) ≥ f(w) - f*`` (on ``G / max_k G_kk``) is at most
  ``tol``, or after ``max_iters`` iterations.

  Args:
    gramian: ``G``, shape [T, T], symmetric positive semi-definite.
    max_iters: the most Frank-Wolfe iterations.
    tol: the duality gap to reach; None: 1e-6 (float32) or 1e-12 (float64).
    warm_start: None, or a guess of ``w*``, shape [T] (used when T > 2).

  Returns:
    A :class:`SolverResult` whose ``weights`` lie on the simplex.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_mtl._src import solvers
    >>> result = solvers.solve_min_norm(jnp.array([[1.0, 0.0], [0.0, 4.0]]))
    >>> [round(w, 4) for w in result.weights.tolist()], bool(result.converged)
    ([0.8, 0.2], True)

  References:
    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018; Lacoste-Julien & Jaggi, "On the Global Linear Convergence of
    Frank-Wolfe Optimization Variants", NeurIPS 2015.
  """
  num_tasks = _check_square(gramian)
  gramian = _normalise(gramian)
  dtype = gramian.dtype
  tol = _check_iterations(max_iters, tol, dtype)
  start = _simplex_start(num_tasks, dtype, warm_start)
  zero_iterations = jnp.zeros([], jnp.int32)
  if num_tasks == 1:
    return SolverResult(jnp.ones((1,), dtype), zero_iterations,
                        jnp.zeros([], dtype), jnp.asarray(True))
  if num_tasks == 2:
    curvature = gramian[0, 0] + gramian[1, 1] - 2.0 * gramian[0, 1]
    numerator = gramian[1, 1] - gramian[0, 1]
    first = jnp.where(
        curvature > 0,
        jnp.clip(numerator / jnp.where(curvature > 0, curvature, 1.0), 0, 1),
        0.5)
    weights = jnp.stack([first, 1.0 - first]).astype(dtype)
    gap = _min_norm_gap(gramian, weights)
    return SolverResult(weights, zero_iterations, gap, gap <= max(tol, 0.0)
                        + 8 * jnp.finfo(dtype).eps)

  def gap_of(weights):
    return _min_norm_gap(gramian, weights)

  def cond(carry):
    _, iteration, gap = carry
    return (iteration < max_iters) & (gap > tol)

  def body(carry):
    weights, iteration, _ = carry
    product = _matvec(gramian, weights)
    toward = jnp.argmin(product)
    away = jnp.argmax(jnp.where(weights > 0, product, -jnp.inf))
    slope = product[away] - product[toward]  # >= 0, the descent rate.
    curvature = (gramian[toward, toward] + gramian[away, away]
                 - 2.0 * gramian[toward, away])
    largest = weights[away]
    step = jnp.where(curvature > 0,
                     jnp.minimum(slope / jnp.where(curvature > 0, curvature,
                                                   1.0), largest),
                     largest)
    step = jnp.where(slope > 0, step, 0.0)
    drop = step >= largest  # A drop step: the away task leaves the support.
    weights = weights.at[toward].add(step)
    weights = weights.at[away].set(
        jnp.where(drop, 0.0, weights[away] - step))
    return weights, iteration + 1, gap_of(weights)

  weights, iterations, gap = jax.lax.while_loop(
      cond, body, (start, zero_iterations, gap_of(start)))
  return SolverResult(weights, iterations, gap, gap <= tol)


def _min_norm_gap(gramian, weights):
  product = _matvec(gramian, weights)
  return jnp.maximum(2.0 * (jnp.dot(weights, product) - jnp.min(product)), 0.0)


# --------------------------------------------------------------------------
# The non-negative QP of UPGrad and DualProj.
# --------------------------------------------------------------------------


def solve_dual_cone_qp(
    gramian: chex.Array,
    lower: chex.Array,
    *,
    max_iters: int = 200,
    tol: Optional[float] = None,
    warm_start: Optional[chex.Array] = None,
) -> SolverResult:
  r"""The box-constrained QP whose solution projects ``Jᵀu`` onto a cone.

  .. math::
    v^\star = \operatorname*{argmin}_{v \ge u} v^\top G v,
    \qquad \Pi_{\{x : Jx \ge 0\}}(J^\top u) = J^\top v^\star,

  the dual of projecting ``Jᵀu`` onto the dual cone of the rows of ``J``
  (Quinton & Rey 2024, Proposition 1). With ``λ = v - u`` it is the
  non-negative least-squares problem ``min_{λ ≥ 0} ½ λᵀGλ + λᵀGu``, solved by
  the active-set method of Lawson & Hanson (1974) written on ``G``: a task is
  freed when its gradient ``(G v)_k`` is below ``-tol``; on the free set the
  equality-constrained problem is solved by a Cholesky factorisation (of
  the matrix plus ``T·eps`` on its unit diagonal, so that a singular block
  of duplicated or dependent gradients still factorises) refined twice
  against the exact matrix, with the interpolation step back to feasibility
  when a free variable turns negative. It ends in finitely many steps;
  ``max_iters`` bounds it under ``jit``.

  The cone does not change when a row of ``J`` is rescaled, so the problem
  is solved with unit rows (``G`` replaced by the cosine matrix ``D G D``,
  ``D = diag(1/‖g_k‖)``, ``u`` by ``D⁻¹u``, and ``v = D v'``): the tolerance
  then means the same for a task whose gradient is 1e4 times smaller than
  the others. The optimality measure ``gap`` is the projected-gradient
  residual ``‖λ - max(λ - G v, 0)‖_∞ / max(1, ‖v‖_∞)`` on that problem, zero
  exactly at the KKT point (``v ≥ u``, ``Gv ≥ 0``, ``(v - u) ⊙ Gv = 0``);
  the division keeps it meaningful when an ill-conditioned ``G`` gives a
  large ``v``.

  Warm start: given a guess of ``v*`` (e.g. the solution of the previous
  training step, whose Gramian is close), the tasks with ``v_k > u_k`` are
  taken as the starting free set. The equality-constrained problem is solved
  on it once; when that solution is feasible the active-set iterations start
  from there (and none are needed when it is also optimal), otherwise they
  start from the guess itself with the step back to feasibility. A guess
  changes only where the search starts, never the optimality test it has to
  pass.

  Args:
    gramian: ``G``, shape [T, T], symmetric positive semi-definite.
    lower: ``u``, shape [T].
    max_iters: the most active-set iterations (one linear solve each).
    tol: optimality measure to reach; None: 1e-6 (float32) or 1e-12
      (float64).
    warm_start: None, or a guess of ``v*``, shape [T] (see above).

  Returns:
    A :class:`SolverResult` with ``weights = v*`` (``J d ≥ 0`` for
    ``d = Jᵀ v*``); ``iterations`` is 0 when the warm start was optimal.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_mtl._src import solvers
    >>> gramian = jnp.array([[1.0, -1.0], [-1.0, 4.0]])
    >>> result = solvers.solve_dual_cone_qp(gramian, jnp.array([1.0, 0.0]))
    >>> [round(v, 4) for v in result.weights.tolist()], bool(result.converged)
    ([1.0, 0.25], True)

  References:
    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024;
    Lawson & Hanson, "Solving Least Squares Problems", 1974, chapter 23.
  """
  num_tasks = _check_square(gramian)
  gramian = _normalise(gramian)
  dtype = gramian.dtype
  tol = _check_iterations(max_iters, tol, dtype)
  lower = jnp.asarray(lower, dtype)
  if lower.shape != (num_tasks,):
    raise ValueError(
        f"lower must have shape ({num_tasks},), got {lower.shape}.")
  # The cone {x : Jx >= 0} does not change when the rows of J are rescaled:
  # solve with unit rows (G -> D G D, u -> u / D, v = D v'), so that the
  # tolerance applies to every task alike however small its gradient is.
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gramian), 0.0))
  row_scales = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0),
                         1.0)
  gramian = row_scales[:, None] * gramian * row_scales[None, :]
  lower = lower / row_scales
  linear = _matvec(gramian, lower)  # b = G u.
  identity = jnp.eye(num_tasks, dtype=dtype)

  def gradient_of(slack):
    return _matvec(gramian, slack) + linear

  def size_of(slack):
    return jnp.maximum(1.0, jnp.max(jnp.abs(slack + lower)))

  def residual(slack):
    gradient = gradient_of(slack)
    return jnp.max(jnp.abs(slack - jnp.maximum(slack - gradient, 0.0))) / (
        size_of(slack))

  def solve_on(free):
    both = free[:, None] & free[None, :]
    matrix = jnp.where(both, gramian, 0.0) + jnp.where(free, 0.0, 1.0) * identity
    # Cholesky with a jitter, refined: as accurate as a pseudo-inverse here
    # (the SciPy tests) and 5x faster than its eigendecomposition.
    jitter = num_tasks * jnp.finfo(dtype).eps * identity
    factor = jax.scipy.linalg.cho_factor(matrix + jitter, lower=True)
    target = jnp.where(free, -linear, 0.0)
    solve = lambda r: jax.scipy.linalg.cho_solve(factor, r)
    solution = solve(target)
    for _ in range(2):  # Iterative refinement: float32 on cond(G) ~ 1e6.
      solution = solution + solve(target - _matvec(matrix, solution))
    return jnp.where(free, solution, 0.0)

  def entering_task(slack, free):
    """The bound task of most negative gradient, and whether none is."""
    candidates = jnp.where(free, -jnp.inf, -gradient_of(slack))
    entering = jnp.argmax(candidates)
    return entering, candidates[entering] <= tol * size_of(slack)

  def cond(carry):
    _, _, _, iteration, done = carry
    return (iteration < max_iters) & ~done

  def body(carry):
    slack, free, backtracking, iteration, _ = carry
    entering, kkt = entering_task(slack, free)
    optimal = ~backtracking & kkt
    free = jnp.where(backtracking | optimal, free,
                     free.at[entering].set(True))
    trial = solve_on(free)
    feasible = jnp.all(jnp.where(free, trial > 0, True))
    # Step from slack towards trial until the first free variable hits zero.
    blocking = free & (trial <= 0)
    ratios = jnp.where(blocking,
                       slack / jnp.where(blocking, slack - trial, 1.0),
                       jnp.inf)
    step = jnp.clip(jnp.min(ratios), 0.0, 1.0)
    stepped = slack + step * (trial - slack)
    tiny = 10 * jnp.finfo(dtype).eps
    still_free = free & (stepped > tiny)
    new_slack = jnp.where(feasible, trial, jnp.where(still_free, stepped, 0.0))
    new_free = jnp.where(feasible, free, still_free)
    # A task freed this very step that is pushed straight back: the
    # remaining descent is below round-off, stop (the classic safeguard).
    stalled = ~backtracking & ~feasible & ~still_free[entering]
    new_slack = jnp.where(optimal, slack, new_slack)
    new_free = jnp.where(optimal, free, new_free)
    done = optimal | stalled
    new_slack = jnp.where(stalled, jnp.where(free, jnp.maximum(slack, 0.0),
                                             0.0), new_slack)
    new_free = jnp.where(stalled, free.at[entering].set(False), new_free)
    return (new_slack, new_free, ~feasible & ~done, iteration + 1, done)

  slack = jnp.zeros((num_tasks,), dtype)
  free = jnp.zeros((num_tasks,), bool)
  done = jnp.asarray(False)
  if warm_start is not None:
    warm_start = _check_warm_start(warm_start, num_tasks, dtype)
    guess = warm_start / row_scales - lower
    guessed_free = (guess > 10 * jnp.finfo(dtype).eps * size_of(guess)) & (
        jnp.isfinite(guess))
    trial = solve_on(guessed_free)
    usable = jnp.all(jnp.where(guessed_free, trial > 0, True))
    # Feasible and optimal on the guessed free set: done. Feasible: iterate
    # from there. Not feasible: start from the guess itself (feasible,
    # zero off the free set) and step towards that solution as Lawson and
    # Hanson's inner loop does.
    slack = jnp.where(usable, trial, jnp.where(guessed_free, guess, 0.0))
    free = guessed_free
    backtracking = ~usable
    done = usable & entering_task(slack, free)[1]
  else:
    backtracking = jnp.asarray(False)
  start = (slack, free, backtracking, jnp.zeros([], jnp.int32), done)
  slack, _, _, iterations, _ = jax.lax.while_loop(cond, body, start)
  gap = residual(slack)
  return SolverResult((slack + lower) * row_scales, iterations, gap,
                      gap <= jnp.maximum(tol, 100 * jnp.finfo(dtype).eps))


# --------------------------------------------------------------------------
# The inner problem of CAGrad.
# --------------------------------------------------------------------------


def solve_cagrad(
    gramian: chex.Array,
    c: float,
    *,
    max_iters: int = 500,
    tol: Optional[float] = None,
    warm_start: Optional[chex.Array] = None,
) -> SolverResult:
  r"""The dual problem of CAGrad, written on the Gramian.

  .. math::
    w^\star = \operatorname*{argmin}_{w \in \Delta}
      g_w^\top g_0 + \sqrt{\phi}\, \lVert g_w \rVert
    = \operatorname*{argmin}_{w \in \Delta}
      w^\top G m + c \sqrt{m^\top G m}\, \sqrt{w^\top G w},

  with ``g_w = Jᵀw``, ``g_0 = Jᵀm`` the mean gradient (``m = 1/T``) and
  ``φ = c² ‖g_0‖²`` (Liu et al. 2021, Eq. 4). Solved by pairwise Frank-Wolfe
  with exact line search from the uniform weights, or from ``warm_start``
  projected onto the simplex: along an edge
  ``w + γ(e_s - e_v)`` the objective is ``αγ + √φ √(Aγ² + 2Bγ + C)``, whose
  minimiser has a closed form. The loop stops when the Frank-Wolfe duality gap
  ``∇h(w)ᵀ(w - e_s) ≥ h(w) - h*`` (on ``G / max_k G_kk``) is at most ``tol``.

  Args:
    gramian: ``G``, shape [T, T], symmetric positive semi-definite.
    c: the radius ``c ≥ 0`` of the trust region around ``g_0`` (a Python
      number, or a scalar array under ``jit``).
    max_iters: the most Frank-Wolfe iterations.
    tol: the duality gap to reach; None: 1e-6 (float32) or 1e-12 (float64).
    warm_start: None, or a guess of ``w*``, shape [T].

  Returns:
    A :class:`SolverResult` whose ``weights`` ``w*`` lie on the simplex.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_mtl._src import solvers
    >>> result = solvers.solve_cagrad(jnp.array([[1.0, 0.0], [0.0, 1.0]]), 0.5)
    >>> [round(w, 4) for w in result.weights.tolist()]
    [0.5, 0.5]

  References:
    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021.
  """
  num_tasks = _check_square(gramian)
  gramian = _normalise(gramian)
  dtype = gramian.dtype
  tol = _check_iterations(max_iters, tol, dtype)
  if isinstance(c, bool) or (isinstance(c, (int, float)) and not c >= 0):
    raise ValueError(f"c must be a real number >= 0, got {c!r}.")
  c = jnp.asarray(c, dtype)
  mean = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
  linear = _matvec(gramian, mean)  # G m.
  radius = c * jnp.sqrt(jnp.maximum(jnp.dot(mean, linear), 0.0))  # √φ.
  tiny = jnp.finfo(dtype).tiny ** 0.5

  def objective_parts(weights):
    product = _matvec(gramian, weights)
    norm = jnp.sqrt(jnp.maximum(jnp.dot(weights, product), 0.0))
    gradient = linear + radius * product / jnp.maximum(norm, tiny)
    return product, norm, gradient

  def gap_of(weights):
    _, _, gradient = objective_parts(weights)
    return jnp.maximum(jnp.dot(gradient, weights) - jnp.min(gradient), 0.0)

  def along(step, alpha, quad_a, quad_b, quad_c):
    squared = jnp.maximum(quad_c + 2.0 * quad_b * step + quad_a * step**2, 0.0)
    return alpha * step + radius * jnp.sqrt(squared)

  def cond(carry):
    _, iteration, gap = carry
    return (iteration < max_iters) & (gap > tol)

  def body(carry):
    weights, iteration, _ = carry
    product, norm, gradient = objective_parts(weights)
    toward = jnp.argmin(gradient)
    away = jnp.argmax(jnp.where(weights > 0, gradient, -jnp.inf))
    largest = weights[away]
    quad_a = jnp.maximum(gramian[toward, toward] + gramian[away, away]
                         - 2.0 * gramian[toward, away], 0.0)
    quad_b = product[toward] - product[away]
    quad_c = norm**2
    alpha = linear[toward] - linear[away]
    # Stationary point of αγ + r √q(γ): q(γ*) = r² D / (r² A - α²).
    discriminant = jnp.maximum(quad_a * quad_c - quad_b**2, 0.0)
    denominator = radius**2 * quad_a - alpha**2
    has_interior = (denominator > 0) & (quad_a > 0)
    target = radius**2 * discriminant / jnp.where(has_interior, denominator,
                                                  1.0)
    offset = jnp.sqrt(jnp.maximum(quad_a * target - discriminant, 0.0))
    interior = (-quad_b - jnp.sign(alpha) * offset) / jnp.where(
        quad_a > 0, quad_a, 1.0)
    interior = jnp.clip(interior, 0.0, largest)
    # The objective is convex along the edge: the clipped stationary point is
    # the minimiser when there is one; otherwise it is monotone on the edge.
    endpoint = jnp.where(
        along(largest, alpha, quad_a, quad_b, quad_c)
        < along(jnp.zeros_like(largest), alpha, quad_a, quad_b, quad_c),
        largest, 0.0)
    step = jnp.where(has_interior, interior, endpoint)
    drop = step >= largest
    weights = weights.at[toward].add(step)
    weights = weights.at[away].set(jnp.where(drop, 0.0, weights[away] - step))
    return weights, iteration + 1, gap_of(weights)

  if num_tasks == 1:
    return SolverResult(jnp.ones((1,), dtype), jnp.zeros([], jnp.int32),
                        jnp.zeros([], dtype), jnp.asarray(True))
  start = _simplex_start(num_tasks, dtype, warm_start)
  weights, iterations, gap = jax.lax.while_loop(
      cond, body, (start, jnp.zeros([], jnp.int32), gap_of(start)))
  return SolverResult(weights, iterations, gap, gap <= tol)
