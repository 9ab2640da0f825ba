"""Problems on the probability simplex: MGDA's min-norm point and CAGrad's
dual, solved by one pairwise Frank-Wolfe loop with a corrective step."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src.solvers import _active_set
from optax_mtl._src.solvers import _common

# The default max_iters of solve_min_norm and solve_cagrad. With the
# corrective step an iteration usually settles one task of the support, so
# a few times T iterations suffice (T <= 256 in the tests); the bound is
# for the rare ill-conditioned problem that creeps.
DEFAULT_MAX_ITERS = 1000


# --------------------------------------------------------------------------
# Euclidean projection onto the probability simplex.
# --------------------------------------------------------------------------


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
    The projection, shape [T], in the dtype of ``vector`` (at least float32).

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_mtl._src import solvers
    >>> solvers.project_simplex(jnp.array([0.5, 1.5, -1.0])).tolist()
    [0.0, 1.0, 0.0]
  """
  vector = jnp.asarray(vector)
  vector = vector.astype(_common.working_dtype(vector.dtype))
  if vector.ndim != 1:
    raise ValueError(f"vector must have shape [T], got {vector.shape}.")
  size = vector.shape[0]
  # The projection does not change when a constant is added to x: centring
  # on the largest entry keeps the sums exact for entries of any magnitude.
  vector = vector - jnp.max(vector)
  descending = -jnp.sort(-vector)
  cumulative = jnp.cumsum(descending) - 1
  ranks = jnp.arange(1, size + 1, dtype=vector.dtype)
  # The support is the largest k with x_(k) > (Σ_{j<=k} x_(j) - 1) / k; the
  # largest entry always belongs to it.
  in_support = descending * ranks > cumulative
  support_size = jnp.maximum(jnp.sum(in_support), 1)
  threshold = cumulative[support_size - 1] / support_size.astype(vector.dtype)
  return jnp.maximum(vector - threshold, 0)


def _simplex_start(num_tasks: int, dtype, warm_start) -> chex.Array:
  """The uniform weights, or a guess projected onto the simplex.

  A non-finite guess falls back to the uniform weights.
  """
  uniform = jnp.full((num_tasks,), 1 / num_tasks, dtype)
  if warm_start is None:
    return uniform
  warm_start = _common.check_vector("warm_start", warm_start, num_tasks, dtype)
  finite = jnp.all(jnp.isfinite(warm_start))
  # The uniform weights lie on the simplex: projecting them changes nothing.
  guess = jnp.where(finite, warm_start, uniform)
  # A point of the simplex (to round-off) is kept as it is: the projection
  # would move it by a rounding unit, and a certified point must stay so.
  on_simplex = jnp.all(guess >= 0) & (
      jnp.abs(jnp.sum(guess) - 1) <= _common.resolve_cutoff(dtype, num_tasks,
                                                             1))
  return jnp.where(on_simplex, guess, project_simplex(guess))


# --------------------------------------------------------------------------
# The one pairwise Frank-Wolfe loop.
# --------------------------------------------------------------------------


class Objective(NamedTuple):
  """What a problem on the simplex gives the Frank-Wolfe loop.

  All take the weights ``w`` and ``p = G w``.
  """

  # (w, p) -> h(w), the objective the loop decreases.
  value: Callable[..., chex.Array]
  # (w, p) -> (gradient [T], relative gap []): ∇h(w), whose smallest and
  # largest entries pick the pairwise step, and the certificate of
  # :func:`_common.relative_gap`.
  measure: Callable[..., tuple[chex.Array, chex.Array]]
  # (w, p, δ, Gδ, γ_max) -> γ: the exact minimiser of h(w + γδ) on
  # [0, γ_max].
  line_search: Callable[..., chex.Array]
  # (w, p) -> δ: from w to the minimiser of h on the affine hull of the
  # support of w (zero off it, Σδ = 0); zeros for none.
  corrective: Callable[..., chex.Array]


def pairwise_frank_wolfe(
    objective: Objective,
    gramian: chex.Array,
    start: chex.Array,
    *,
    max_iters: int,
    tol: float,
) -> tuple[chex.Array, chex.Array, chex.Array, chex.Array]:
  r"""Minimises a convex ``h`` on the simplex: pairwise FW + a corrective step.

  Each iteration, from ``w`` with ``∇h(w)``:

  1. *Pairwise step* (Lacoste-Julien & Jaggi 2015): move weight from the
     task of the support with the largest ``∇h_k`` (away) to the task with
     the smallest (toward), along ``e_toward − e_away``, by the exact line
     search on ``[0, w_away]``. A step of ``w_away`` drops the away task.
     This is what finds the support.
  2. *Corrective step*: to the minimiser of ``h`` on the affine hull of
     the support (the objective's ``corrective`` direction, exact: the
     min-norm point of the hull as in Wolfe's 1976 algorithm, CAGrad's in
     closed form), or up to the boundary of the simplex where a task
     blocks it (that task leaves the support; ``h`` is convex along the
     direction, so no line search is needed). Once the support is right
     this step lands on the optimum, where plain pairwise steps creep on
     ill-conditioned problems. It is kept unless ``h`` increases by more
     than the round-off of comparing the two values (``T ε`` of their
     size): near the optimum both are round-off apart.

  Both steps decrease ``h``. The loop stops when the objective's relative
  gap is at most ``tol``, after ``max_iters`` iterations, or when an
  iteration leaves ``w`` unchanged (round-off: ``stalled``).

  Args:
    objective: the problem, an :class:`Objective`.
    gramian: the [T, T] matrix whose products ``p = Gw`` and ``Gδ`` the
      objective reads (``G`` prepared by :func:`_common.prepare_gramian`;
      CAGrad passes its smoothed ``G + κ nnᵀ``).
    start: a point of the simplex [T].
    max_iters: the most iterations.
    tol: the relative gap to reach.

  Returns:
    ``(weights, iterations, gap, stalled)``.
  """
  num_tasks = start.shape[0]
  indices = jnp.arange(num_tasks)

  def pairwise_step(weights, product, gradient):
    toward = jnp.argmin(gradient)
    away = jnp.argmax(jnp.where(weights > 0, gradient, -jnp.inf))
    direction = ((indices == toward).astype(weights.dtype)
                 - (indices == away).astype(weights.dtype))
    direction_product = gramian[:, toward] - gramian[:, away]
    largest = weights[away]
    step = objective.line_search(weights, product, direction,
                                 direction_product, largest)
    step = jnp.where(toward == away, 0, step)
    drop = step >= largest
    weights = weights.at[toward].add(step)
    return weights.at[away].set(jnp.where(drop, 0, weights[away] - step))

  def corrective_step(weights, product):
    direction = objective.corrective(weights, product)
    shrinking = direction < 0
    ratios = jnp.where(shrinking,
                       weights / jnp.where(shrinking, -direction, 1), jnp.inf)
    blocking = jnp.argmin(ratios)
    largest = jnp.where(jnp.any(shrinking), ratios[blocking], jnp.inf)
    # h is convex along δ with its minimum at the target (γ = 1): the step
    # is 1, or up to the boundary where a task blocks it.
    step = jnp.minimum(largest, 1)
    moved = jnp.maximum(weights + step * direction, 0)
    # Exactly on the boundary: the blocking task leaves the support.
    moved = jnp.where((step >= largest) & (indices == blocking), 0, moved)
    total = jnp.sum(moved)
    moved = moved / jnp.where(total > 0, total, 1)
    # Kept if h does not increase beyond the round-off of comparing it.
    before = objective.value(weights, product)
    after = objective.value(moved, _common.matvec(gramian, moved))
    better = ((total > 0) & jnp.all(jnp.isfinite(moved)) & (
        after <= before + _common.resolve_cutoff(
            before.dtype, num_tasks, jnp.abs(before) + jnp.abs(after))))
    return jnp.where(better, moved, weights)

  def cond(carry):
    _, iteration, _, gap, stalled = carry
    return (iteration < max_iters) & (gap > tol) & ~stalled

  def body(carry):
    weights, iteration, gradient, _, _ = carry
    product = _common.matvec(gramian, weights)
    moved = pairwise_step(weights, product, gradient)
    moved = corrective_step(moved, _common.matvec(gramian, moved))
    new_gradient, gap = objective.measure(moved,
                                          _common.matvec(gramian, moved))
    stalled = jnp.all(moved == weights)
    return moved, iteration + 1, new_gradient, gap, stalled

  gradient, gap = objective.measure(start, _common.matvec(gramian, start))
  weights, iterations, _, gap, stalled = jax.lax.while_loop(
      cond, body,
      (start, jnp.zeros([], jnp.int32), gradient, gap, jnp.asarray(False)))
  return weights, iterations, gap, stalled


def _exact_line_search_quadratic(weights, product, direction,
                                 direction_product, largest):
  """``argmin_{0 ≤ γ ≤ γ_max} (w + γδ)ᵀG(w + γδ)``: clip ``-wᵀGδ / δᵀGδ``."""
  curvature = _common.dot(direction, direction_product)
  slope = _common.dot(product, direction)
  step = jnp.where(curvature > 0,
                   jnp.clip(-slope / jnp.where(curvature > 0, curvature, 1),
                            0, largest),
                   jnp.where(slope < 0, largest, 0))
  del weights
  return step


# --------------------------------------------------------------------------
# The min-norm point of the convex hull of the task gradients (MGDA).
# --------------------------------------------------------------------------


def solve_min_norm(
    gramian: chex.Array,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
    tol: Optional[float] = None,
    warm_start: Optional[chex.Array] = None,
) -> _common.SolverResult:
  r"""Weights of the min-norm point of the convex hull of the task gradients.

  .. math::
    w^\star = \operatorname*{argmin}_{w \in \Delta} f(w) = w^\top G w,
    \qquad \Delta = \{w \ge 0,\ \mathbf 1^\top w = 1\},

  so that ``d = Σ_k w_k g_k`` is the min-norm point of ``conv{g_1 … g_T}``
  (Désidéri 2012; Sener & Koltun 2018, Algorithm 2).

  * ``T = 1``: ``w = [1]``; ``T = 2``: the closed form
    ``w_1 = clip((G_22 - G_12) / (G_11 + G_22 - 2 G_12), 0, 1)``.
  * A task with a zero gradient (``G_kk = 0``): ``d = 0`` exactly, with the
    weight spread evenly over the zero-gradient tasks (no iteration).
  * Otherwise :func:`pairwise_frank_wolfe` from the uniform weights, or
    from ``warm_start`` projected onto the simplex (e.g. the previous
    step's solution). Its corrective step goes to the min-norm point of the
    affine hull of the support, ``w_S ∝ (G_SS + μI)⁻¹ 1`` (Wolfe 1976;
    ``μ = T ε`` on the scaled ``G`` lets duplicated tasks factorise).

  Stopping test (:func:`_common.relative_gap`): the Frank-Wolfe duality gap
  ``2 (f(w) − min_k (Gw)_k) ≥ f(w) − f*`` relative to ``f(w)``, with the
  round-off floor ``2 T ε (nᵀw)(nᵀw + n_s)`` (``n_k = ‖g_k‖``, ``s`` the
  toward task). ``gap ≤ tol`` bounds the direction's error:
  ``‖d − d*‖ ≤ √tol ‖d‖``. The test does not change when ``G`` is
  multiplied by any ``c > 0``, and a Pareto-stationary point (``d* = 0``)
  converges once ``f(w)`` is at round-off.

  Defaults: ``max_iters = 1000`` (the corrective step settles about one
  task of the support per iteration: 1 to 13 iterations on the review's
  T ≤ 10 problems with norms 1 … 1e4, 33 at T = 128 with gradients of rank
  64, where plain pairwise steps did not converge in 10 000), ``tol`` from
  :func:`_common.default_tolerance` (1e-6 in float32, 1e-12 in float64).

  Args:
    gramian: ``G``, shape [T, T], symmetric positive semi-definite; solved
      in its dtype (float64 stays float64; below float32, float32).
    max_iters: the most iterations.
    tol: the relative duality gap to reach; None: the default above.
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
    NeurIPS 2018; Wolfe, "Finding the nearest point in a polytope", Math.
    Programming 1976; Lacoste-Julien & Jaggi, "On the Global Linear
    Convergence of Frank-Wolfe Optimization Variants", NeurIPS 2015.
  """
  prepared = _common.prepare_gramian(gramian)
  gramian, num_tasks, dtype = (prepared.matrix, prepared.num_tasks,
                               prepared.dtype)
  max_iters = _common.check_max_iters(max_iters)
  tol = _common.check_tolerance(tol, dtype)
  start = _simplex_start(num_tasks, dtype, warm_start)
  norms = _common.gradient_norms(gramian)

  def measure(weights, product):
    value = jnp.maximum(_common.dot(weights, product), 0)
    toward = jnp.argmin(product)
    absolute = jnp.maximum(2 * (value - product[toward]), 0)
    mass = _common.dot(norms, weights)
    floor = _common.resolve_cutoff(dtype, num_tasks,
                                   2 * mass * (mass + norms[toward]))
    return product, _common.relative_gap(absolute, value, floor)

  if num_tasks == 1:
    weights = jnp.ones((1,), dtype)
    return _common.finish(weights, 0, jnp.zeros([], dtype), tol,
                          finite=prepared.finite)
  if num_tasks == 2:
    curvature = gramian[0, 0] + gramian[1, 1] - 2 * gramian[0, 1]
    first = jnp.where(
        curvature > 0,
        jnp.clip((gramian[1, 1] - gramian[0, 1])
                 / jnp.where(curvature > 0, curvature, 1), 0, 1), 0.5)
    weights = jnp.stack([first, 1 - first]).astype(dtype)
    _, gap = measure(weights, _common.matvec(gramian, weights))
    return _common.finish(weights, 0, gap, tol, finite=prepared.finite)

  zero = jnp.diagonal(gramian) <= 0
  # A zero gradient: the min-norm point is 0, and these weights give it
  # exactly; the loop then certifies them without iterating.
  start = jnp.where(jnp.any(zero), zero / jnp.sum(zero).astype(dtype), start)

  def corrective(weights, product):
    del product
    support = weights > 0
    affine = _common.solve_on_support(gramian, support,
                                      jnp.ones_like(weights))
    total = jnp.sum(affine)
    usable = (total > 0) & jnp.all(jnp.isfinite(affine))
    target = _common.safe_divide(affine, total)
    return jnp.where(support & usable, target - weights, 0)

  def value(weights, product):
    return _common.dot(weights, product)

  objective = Objective(value, measure, _exact_line_search_quadratic,
                        corrective)
  weights, iterations, gap, stalled = pairwise_frank_wolfe(
      objective, gramian, start, max_iters=max_iters, tol=tol)
  return _common.finish(weights, iterations, gap, tol,
                        finite=prepared.finite, stalled=stalled,
                        fallback=1 / num_tasks)


# --------------------------------------------------------------------------
# The dual problem of CAGrad.
# --------------------------------------------------------------------------


def _exact_line_search_cagrad(radius, linear):
  """The exact line search of ``h(w) = wᵀa + r √(wᵀGw)`` along ``δ``.

  Along ``w + γδ`` the objective is ``φ(γ) = αγ + r √(Aγ² + 2Bγ + C)``
  with ``α = aᵀδ``, ``A = δᵀGδ``, ``B = wᵀGδ``, ``C = wᵀGw``. It is convex;
  when ``r²A > α²`` its stationary point solves ``q(γ) = r² D / (r²A − α²)``
  (``D = AC − B²``), and otherwise it is monotone on the segment.
  """

  def along(step, alpha, quad_a, quad_b, quad_c):
    squared = jnp.maximum(quad_c + 2 * quad_b * step + quad_a * step**2, 0)
    return alpha * step + radius * jnp.sqrt(squared)

  def search(weights, product, direction, direction_product, largest):
    alpha = _common.dot(linear, direction)
    quad_a = jnp.maximum(_common.dot(direction, direction_product), 0)
    quad_b = _common.dot(product, direction)
    quad_c = jnp.maximum(_common.dot(weights, product), 0)
    discriminant = jnp.maximum(quad_a * quad_c - quad_b**2, 0)
    denominator = radius**2 * quad_a - alpha**2
    has_interior = (denominator > 0) & (quad_a > 0)
    target = radius**2 * discriminant / jnp.where(has_interior, denominator, 1)
    offset = jnp.sqrt(jnp.maximum(quad_a * target - discriminant, 0))
    interior = (-quad_b - jnp.sign(alpha) * offset) / jnp.where(
        quad_a > 0, quad_a, 1)
    interior = jnp.clip(interior, 0, largest)
    endpoint = jnp.where(
        along(largest, alpha, quad_a, quad_b, quad_c)
        < along(jnp.zeros_like(largest), alpha, quad_a, quad_b, quad_c),
        largest, 0)
    return jnp.where(has_interior, interior, endpoint)

  return search


def _task_gaps(value, lower, scale, floor):
  """The duality gap ``h(w) − min_k g_kᵀd`` of one primal point ``d``, with
  the round-off of the task that bounds it.

  ``lower[k]`` is ``g_kᵀd`` as computed and ``floor[k]`` the round-off of
  ``h(w) − g_kᵀd`` (from the magnitudes that task's products sum). The
  bound ``min_k g_kᵀd ≥ min_k (lower_k − floor_k)`` is set by one task,
  ``k†``; the gap is ``h(w) − lower_{k†}`` against ``floor[k†]``
  (:func:`_common.relative_gap`). A task of large gradient norm thus
  brings its own round-off only where it bounds the minimum, never to
  excuse a task of small norm on which the optimum rests.
  """
  bounding = jnp.argmin(lower - floor)
  return _common.relative_gap(jnp.maximum(value - lower[bounding], 0), scale,
                              floor[bounding])


def _projection_point(gramian, radius, per_task_cutoff):
  """CAGrad's primal point independent of ``w``: ``J d`` and its round-off.

  ``d = g_0 + t (Π(g_0) − g_0)``, the mean gradient projected onto the cone
  ``{d : J d ≥ 0}`` (DualProj's direction, :func:`solve_dual_cone_qp` with
  ``u = m``), shortened to the ball ``‖d − g_0‖ ≤ r`` if need be. When
  ``h* = 0`` (Pareto-stationary: ``g_{w*} = 0``) some ``d`` of the ball has
  ``J d ≥ 0``, so the projection lies in the ball and certifies ``h* = 0``.
  ``J d`` is ``−∞`` where not finite (no certificate).
  """
  num_tasks = gramian.shape[0]
  mean = jnp.full((num_tasks,), 1 / num_tasks, gramian.dtype)
  projection = _active_set.solve_dual_cone_qp(gramian, mean, tol=0.0).weights
  offset = projection - mean
  offset_norm = jnp.sqrt(jnp.maximum(
      _common.dot(offset, _common.matvec(gramian, offset)), 0))
  fraction = jnp.where(offset_norm > radius,
                       _common.safe_divide(radius, offset_norm), 1)
  product = _common.matvec(gramian, mean) + fraction * _common.matvec(
      gramian, offset)  # J d, [T].
  magnitudes = jnp.abs(gramian)
  error = per_task_cutoff(_common.matvec(magnitudes, mean) + fraction
                          * _common.matvec(magnitudes, jnp.abs(offset)))
  return jnp.where(jnp.all(jnp.isfinite(product)), product, -jnp.inf), error


def _support_optimum(gramian, linear, radius, support):
  r"""The minimiser of ``wᵀa + r √(wᵀGw)`` on the affine hull of a support.

  On ``{w : w_k = 0 (k ∉ S), 1ᵀw = 1}`` its stationarity condition is
  ``a_S + r G_SS w / ‖g_w‖ = ν 1`` (every task of ``S`` improves equally,
  ``ν = g_kᵀd``). With ``v = r w / ‖g_w‖`` it is linear, ``G_SS v = ν 1 −
  a_S``, under ``vᵀGv = r²``: with ``y = G_SS⁻¹ 1``, ``ν₀ = 1ᵀG_SS⁻¹a/1ᵀy``
  and ``e = G_SS⁻¹(a_S − ν₀ 1)`` (so ``1ᵀe = 0``), ``v = t y − e`` with
  ``t² 1ᵀy = r² − (a − ν₀1)ᵀe``, the larger root (``ν`` the largest, ``1ᵀv
  > 0``), so ``w = y / 1ᵀy − e / (t 1ᵀy)``: the min-norm point of the hull
  moved against ``e``. One factorisation of ``G_SS`` (two right-hand sides).
  NaN where there is no minimiser on the hull (``r² ≤ (a − ν₀1)ᵀe``: the
  objective is unbounded below there, or its minimum is the kink).
  """
  # One factorisation for both right-hand sides (vmap leaves it unbatched).
  ones, direct = jax.vmap(functools.partial(
      _common.solve_on_support, gramian, support))(
          jnp.stack([jnp.ones_like(linear), linear]))
  total = jnp.sum(ones)
  level = _common.safe_divide(jnp.sum(direct), total)  # ν₀.
  centred = direct - level * ones  # e.
  residual = _common.dot(jnp.where(support, linear - level, 0), centred)
  lift = jnp.sqrt(_common.safe_divide(radius**2 - residual, total))  # t.
  usable = (total > 0) & (radius**2 > residual) & (lift > 0)
  target = (ones - centred / jnp.where(usable, lift, 1)) / jnp.where(
      usable, total, 1)
  return jnp.where(usable & jnp.all(jnp.isfinite(target)), target, jnp.nan)


# Primal-dual active-set rounds of CAGrad's start (see _cagrad_start).
CAGRAD_ROUNDS = 2


def _cagrad_start(gramian, linear, radius, guess):
  r"""Where CAGrad's Frank-Wolfe loop starts, from a point of the simplex.

  The minimiser on the guess's support ``S`` (:func:`_support_optimum`),
  corrected by ``CAGRAD_ROUNDS`` rounds of the primal-dual active-set
  method: with ``∇h`` at that point and ``ν`` its value on ``S`` (every task
  of ``S`` improves by ``ν``), ``S ← {k ∈ S : w_k > 0} ∪ {k ∉ S : ∇h_k <
  ν}`` (drop the tasks it makes negative, add those it improves by less),
  all at once. The first of these points that lies in the simplex is the
  start (the optimum itself when ``S`` was right: steady training leaves
  the loop nothing to do); the guess if none does. It only chooses the
  start: the loop's stopping test certifies whatever it is.
  """
  support = guess > 0
  candidates = []
  for _ in range(CAGRAD_ROUNDS):
    target = _support_optimum(gramian, linear, radius, support)
    candidates.append(target)
    product = _common.matvec(gramian, target)
    gradient = linear + radius * _common.safe_divide(
        product, jnp.sqrt(jnp.maximum(_common.dot(target, product), 0)))
    level = _common.safe_divide(jnp.sum(jnp.where(support, gradient, 0)),
                                jnp.sum(support))
    support = jnp.where(support, target > 0, gradient < level)
  start = guess
  for target in reversed(candidates):
    start = jnp.where(jnp.all(target >= 0), target, start)
  return start


def _cagrad_measure(gramian, radius, smoothing, second):
  """CAGrad's ``measure(w, p)``: ``(∇h, the relative duality gap)``, the
  best of three primal points (see :func:`solve_cagrad`); ``second``:
  ``(J d, its round-off)`` of the projection point, ``−∞`` where unknown."""
  num_tasks, dtype = gramian.shape[0], gramian.dtype
  mean = jnp.full((num_tasks,), 1 / num_tasks, dtype)
  linear = _common.matvec(gramian, mean)
  norms = _common.gradient_norms(gramian)
  magnitudes = jnp.abs(gramian)  # |G|: the terms the products below sum.
  mean_magnitudes = _common.matvec(magnitudes, mean)  # |G| m.
  per_task_cutoff = functools.partial(_common.resolve_cutoff, dtype,
                                      num_tasks)

  def norm_error(weights, norm):
    """The round-off of ‖g_w‖ = √(wᵀGw), from that of wᵀGw (wᵀ|G|w)."""
    squared_error = per_task_cutoff(
        _common.dot(weights, _common.matvec(magnitudes, weights)))
    return jnp.minimum(_common.safe_divide(squared_error, 2 * norm),
                       jnp.sqrt(squared_error))

  second, second_error = second

  def measure(weights, product):
    # product = (G + κ nnᵀ) w: the loop runs on the smoothed matrix.
    smoothed_norm = jnp.sqrt(jnp.maximum(_common.dot(weights, product), 0))
    plain = product - smoothing * norms * _common.dot(norms, weights)  # G w.
    norm = jnp.sqrt(jnp.maximum(_common.dot(weights, plain), 0))
    gradient = linear + radius * _common.safe_divide(product, smoothed_norm)
    value = _common.dot(weights, linear) + radius * norm
    scale = jnp.abs(_common.dot(weights, linear)) + radius * norm
    # The round-off of h(w), from the magnitudes its sums add at w:
    # wᵀ|G|m for wᵀa and the error of ‖g_w‖.
    value_error = radius * norm_error(weights, norm) + per_task_cutoff(
        2 * _common.dot(weights, mean_magnitudes))
    # Primal point 1: d = g_0 + r g_w / ‖g_w‖_ε, in the ball since
    # ‖g_w‖_ε ≥ ‖g_w‖ (the Frank-Wolfe gap, up to the smoothing); task k's
    # g_kᵀd to (|G|m)_k + r ((|G|w)_k + κ n_k nᵀw) / ‖g_w‖_ε.
    first = jnp.where(smoothed_norm > 0,
                      linear + radius * _common.safe_divide(
                          plain, smoothed_norm), -jnp.inf)
    first_error = per_task_cutoff(mean_magnitudes + radius * _common.safe_divide(
        _common.matvec(magnitudes, weights)
        + smoothing * norms * _common.dot(norms, weights), smoothed_norm))
    # Primal point 0: d = g_0 (the centre of the ball).
    gaps = [_task_gaps(value, point, scale, value_error + error)
            for point, error in ((first, first_error),
                                 (second, second_error),
                                 (linear, per_task_cutoff(mean_magnitudes)))]
    return gradient, jnp.minimum(jnp.minimum(gaps[0], gaps[1]), gaps[2])

  return measure


def _at_most_once(needed, compute, default):
  """``compute()`` where ``needed``, else ``default``: a loop of at most one
  trip (what a ``cond`` does; ``benchmarks.solver_cost`` counts the trips a
  loop runs, but both branches' larger one for a ``cond``)."""
  return jax.lax.while_loop(lambda carry: carry[0],
                            lambda carry: (jnp.asarray(False), compute()),
                            (jnp.asarray(needed), default))[1]


def solve_cagrad(
    gramian: chex.Array,
    c: float,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
    tol: Optional[float] = None,
    warm_start: Optional[chex.Array] = None,
) -> _common.SolverResult:
  r"""The dual problem of CAGrad, written on the Gramian.

  .. math::
    w^\star = \operatorname*{argmin}_{w \in \Delta}
      h(w) = g_w^\top g_0 + \sqrt{\phi}\, \lVert g_w \rVert
    = w^\top a + r \sqrt{w^\top G w},
    \qquad a = G m,\ r = c \sqrt{m^\top G m},

  with ``g_w = Jᵀw``, ``g_0 = Jᵀm`` the mean gradient (``m = 1/T``) and
  ``φ = c² ‖g_0‖² = r²`` (Liu et al. 2021, Eq. 4). By minimax duality
  ``h* = max_{‖d − g_0‖ ≤ r} min_k g_kᵀd``, the primal problem.

  Solved by :func:`pairwise_frank_wolfe` with the exact line search of
  ``αγ + r √(Aγ² + 2Bγ + C)`` along any direction, and as the corrective
  step the exact minimiser on the affine hull of the support, in closed
  form (:func:`_support_optimum`: one factorisation of ``G_SS``). The loop
  starts from the uniform weights or from ``warm_start`` projected onto the
  simplex, moved to the minimiser on its support and corrected by
  ``CAGRAD_ROUNDS`` primal-dual active-set rounds (:func:`_cagrad_start`,
  outside the loop): in steady training the start is the optimum, and the
  loop runs no trip (median 0 at T = 10 and 40 in the speed benchmark's
  training, from 9 to 10.5 with a Newton corrective step and no rounds).
  The loop minimises the smoothed ``wᵀa + r ‖g_w‖_ε``, ``‖g_w‖_ε =
  √(wᵀ(G + κ nnᵀ)w)`` with ``κ = T ε / 4`` (``n_k = ‖g_k‖``): it differs
  from ``h`` by a quarter of the round-off of ``‖g_w‖`` at most, and keeps
  the gradient resolved at the kink ``g_w = 0``, where the round-off of
  ``G w`` would otherwise steer the loop.

  Stopping test: the duality gap ``h(w) − min_k g_kᵀd ≥ h(w) − h*`` for the
  better of two primal points ``d`` in the ball ``‖d − g_0‖ ≤ r``:

  * ``d = g_0 + r g_w/‖g_w‖_ε`` (the Frank-Wolfe gap, up to the smoothing);
  * ``d = g_0 + t (Π(g_0) − g_0)``, the projection of ``g_0`` onto the
    cone ``{d : J d ≥ 0}`` (:func:`solve_dual_cone_qp` with ``u = m``,
    solved only where the other two points do not certify the start),
    shortened to the ball (``t ≤ 1``). When ``h* = 0`` (a
    Pareto-stationary optimum, ``g_{w*} = 0``, where ``h`` has a kink and
    the first point is undefined) some ``d`` of the ball has ``J d ≥ 0``,
    so the projection lies in the ball and certifies the optimum.

  (and ``d = g_0`` itself). It is relative to the size of the objective's
  terms ``|wᵀa| + r‖g_w‖``, with the round-off floor of evaluating it from
  the magnitudes the sums add at ``w``: ``2 T ε wᵀ|G|m`` plus ``r δ‖g_w‖``,
  the error of ``‖g_w‖ = √(wᵀGw)`` from ``T ε wᵀ|G|w`` (about
  ``√(Tε wᵀ|G|w)`` at the kink), plus the round-off of ``g_kᵀd`` of the
  task ``k`` that bounds the minimum (e.g. ``T ε ((|G|m)_k + r (|G|w)_k /
  ‖g_w‖)``). So a task of large gradient norm does not hide the gap of a
  small one on which the optimum rests (gradient norms 1e-4 … 1e4). The
  test does not change when ``G`` is multiplied by any ``c > 0``.

  Defaults: ``max_iters = 1000`` (as :func:`solve_min_norm`; 4 to 60
  iterations at T ≤ 128, 120 at T = 256 with gradients of rank 64), ``tol``
  from :func:`_common.default_tolerance`.

  Args:
    gramian: ``G``, shape [T, T], symmetric positive semi-definite; solved
      in its dtype (float64 stays float64; below float32, float32).
    c: the radius ``c ≥ 0`` of the trust region around ``g_0`` (a Python
      number, or a scalar array under ``jit``).
    max_iters: the most iterations.
    tol: the relative duality gap to reach; None: the default above.
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
  prepared = _common.prepare_gramian(gramian)
  gramian, num_tasks, dtype = (prepared.matrix, prepared.num_tasks,
                               prepared.dtype)
  max_iters = _common.check_max_iters(max_iters)
  tol = _common.check_tolerance(tol, dtype)
  if isinstance(c, bool) or (isinstance(c, (int, float)) and not c >= 0):
    raise ValueError(f"c must be a real number >= 0, got {c!r}.")
  if num_tasks == 1:
    return _common.finish(jnp.ones((1,), dtype), 0, jnp.zeros([], dtype),
                          tol, finite=prepared.finite)
  c = jnp.asarray(c, dtype)
  mean = jnp.full((num_tasks,), 1 / num_tasks, dtype)
  linear = _common.matvec(gramian, mean)  # a = G m.
  mean_norm = jnp.sqrt(jnp.maximum(_common.dot(mean, linear), 0))  # ‖g_0‖.
  radius = c * mean_norm  # r = √φ.
  norms = _common.gradient_norms(gramian)

  # The smoothed norm ‖g_w‖_ε = √(wᵀ(G + κ nnᵀ)w), κ = T ε / 4: at most
  # √κ nᵀw from ‖g_w‖, a quarter of the round-off of ‖g_w‖ itself (see
  # norm_error), so minimising it is exact to the floor; and it keeps the
  # gradient r G w / ‖g_w‖_ε resolved where ‖g_w‖ → 0 (the kink), where
  # the round-off of G w would otherwise steer the loop.
  smoothing = _common.resolve_cutoff(dtype, num_tasks, 1) / 4
  smoothed = gramian + smoothing * norms[:, None] * norms[None, :]

  # The start (cheap), then CAGrad's projection point only where the first
  # two primal points do not certify it.
  unknown = (jnp.full((num_tasks,), -jnp.inf, dtype),
             jnp.zeros((num_tasks,), dtype))
  start = _cagrad_start(smoothed, linear, radius,
                        _simplex_start(num_tasks, dtype, warm_start))
  _, gap = _cagrad_measure(gramian, radius, smoothing, unknown)(
      start, _common.matvec(smoothed, start))
  second = _at_most_once(gap > tol, lambda: _projection_point(
      gramian, radius, functools.partial(_common.resolve_cutoff, dtype,
                                         num_tasks)), unknown)

  def corrective(weights, product):
    del product
    return jnp.where(weights > 0, _support_optimum(
        smoothed, linear, radius, weights > 0) - weights, 0)

  def value(weights, product):
    """The smoothed objective ``wᵀa + r ‖g_w‖_ε`` that the loop minimises."""
    return _common.dot(weights, linear) + radius * jnp.sqrt(
        jnp.maximum(_common.dot(weights, product), 0))

  objective = Objective(value, _cagrad_measure(gramian, radius, smoothing,
                                                second),
                        _exact_line_search_cagrad(radius, linear), corrective)
  weights, iterations, gap, stalled = pairwise_frank_wolfe(
      objective, smoothed, start, max_iters=max_iters, tol=tol)
  return _common.finish(weights, iterations, gap, tol,
                        finite=prepared.finite, stalled=stalled,
                        fallback=1 / num_tasks)
