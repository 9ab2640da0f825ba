"""Small jittable solvers on the T×T Gramian ``G = J Jᵀ``.

One module per method, as optimistix's ``_solver/``:

* ``_frank_wolfe``: problems on the simplex (MGDA's min-norm point,
  CAGrad's dual) by one pairwise Frank-Wolfe loop with a corrective step;
* ``_active_set``: the box-constrained QP of UPGrad and DualProj;
* ``_newton``: Nash-MTL's bargaining problem;
* ``_alpha_fair``: FairGrad's α-fair allocation (Nash-MTL's for α = 1);
* ``_priority``: PCD's QP (follow the first task's gradient subject to
  progress on the others), by a dual active-set method;
* ``_common``: the result type, the outcome codes, the one convergence rule
  and the small helpers they share.

Every iterative solver runs in a ``lax.while_loop`` bounded by
``max_iters``, works in the Gramian's dtype (at least float32; float64
under ``jax_enable_x64``), needs no SciPy or cvxpy at run time, and returns
a :class:`SolverResult`: the weights, the iterations used, the relative
optimality measure ``gap``, ``converged = gap <= tol`` and an
:class:`Outcome` code. Under ``jit`` nothing can raise on a value, so a
solver that runs out of iterations, meets a NaN or finds no solution says
so in ``outcome`` instead.

Every solver's test is relative to the problem's own scale, with a floor at
the dtype's round-off (:func:`relative_gap`), and each first scales ``G`` by
a power of two (exact): the weights do not change when ``G`` is multiplied
by any ``c > 0`` (Nash-MTL's ``α`` scales as ``c^{-1/2}``, as it must).

Public: every solver a strategy calls (``solve_min_norm``, ``solve_cagrad``,
``solve_dual_cone_qp``, ``solve_nash``, ``solve_alpha_fair``,
``solve_priority_qp``), ``project_simplex``, ``SolverResult`` and
``Outcome`` are exported as ``optax_mtl.<name>``; the helpers below are the
strategies' own (``optax_mtl._src.solvers``).
"""

from optax_mtl._src.solvers._active_set import solve_dual_cone_qp
from optax_mtl._src.solvers._alpha_fair import solve_alpha_fair
from optax_mtl._src.solvers._common import Outcome
from optax_mtl._src.solvers._common import SolverResult
from optax_mtl._src.solvers._common import default_tolerance
from optax_mtl._src.solvers._common import gradient_norms
from optax_mtl._src.solvers._common import inverse_gradient_norms
from optax_mtl._src.solvers._common import relative_gap
from optax_mtl._src.solvers._common import resolve_cutoff
from optax_mtl._src.solvers._common import safe_divide
from optax_mtl._src.solvers._common import scale_by_power_of_two
from optax_mtl._src.solvers._common import state_fields
from optax_mtl._src.solvers._frank_wolfe import project_simplex
from optax_mtl._src.solvers._frank_wolfe import solve_cagrad
from optax_mtl._src.solvers._frank_wolfe import solve_min_norm
from optax_mtl._src.solvers._newton import solve_nash
from optax_mtl._src.solvers._priority import solve_priority_qp

__all__ = (
    "Outcome",
    "SolverResult",
    "default_tolerance",
    "gradient_norms",
    "inverse_gradient_norms",
    "project_simplex",
    "relative_gap",
    "resolve_cutoff",
    "safe_divide",
    "scale_by_power_of_two",
    "solve_alpha_fair",
    "solve_cagrad",
    "solve_dual_cone_qp",
    "solve_min_norm",
    "solve_nash",
    "solve_priority_qp",
    "state_fields",
)
