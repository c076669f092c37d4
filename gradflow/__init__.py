"""gradflow: exact gradient flow of factorized models, and the theory checked on it."""

import os as _os

import jax as _jax

if _os.environ.get("GRADFLOW_FLOAT32", "0") not in ("1", "true", "yes"):
    _jax.config.update("jax_enable_x64", True)

from . import analysis as analysis
from . import datasets as datasets
from . import observers as observers
from . import theorem2 as theorem2
from ._descent import descent as descent
from ._descent import DescentError as DescentError
from ._descent import matched_flow as matched_flow
from ._descent import rms_normalized as rms_normalized
from ._descent import RmsNormalizedState as RmsNormalizedState
from ._flow import default_save_times as default_save_times
from ._flow import final_state as final_state
from ._flow import FinalState as FinalState
from ._flow import flow as flow
from ._flow import FlowError as FlowError
from ._flow import AccuracyWarning as AccuracyWarning
from ._status import Status as Status
from ._sweep import sweep as sweep
from ._sweep import SweepResult as SweepResult
from ._vector_field import rate_along_flow as rate_along_flow
from ._vector_field import vector_field as vector_field
from .data import random_cp_tensor as random_cp_tensor
from .data import random_htf_tensor as random_htf_tensor
from .data import sample_indices as sample_indices
from .models import AbstractAdditiveFactorization as AbstractAdditiveFactorization
from .models import AbstractBlockFactorization as AbstractBlockFactorization
from .models import AbstractFactorization as AbstractFactorization
from .models import CP as CP
from .models import DeepMatrix as DeepMatrix
from .models import DiagonalNet as DiagonalNet
from .models import HTF as HTF
from .models import ModeTree as ModeTree
from .models import StackedCP as StackedCP
from .objectives import AbsoluteLoss as AbsoluteLoss
from .objectives import AbstractLoss as AbstractLoss
from .objectives import AbstractObjective as AbstractObjective
from .objectives import Completion as Completion
from .objectives import GroupedFits as GroupedFits
from .objectives import HuberLoss as HuberLoss
from .objectives import Sensing as Sensing
from .objectives import SquaredLoss as SquaredLoss
from .solvers import AutoStiff as AutoStiff
from .solvers import default_solver as default_solver
from .solvers import RosenbrockW as RosenbrockW
from .stiffness import AbstractStiffness as AbstractStiffness
from .stiffness import default_stiffness as default_stiffness
from .stiffness import DenseHessian as DenseHessian
from .stiffness import Explicit as Explicit
from .stiffness import GaussNewtonSubspace as GaussNewtonSubspace
from .stiffness import LargestComponents as LargestComponents
from .trajectory import Trajectory as Trajectory

__version__ = "0.1.0"
