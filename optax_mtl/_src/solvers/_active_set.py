"""The box-constrained QP of UPGrad and DualProj, by an active-set method
whose factorisation is updated, not recomputed, at every step."""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src.solvers import _common

# The default max_iters of solve_dual_cone_qp (and of upgrad and dualproj).
# An iteration frees one task or bounds one again; a solve takes about as
# many iterations as it frees tasks (up to T) plus a few: about 157 at
# T = 256 from a cold start in the timings.
DEFAULT_MAX_ITERS = 200

_HIGHEST = jax.lax.Precision.HIGHEST


class _Factor(NamedTuple):
  r"""The free set of each problem of a batch and a whitening of its block.

  ``W`` whitens ``M = (C_FF + μI) ⊕ I_BB``: ``W M Wᵀ = I``, so that
  ``M⁻¹ r = Wᵀ(W r)``, two matrix-vector products. Its rows are not tied
  to tasks: |F| rows whiten the free block (zero in the bound columns) and
  each bound task ``b`` has one row ``e_b``. Both changes of the free set
  are rank-one updates of ``W`` (:func:`_append`, :func:`_remove`), and
  a trip makes no library call (a triangular solve or a factorisation is
  one small LAPACK or cuSOLVER call, slow at this size). ``z = W r_F``, the
  whitened right-hand side ``r = −b``, is updated with it in ``O(T)``, so
  the solution ``Wᵀz`` costs one product.
  """

  free: chex.Array  # bool[B, T], by task.
  whiten: chex.Array  # [B, T, T], W.
  whitened: chex.Array  # [B, T], z = W r_F.


class _Problem(NamedTuple):
  """The batch of problems ``min_{λ ≥ 0} ½ λᵀCλ + λᵀb`` sharing ``C``."""

  cosines: chex.Array  # [T, T] C, unit diagonal (0 for a zero gradient).
  linear: chex.Array  # [B, T] b = C u.
  lower: chex.Array  # [B, T] u (unit-row scaling).
  ridge: chex.Array  # [] μ, so that a singular C_FF still whitens.
  paired: chex.Array  # [2T, 2T] C ⊕ |C|: Cx and |C||x| by one product.
  lower_terms: chex.Array  # [B, T] |C||u|, the magnitudes b sums.


def _make_problem(cosines: chex.Array, lower: chex.Array) -> _Problem:
  """The batch of problems on ``C`` for the lower bounds ``u`` [B, T]."""
  num_tasks = cosines.shape[0]
  magnitudes = jnp.abs(cosines)
  zeros = jnp.zeros_like(cosines)
  paired = jnp.concatenate([jnp.concatenate([cosines, zeros], axis=1),
                            jnp.concatenate([zeros, magnitudes], axis=1)])
  return _Problem(
      cosines=cosines, linear=_common.matmul_rows(lower, cosines),
      lower=lower,
      ridge=_common.resolve_cutoff(cosines.dtype, num_tasks, 1),
      paired=paired,
      lower_terms=_common.matmul_rows(jnp.abs(lower), magnitudes))


def _products(problem: _Problem,
              point: chex.Array) -> tuple[chex.Array, chex.Array]:
  """``(C x, |C||x|)`` for each problem [B, T], by one matrix product."""
  num_tasks = point.shape[-1]
  both = _common.matmul_rows(jnp.concatenate([point, jnp.abs(point)], axis=1),
                             problem.paired)
  return both[:, :num_tasks], both[:, num_tasks:]


def _apply(whiten: chex.Array, vectors: chex.Array) -> chex.Array:
  """``W r`` for each problem: [B, T, T] × [B, T]."""
  return jnp.einsum("bij,bj->bi", whiten, vectors, precision=_HIGHEST)


def _apply_transposed(whiten: chex.Array, vectors: chex.Array) -> chex.Array:
  """``Wᵀ r`` for each problem."""
  return jnp.einsum("bij,bi->bj", whiten, vectors, precision=_HIGHEST)


def _empty_factor(problem: _Problem) -> _Factor:
  """Every task bound: ``W = I``, ``z = 0``."""
  batch, num_tasks = problem.linear.shape
  dtype = problem.linear.dtype
  return _Factor(
      free=jnp.zeros((batch, num_tasks), bool),
      whiten=jnp.broadcast_to(jnp.eye(num_tasks, dtype=dtype),
                              (batch, num_tasks, num_tasks)),
      whitened=jnp.zeros((batch, num_tasks), dtype))


def _rebuild(problem: _Problem, free: chex.Array) -> _Factor:
  """``W = L⁻¹`` from the Cholesky factor of ``M`` (once, at a warm start):
  one factorisation and one triangular solve for the whole batch."""
  num_tasks = free.shape[-1]
  both = free[:, :, None] & free[:, None, :]
  eye = jnp.eye(num_tasks, dtype=problem.cosines.dtype)
  matrix = (jnp.where(both, problem.cosines, 0)
            + eye * jnp.where(free, problem.ridge, 1)[:, :, None])
  lower = jax.lax.linalg.cholesky(matrix, symmetrize_input=False)
  whiten = jax.lax.linalg.triangular_solve(
      lower, jnp.broadcast_to(eye, matrix.shape), left_side=True, lower=True)
  return _Factor(free, whiten,
                 _apply(whiten, jnp.where(free, -problem.linear, 0)))


def _append(problem: _Problem, factor: _Factor, entering: chex.Array,
            adding: chex.Array) -> _Factor:
  r"""Frees ``entering`` (``j``) where ``adding``: one row of ``W`` replaced.

  .. math::
    W' = \begin{pmatrix} W & 0 \\ -l^\top W / d & 1/d \end{pmatrix},
    \qquad l = W c_{F j},\quad d = \sqrt{C_{jj} + \mu - \lVert l \rVert^2},

  the new row replacing ``e_j`` (``d²`` is the Schur complement, at least
  ``μ`` in exact arithmetic; clamped there against round-off): the
  bordering step of a Cholesky factorisation, written on the inverse. The
  new entry of ``z`` is that row times ``r``.
  """
  batch = jnp.arange(entering.shape[0])
  column = jnp.where(factor.free, problem.cosines[entering], 0)  # c_Fj.
  projected = _apply(factor.whiten, column)  # l.
  diagonal = problem.cosines[entering, entering] + problem.ridge - jnp.sum(
      projected**2, axis=1)
  diagonal = jnp.sqrt(jnp.maximum(diagonal, problem.ridge))
  row = -_apply_transposed(factor.whiten, projected)
  row = row.at[batch, entering].add(1) / diagonal[:, None]
  free = factor.free.at[batch, entering].set(
      factor.free[batch, entering] | adding)
  entry = jnp.sum(row * jnp.where(free, -problem.linear, 0), axis=1)
  # The row of W that is e_j: the only one with an entry in column j.
  slot = jnp.argmax(jnp.abs(factor.whiten[batch, :, entering]), axis=1)
  whiten = factor.whiten.at[batch, slot].set(
      jnp.where(adding[:, None], row, factor.whiten[batch, slot]))
  whitened = factor.whitened.at[batch, slot].set(
      jnp.where(adding, entry, factor.whitened[batch, slot]))
  return _Factor(free, whiten, whitened)


def _remove(factor: _Factor, leaving: chex.Array,
            removing: chex.Array) -> _Factor:
  r"""Bounds ``leaving`` (``k``) again where ``removing``: a reflection.

  A Householder reflection ``Q`` of the free rows maps column ``k`` of
  ``W`` onto one row ``r``; ``QW`` still whitens ``M``, and then
  ``M_{F∖k}⁻¹ = Σ_{i ≠ r} (QW)_iᵀ (QW)_i`` (the Schur complement of
  ``(M⁻¹)_kk``): dropping row ``r`` whitens the free set without ``k``, and
  row ``r`` becomes ``e_k``. ``z`` is reflected alike, with ``z_r = 0``.
  Orthogonal, so stable; ``O(T²)``.
  """
  num_tasks = factor.free.shape[1]
  batch = jnp.arange(leaving.shape[0])
  column = factor.whiten[batch, :, leaving]  # [B, T], w_k.
  pivot = jnp.argmax(jnp.abs(column), axis=1)  # r.
  norm = jnp.sqrt(jnp.sum(column**2, axis=1))
  at_pivot = jnp.arange(num_tasks)[None, :] == pivot[:, None]
  sign = jnp.where(column[batch, pivot] >= 0, 1, -1).astype(column.dtype)
  householder = column + jnp.where(at_pivot, (sign * norm)[:, None], 0)
  scale = _common.safe_divide(2, jnp.sum(householder**2, axis=1))
  scale = jnp.where(removing, scale, 0)[:, None]
  coefficients = scale * _apply_transposed(factor.whiten, householder)
  unit = (jnp.arange(num_tasks)[None, :] == leaving[:, None]).astype(
      column.dtype)
  replace = (removing[:, None] & at_pivot)[:, :, None]
  whiten = jnp.where(replace, unit[:, None, :],
                     factor.whiten - householder[:, :, None]
                     * coefficients[:, None, :])
  whitened = factor.whitened - householder * scale * jnp.sum(
      householder * factor.whitened, axis=1, keepdims=True)
  whitened = jnp.where(removing[:, None] & at_pivot, 0, whitened)
  free = factor.free.at[batch, leaving].set(
      factor.free[batch, leaving] & ~removing)
  return _Factor(free, whiten, whitened)


# Refinement steps of solve_on_free_set when its solution is inaccurate.
REFINEMENTS = 4


def solve_on_free_set(problem: _Problem, factor: _Factor) -> chex.Array:
  r"""``λ_F = −(C_FF + μI)⁻¹ b_F``: ``Wᵀz``, refined against ``C_FF``.

  When the residual ``−b_F − C_FF x`` of some problem of the batch is
  above its round-off (:func:`gradient_round_off`: the ridge's bias where
  ``C_FF`` is well conditioned, or the round-off that the updates of
  ``W`` accumulate), ``REFINEMENTS`` steps of iterative refinement
  ``x ← x + Wᵀ W (−b_F − C_FF x)`` are taken. Each divides the ridge's
  bias by ``1 + δ/μ`` along an eigenvalue ``δ`` of ``C_FF``: on a nearly
  opposite pair (``δ`` about ``μ``) one step leaves half of it, several
  bring ``λ`` to the round-off of the residual.

  Returns:
    The trial point [B, T], zero off the free set.
  """
  solution = jnp.where(factor.free,
                       _apply_transposed(factor.whiten, factor.whitened), 0)

  def residual_of(product):
    return jnp.where(factor.free, -problem.linear - product, 0)

  product, magnitudes = _products(problem, solution)
  inaccurate = jnp.abs(residual_of(product)) > gradient_round_off(
      problem, solution, magnitudes)

  def refined():
    point, residual = solution, residual_of(product)
    for index in range(REFINEMENTS):
      if index:
        residual = residual_of(_common.matmul_rows(point, problem.cosines))
      correction = _apply_transposed(factor.whiten,
                                     _apply(factor.whiten, residual))
      point = point + jnp.where(factor.free, correction, 0)
    return point

  return jax.lax.cond(jnp.any(inaccurate), refined, lambda: solution)


def step_back_to_feasibility(
    slack: chex.Array, trial: chex.Array, free: chex.Array
) -> tuple[chex.Array, chex.Array, chex.Array]:
  r"""The longest step from ``λ`` towards ``x`` that keeps ``λ ≥ 0``.

  .. math::
    \alpha = \min_{k \in F,\ x_k \le 0} \frac{\lambda_k}{\lambda_k - x_k}
    \in [0, 1], \qquad \lambda \leftarrow \lambda + \alpha (x - \lambda),

  (Lawson & Hanson 1974, step 8; optimistix's ``feasible_step_length``).
  The task that attains the minimum reaches zero and leaves the free set.

  Args:
    slack: ``λ`` [B, T], ``> 0`` on the free set.
    trial: ``x`` [B, T], the solution on the free set.
    free: bool[B, T].

  Returns:
    ``(stepped, leaving, feasible)``: the new ``λ`` (zero at ``leaving``
    and off the free set), the leaving task [B] and whether ``x`` was
    feasible already [B] (then ``stepped = x``).
  """
  blocking = free & (trial <= 0)
  feasible = ~jnp.any(blocking, axis=1)
  ratios = jnp.where(blocking,
                     slack / jnp.where(blocking, slack - trial, 1), jnp.inf)
  leaving = jnp.argmin(ratios, axis=1).astype(jnp.int32)
  step = jnp.clip(jnp.min(ratios, axis=1), 0, 1)[:, None]
  stepped = slack + step * (trial - slack)
  keep = free & (jnp.arange(free.shape[1])[None, :] != leaving[:, None])
  stepped = jnp.where(keep, jnp.maximum(stepped, 0), 0)
  return (jnp.where(feasible[:, None], trial, stepped), leaving, feasible)


def entering_task(gradient: chex.Array,
                  free: chex.Array) -> tuple[chex.Array, chex.Array]:
  """The bound task of most negative gradient, and whether it is negative.

  Freeing it is the descent direction of the active-set method: its
  multiplier ``(Cv)_k < 0`` says the bound ``v_k ≥ u_k`` holds the
  objective back.
  """
  candidates = jnp.where(free, jnp.inf, gradient)
  entering = jnp.argmin(candidates, axis=1).astype(jnp.int32)
  return entering, jnp.min(candidates, axis=1) < 0


def _kkt_gap(problem: _Problem, slack: chex.Array,
             products: Optional[tuple[chex.Array, chex.Array]] = None
             ) -> chex.Array:
  """The relative KKT residual of ``v = λ + u``, per problem [B].

  With ``∇ = C v = Cλ + b`` (task ``k``'s inner product ``ĝ_kᵀ d`` with
  ``d = Σ v_k ĝ_k``): ``|∇_k|`` where ``λ_k > 0`` and ``max(−∇_k, 0)``
  where ``λ_k = 0``, the largest over ``k``, relative to ``‖d‖`` (so it is
  the cosine by which ``d`` violates a condition), with the floor
  ``T ε max_k (|C| (|λ| + |u|))_k``, the round-off of ``∇`` and of ``λ``
  itself (the floor that certifies a zero ``d``). It may exceed the
  residual of a nearly opposite pair's large multipliers: there
  :func:`solve_on_free_set` refines against the tighter
  :func:`gradient_round_off` first.
  """
  num_tasks = slack.shape[-1]
  dtype = slack.dtype
  solution = slack + problem.lower
  product, magnitudes = products or _products(problem, slack)
  gradient = product + problem.linear
  violation = jnp.where(slack > 0, jnp.abs(gradient),
                        jnp.maximum(-gradient, 0))
  absolute = jnp.max(violation, axis=1)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(solution * gradient, axis=1), 0))
  floor = _common.resolve_cutoff(
      dtype, num_tasks, jnp.max(magnitudes + problem.lower_terms, axis=1))
  return _common.relative_gap(absolute, norm, floor)


def gradient_round_off(problem: _Problem, slack: chex.Array,
                       magnitudes: Optional[chex.Array] = None) -> chex.Array:
  """The round-off of ``∇ = Cλ + b`` per task, [B, T].

  ``Cλ`` sums ``n`` non-zero terms (``n`` free tasks), and ``b = Cu`` (at
  most ``T``) was summed once: ``γ_{n+1} (|C||λ|)_k + γ_{T+1} (|C||u|)_k``
  with ``γ_m = m ε/2`` (Higham 2002, §3.1), the bound of the terms this
  product actually adds, not ``T ε`` times the largest of them
  (``magnitudes``: ``|C||λ|`` when already computed).
  """
  num_tasks = slack.shape[-1]
  dtype = slack.dtype
  terms = jnp.sum(slack != 0, axis=1, keepdims=True).astype(dtype) + 1
  half_eps = jnp.asarray(jnp.finfo(dtype).eps / 2, dtype)
  if magnitudes is None:
    magnitudes = _products(problem, slack)[1]
  return half_eps * (terms * magnitudes
                     + (num_tasks + 1) * problem.lower_terms)


# Primal-dual active-set rounds of a warm start (see _warm_start).
WARM_ROUNDS = 2


class _Start(NamedTuple):
  """Where the active-set iterations start, per problem."""

  slack: chex.Array  # [B, T] λ ≥ 0, zero off the free set.
  factor: _Factor
  backtracking: chex.Array  # bool[B], stepping back towards the solution.
  done: chex.Array  # bool[B], already optimal.


def _cold_start(problem: _Problem) -> _Start:
  """Every task bound, ``λ = 0``."""
  batch = problem.linear.shape[0]
  return _Start(jnp.zeros_like(problem.lower), _empty_factor(problem),
                jnp.zeros((batch,), bool), jnp.zeros((batch,), bool))


def _warm_start(problem: _Problem, guess: chex.Array, finite: chex.Array,
                tol) -> _Start:
  r"""The start from a guess of ``λ`` (e.g. the previous step's solution).

  The guessed free set ``F = {k : λ_k > T ε max|λ|}`` is corrected by
  ``WARM_ROUNDS`` rounds of the primal-dual active-set method
  (Hintermüller, Ito & Kunisch 2003) where the solution on ``F`` is not
  already optimal: ``x`` the solution on ``F``, then
  ``F ← {k ∈ F : x_k > 0} ∪ {k ∉ F : (Cx + b)_k < 0}``, all changes at
  once where an iteration of the loop makes one, each round one
  factorisation (:func:`_rebuild`) outside the loop (none runs when every
  guessed set is optimal: one ``cond``). Where the solution on
  the corrected set is feasible the iterations start there (done when it
  is also optimal); elsewhere on the guessed set, as Lawson and Hanson's
  inner loop does: from its solution when feasible, else from the guess
  itself (feasible, zero off the set) stepping back towards it.
  """
  num_tasks = guess.shape[-1]
  size = jnp.max(jnp.where(jnp.isfinite(guess), jnp.abs(guess), 0), axis=1,
                 keepdims=True)
  guessed = (jnp.isfinite(guess) & finite[:, None] & (
      guess > _common.resolve_cutoff(guess.dtype, num_tasks, size)))
  first = _rebuild(problem, guessed)
  trial = solve_on_free_set(problem, first)
  # Optimal on the guessed set (e.g. the guess was the solution): kept.
  kept = jnp.all(jnp.where(guessed, trial > 0, True), axis=1) & (
      _kkt_gap(problem, trial) <= tol)

  def corrected():
    factor, point = first, trial
    for _ in range(WARM_ROUNDS):
      descent = (_common.matmul_rows(point, problem.cosines) + problem.linear
                 < 0)
      free = jnp.where(factor.free, point > 0, descent) & finite[:, None]
      factor = _rebuild(problem, jnp.where(kept[:, None], guessed, free))
      point = jnp.where(factor.free,
                        _apply_transposed(factor.whiten, factor.whitened), 0)
    better = ~kept & jnp.all(jnp.where(factor.free, point > 0, True), axis=1)
    # The corrected set where its solution is feasible, else the guessed one.
    return jax.tree.map(
        lambda new, old: jnp.where(
            jnp.reshape(better, better.shape + (1,) * (new.ndim - 1)),
            new, old), factor, first)

  # Every guessed set optimal (steady training): no round to run.
  factor = jax.lax.cond(jnp.all(kept), lambda: first, corrected)
  trial = solve_on_free_set(problem, factor)
  usable = jnp.all(jnp.where(factor.free, trial > 0, True), axis=1)
  slack = jnp.where(usable[:, None], trial,
                    jnp.where(factor.free, jnp.maximum(guess, 0), 0))
  return _Start(slack, factor, ~usable,
                usable & (_kkt_gap(problem, slack) <= tol))


def _unit_problem(gramian: chex.Array,
                  lower: chex.Array) -> tuple[_Problem, chex.Array]:
  """The problems with unit rows, and the scales ``D`` [T].

  ``C = D G D`` entry by entry (the outer product of the scales could
  overflow), ``u' = u / D``, ``D = diag(1/‖g_k‖)`` (1 for a zero gradient).
  """
  norms = _common.gradient_norms(gramian)
  scales = jnp.where(norms > 0, 1 / jnp.where(norms > 0, norms, 1), 1)
  cosines = (gramian * scales[:, None]) * scales[None, :]
  return _make_problem(cosines, lower / scales), scales


def solve_dual_cone_qp(
    gramian: chex.Array,
    lower: chex.Array,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
    tol: Optional[float] = None,
    warm_start: Optional[chex.Array] = None,
) -> _common.SolverResult:
  r"""The box-constrained QP whose solution projects ``Jᵀu`` onto a cone.

  .. math::
    v^\star = \operatorname*{argmin}_{v \ge u} v^\top G v,
    \qquad \Pi_{\{x : Jx \ge 0\}}(J^\top u) = J^\top v^\star,

  the dual of projecting ``Jᵀu`` onto the dual cone of the rows of ``J``
  (Quinton & Rey 2024, Proposition 1). The cone does not change when a row
  of ``J`` is rescaled, so it is solved with unit rows: ``C = D G D``,
  ``D = diag(1/‖g_k‖)`` (1 for a zero gradient), ``u' = D⁻¹u``,
  ``v = D v'``. With ``λ = v' − u'`` it is the non-negative least-squares
  problem ``min_{λ ≥ 0} ½ λᵀCλ + λᵀCu'``.

  Solved by the active-set method of Lawson & Hanson (1974) written on
  ``C``, in named steps: :func:`entering_task` frees the bound task of most
  negative gradient, :func:`solve_on_free_set` solves on the free set, and
  :func:`step_back_to_feasibility` steps back when a free variable would
  turn negative, bounding that task again. The factorisation is *updated*,
  never recomputed: a whitening ``W`` of ``C_FF + μI`` (``W M Wᵀ = I``;
  ``μ = T ε``, so that duplicated or dependent gradients still factorise)
  gets one new row when a task is freed (two matrix-vector products: the
  bordering step of a Cholesky factorisation, written on its inverse) and
  one Householder reflection when a task is bound again. An iteration thus
  costs ``O(T²)`` per problem, where a new factorisation costs ``O(T³)``,
  and makes no library call (no factorisation, no triangular solve). A
  task freed and pushed straight back stops the
  solve (round-off; ``STALLED`` unless the point meets ``tol``).

  A batch of problems sharing ``G`` (``lower`` of shape [B, T], e.g.
  UPGrad's ``B = T`` problems ``u = e_i``) is solved together, each at its
  own pace, for ``O(B T²)`` per iteration. Prefer it to ``jax.vmap`` of the
  single problem, under which the conditional refinement and Householder
  update run at every iteration.

  Stopping test (:func:`_common.relative_gap`): the KKT residual of
  ``v' = λ + u'`` (``|(Cv')_k|`` where ``λ_k > 0``, ``max(−(Cv')_k, 0)``
  elsewhere) relative to ``‖d‖ = √(v'ᵀCv')``, i.e. the cosine by which
  ``d = Jᵀv`` conflicts with a task or misses a free one, with the floor
  ``T ε max_k (|C|(|λ| + |u'|))_k``, the round-off of ``Cv'``. The
  solution on the free set is refined (:func:`solve_on_free_set`) while
  its residual exceeds the tighter bound of the terms it adds
  (:func:`gradient_round_off`), so that on a nearly opposite pair, where
  the ridge's bias is large and so are the multipliers (and the floor),
  they reach the optimum before the test accepts them. A zero-gradient
  task keeps ``v_k = u_k`` exactly.

  Warm start: given a guess of ``v*`` (e.g. the previous step's solution),
  the tasks with ``v_k > u_k`` are the starting free set, kept where the
  solution on it is optimal, else corrected by ``WARM_ROUNDS`` rounds of
  the primal-dual active-set method, which change every wrong task at once
  (:func:`_warm_start`; each set's whitening is built by one factorisation
  and one triangular solve for the whole batch, outside the loop). In
  steady training this leaves no iteration to the loop (UPGrad at T = 40:
  24 iterations per step before, none after). A guess changes only where
  the search starts, never the test it has to pass.

  Defaults: ``max_iters = 200`` (about one iteration per freed task: from
  a cold start 28, 82 and 157 iterations for UPGrad at T = 40, 128, 256),
  ``tol`` from
  :func:`_common.default_tolerance`.

  Args:
    gramian: ``G``, shape [T, T], symmetric positive semi-definite; solved
      in its dtype (float64 stays float64; below float32, float32).
    lower: ``u``, shape [T], or [B, T] for a batch.
    max_iters: the most active-set iterations.
    tol: the relative KKT residual to reach; None: the default above.
    warm_start: None, or a guess of ``v*`` of the shape of ``lower``.

  Returns:
    A :class:`SolverResult` with ``weights = v*`` (``J d ≥ 0`` for
    ``d = Jᵀ v*``), with a leading batch axis on every field for a batch;
    ``iterations`` is 0 when the warm start was optimal.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_mtl._src import solvers
    >>> gramian = jnp.array([[1.0, -1.0], [-1.0, 4.0]])
    >>> result = solvers.solve_dual_cone_qp(gramian, jnp.array([1.0, 0.0]))
    >>> [round(v, 4) for v in result.weights.tolist()], bool(result.converged)
    ([1.0, 0.25], True)

  References:
    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024;
    Lawson & Hanson, "Solving Least Squares Problems", 1974, chapter 23;
    Gill, Golub, Murray & Saunders, "Methods for modifying matrix
    factorizations", Math. Comp. 1974.
  """
  prepared = _common.prepare_gramian(gramian)
  gramian, num_tasks, dtype = (prepared.matrix, prepared.num_tasks,
                               prepared.dtype)
  max_iters = _common.check_max_iters(max_iters)
  tol = _common.check_tolerance(tol, dtype)
  lower = _common.check_vector("lower", lower, num_tasks, dtype, batched=True)
  single = lower.ndim == 1
  if warm_start is not None:
    warm_start = jnp.asarray(warm_start).astype(dtype)
    if warm_start.shape != lower.shape:
      raise ValueError(f"warm_start must have the shape of lower, "
                       f"{lower.shape}, got {warm_start.shape}.")
    warm_start = jnp.atleast_2d(warm_start)
  lower = jnp.atleast_2d(lower)
  finite = prepared.finite & jnp.all(jnp.isfinite(lower), axis=1)
  given = lower
  lower = jnp.where(finite[:, None], lower, 0)

  problem, scales = _unit_problem(gramian, lower)
  unit_lower = problem.lower
  batch = lower.shape[0]

  if warm_start is None:
    start = _cold_start(problem)
  else:
    start = _warm_start(problem, warm_start / scales - unit_lower, finite,
                        tol)

  def cond(carry):
    _, _, _, done, _, _, iteration = carry
    return (iteration < max_iters) & ~jnp.all(done)

  def body(carry):
    slack, factor, backtracking, done, stalled, iterations, iteration = carry
    active = ~done
    products = _products(problem, slack)
    gradient = products[0] + problem.linear
    optimal = _kkt_gap(problem, slack, products) <= tol
    entering, descent = entering_task(gradient, factor.free)
    searching = active & ~backtracking
    adding = searching & ~optimal & descent
    # No bound task to free, yet not optimal: round-off on the free set.
    stuck = searching & ~optimal & ~descent
    factor = _append(problem, factor, entering, adding)
    moving = adding | (active & backtracking)
    trial = solve_on_free_set(problem, factor)
    stepped, leaving, feasible = step_back_to_feasibility(slack, trial,
                                                          factor.free)
    # The task just freed is pushed straight back: the remaining descent is
    # below round-off (the classic safeguard); stop with the last point.
    pushed_back = adding & ~feasible & (leaving == entering)
    removing = moving & ~feasible
    # Exact no-op where not removing: no branch (a cond copies the factor).
    factor = _remove(factor, leaving, removing)
    slack = jnp.where((moving & ~pushed_back)[:, None], stepped, slack)
    stalled = stalled | pushed_back | stuck
    done = done | (searching & optimal) | pushed_back | stuck
    backtracking = jnp.where(moving, ~feasible, backtracking)
    return (slack, factor, backtracking, done, stalled,
            iterations + moving.astype(jnp.int32), iteration + 1)

  zeros = jnp.zeros((batch,), jnp.int32)
  slack, _, _, _, stalled, iterations, _ = jax.lax.while_loop(
      cond, body, (start.slack, start.factor, start.backtracking, start.done,
                   jnp.zeros((batch,), bool), zeros, jnp.zeros([], jnp.int32)))
  gap = _kkt_gap(problem, slack)
  # v = u + D λ: exactly u where λ = 0 (bound and zero-gradient tasks).
  weights = jnp.where(finite[:, None], lower + slack * scales, given)
  result = _common.finish(weights, iterations, gap, tol, finite=finite,
                          stalled=stalled, fallback=given)
  if single:
    result = jax.tree.map(lambda leaf: leaf[0], result)
  return result
