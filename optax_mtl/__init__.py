"""optax_mtl: multi-task loss weighting and gradient balancing for JAX.

Every strategy is a factory ``optax_mtl.<name>(num_tasks, ...)`` returning an
``optax.GradientTransformationExtraArgs`` whose ``update(task_grads, state,
params=None, *, task_losses)`` combines per-task gradients, and
:func:`value_and_grad` turns a per-task loss function into a training step
that computes only what the strategy needs.
"""

from optax_mtl import metrics
from optax_mtl._src import deprecation as _deprecation
from optax_mtl._src._smooth_weights import SmoothWeightsState
from optax_mtl._src._smooth_weights import smooth_weights
from optax_mtl._src.base import MultiTaskStrategy
from optax_mtl._src.base import GradientRule
from optax_mtl._src.base import Needs
from optax_mtl._src.base import Weighting
from optax_mtl._src.base import common_state_fields
from optax_mtl._src.diagnostics import diagnostics
from optax_mtl._src.engine import value_and_grad
from optax_mtl._src.losses import masked_mean
from optax_mtl._src.solvers import Outcome
from optax_mtl._src.solvers import SolverResult
from optax_mtl._src.step import RecomputeEveryState
from optax_mtl._src.step import as_gradient_transformation
from optax_mtl._src.step import recompute_every
from optax_mtl._src.step import weighting_of
from optax_mtl._src.step import with_shared_parameters
from optax_mtl._src.solvers import project_simplex
from optax_mtl._src.solvers import solve_alpha_fair
from optax_mtl._src.solvers import solve_cagrad
from optax_mtl._src.solvers import solve_dual_cone_qp
from optax_mtl._src.solvers import solve_min_norm
from optax_mtl._src.solvers import solve_nash
from optax_mtl._src.solvers import solve_priority_qp
from optax_mtl._src.tree import cosine_matrix
from optax_mtl._src.tree import gramian
from optax_mtl._src.weighting._aligned_mtl import AlignedMtlState
from optax_mtl._src.weighting._aligned_mtl import aligned_mtl
from optax_mtl._src.weighting._cagrad import CagradState
from optax_mtl._src.weighting._cagrad import cagrad
from optax_mtl._src.weighting._config import ConfigState
from optax_mtl._src.weighting._config import config
from optax_mtl._src.weighting._constant import ConstantState
from optax_mtl._src.weighting._constant import constant
from optax_mtl._src.weighting._cosmos import CosmosState
from optax_mtl._src.weighting._cosmos import cosmos
from optax_mtl._src.weighting._db_mtl import DbMtlState
from optax_mtl._src.weighting._db_mtl import db_mtl
from optax_mtl._src.weighting._dualproj import DualprojState
from optax_mtl._src.weighting._dualproj import dualproj
from optax_mtl._src.weighting._dwa import DwaState
from optax_mtl._src.weighting._dwa import dwa
from optax_mtl._src.weighting._dwema import DwemaState
from optax_mtl._src.weighting._dwema import dwema
from optax_mtl._src.weighting._equal import EqualState
from optax_mtl._src.weighting._equal import equal
from optax_mtl._src.weighting._excess_mtl import ExcessMtlState
from optax_mtl._src.weighting._excess_mtl import excess_mtl
from optax_mtl._src.weighting._fairgrad import FairgradState
from optax_mtl._src.weighting._fairgrad import fairgrad
from optax_mtl._src.weighting._famo import FamoState
from optax_mtl._src.weighting._famo import famo
from optax_mtl._src.weighting._famo import famo_update_logits
from optax_mtl._src.weighting._geometric_mean import GeometricMeanState
from optax_mtl._src.weighting._geometric_mean import geometric_mean
from optax_mtl._src.weighting._graddrop import GraddropState
from optax_mtl._src.weighting._graddrop import graddrop
from optax_mtl._src.weighting._gradnorm import GradnormState
from optax_mtl._src.weighting._gradnorm import gradnorm
from optax_mtl._src.weighting._gradvac import GradvacState
from optax_mtl._src.weighting._gradvac import gradvac
from optax_mtl._src.weighting._imtl import ImtlState
from optax_mtl._src.weighting._imtl import imtl
from optax_mtl._src.weighting._imtl_g import ImtlGState
from optax_mtl._src.weighting._imtl_g import imtl_g
from optax_mtl._src.weighting._imtl_l import ImtlLState
from optax_mtl._src.weighting._imtl_l import imtl_l
from optax_mtl._src.weighting._initial_loss import InitialLossState
from optax_mtl._src.weighting._initial_loss import initial_loss
from optax_mtl._src.weighting._krum import KrumState
from optax_mtl._src.weighting._krum import krum
from optax_mtl._src.weighting._lbtw import LbtwState
from optax_mtl._src.weighting._lbtw import lbtw
from optax_mtl._src.weighting._log_loss import LogLossState
from optax_mtl._src.weighting._log_loss import log_loss
from optax_mtl._src.weighting._loss_ema import LossEmaState
from optax_mtl._src.weighting._loss_ema import loss_ema
from optax_mtl._src.weighting._mgda import MgdaState
from optax_mtl._src.weighting._mgda import mgda
from optax_mtl._src.weighting._moco import MocoState
from optax_mtl._src.weighting._moco import moco
from optax_mtl._src.weighting._modo import ModoState
from optax_mtl._src.weighting._modo import modo
from optax_mtl._src.weighting._nash_mtl import NashMtlState
from optax_mtl._src.weighting._nash_mtl import nash_mtl
from optax_mtl._src.weighting._normalized_gradients import NormalizedGradientsState
from optax_mtl._src.weighting._normalized_gradients import normalized_gradients
from optax_mtl._src.weighting._pbi import PbiState
from optax_mtl._src.weighting._pbi import pbi
from optax_mtl._src.weighting._pcd import PcdState
from optax_mtl._src.weighting._pcd import pcd
from optax_mtl._src.weighting._pcgrad import PcgradState
from optax_mtl._src.weighting._pcgrad import pcgrad
from optax_mtl._src.weighting._rema import RemaState
from optax_mtl._src.weighting._rema import rema
from optax_mtl._src.weighting._rlw import RlwState
from optax_mtl._src.weighting._rlw import rlw
from optax_mtl._src.weighting._sdmgrad import SdmgradState
from optax_mtl._src.weighting._sdmgrad import sdmgrad
from optax_mtl._src.weighting._stch import StchState
from optax_mtl._src.weighting._stch import stch
from optax_mtl._src.weighting._trimmed_mean import TrimmedMeanState
from optax_mtl._src.weighting._trimmed_mean import trimmed_mean
from optax_mtl._src.weighting._uncertainty import UncertaintyState
from optax_mtl._src.weighting._uncertainty import uncertainty
from optax_mtl._src.weighting._upgrad import UpgradState
from optax_mtl._src.weighting._upgrad import upgrad

__version__ = "0.2.0"


# The public names of optax_mtl 0.1 that were renamed: {old: (new, object)},
# served with a DeprecationWarning until 0.3 (docs/guides/api_rules.md).
_RENAMED = {
    "EmaState": ("LossEmaState", LossEmaState),
    "ema": ("loss_ema", loss_ema),
}
_renamed_getattr = _deprecation.module_getattr("optax_mtl", _RENAMED)


def __getattr__(name):
  # optax_mtl.nnx imports flax: loaded on first use, so that
  # `import optax_mtl` works without flax.
  if name == "nnx":
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module("optax_mtl.nnx")
  if name in _RENAMED:
    return _renamed_getattr(name)
  raise AttributeError(f"module 'optax_mtl' has no attribute {name!r}")

__all__ = (
    "AlignedMtlState",
    "CagradState",
    "ConfigState",
    "ConstantState",
    "CosmosState",
    "DbMtlState",
    "DualprojState",
    "DwaState",
    "DwemaState",
    "EqualState",
    "ExcessMtlState",
    "FairgradState",
    "FamoState",
    "GeometricMeanState",
    "GraddropState",
    "GradientRule",
    "GradnormState",
    "GradvacState",
    "ImtlGState",
    "ImtlLState",
    "ImtlState",
    "InitialLossState",
    "KrumState",
    "LbtwState",
    "LogLossState",
    "LossEmaState",
    "MgdaState",
    "MocoState",
    "ModoState",
    "MultiTaskStrategy",
    "NashMtlState",
    "Needs",
    "NormalizedGradientsState",
    "Outcome",
    "PbiState",
    "PcdState",
    "PcgradState",
    "RecomputeEveryState",
    "RemaState",
    "RlwState",
    "SdmgradState",
    "SmoothWeightsState",
    "SolverResult",
    "StchState",
    "TrimmedMeanState",
    "UncertaintyState",
    "UpgradState",
    "Weighting",
    "aligned_mtl",
    "as_gradient_transformation",
    "cagrad",
    "common_state_fields",
    "config",
    "constant",
    "cosine_matrix",
    "cosmos",
    "db_mtl",
    "diagnostics",
    "dualproj",
    "dwa",
    "dwema",
    "equal",
    "excess_mtl",
    "fairgrad",
    "famo",
    "famo_update_logits",
    "geometric_mean",
    "graddrop",
    "gradnorm",
    "gradvac",
    "gramian",
    "imtl",
    "imtl_g",
    "imtl_l",
    "initial_loss",
    "krum",
    "lbtw",
    "log_loss",
    "loss_ema",
    "masked_mean",
    "metrics",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "normalized_gradients",
    "pbi",
    "pcd",
    "pcgrad",
    "project_simplex",
    "recompute_every",
    "rema",
    "rlw",
    "sdmgrad",
    "smooth_weights",
    "solve_alpha_fair",
    "solve_cagrad",
    "solve_dual_cone_qp",
    "solve_min_norm",
    "solve_nash",
    "solve_priority_qp",
    "stch",
    "trimmed_mean",
    "uncertainty",
    "upgrad",
    "value_and_grad",
    "weighting_of",
    "with_shared_parameters",
)
