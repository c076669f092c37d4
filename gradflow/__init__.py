"""gradflow: exact gradient flow of factorized models, and the theory checked on it."""

import os as _os

import jax as _jax

if _os.environ.get("GRADFLOW_FLOAT32", "0") not in ("1", "true", "yes"):
    _jax.config.update("jax_enable_x64", True)

from . import analysis as analysis
from . import datasets as datasets
from . import observers as observers
from . import theorem2 as theorem2
from .data import random_cp_tensor as random_cp_tensor
from .data import sample_indices as sample_indices
from .descent import descent as descent
from .descent import DescentError as DescentError
from .descent import rms_normalized as rms_normalized
from .descent import RmsNormalizedState as RmsNormalizedState
from .flow import default_save_times as default_save_times
from .flow import default_solver as default_solver
from .flow import final_state as final_state
from .flow import FinalState as FinalState
from .flow import flow as flow
from .flow import FlowError as FlowError
from .flow import vector_field as vector_field
from .vector_field import rate_along_flow as rate_along_flow
from .models import AbstractAdditiveFactorization as AbstractAdditiveFactorization
from .models import AbstractFactorization as AbstractFactorization
from .models import CP as CP
from .models import DeepMatrix as DeepMatrix
from .models import HTF as HTF
from .models import ModeTree as ModeTree
from .objectives import AbstractLoss as AbstractLoss
from .objectives import AbstractObjective as AbstractObjective
from .objectives import Completion as Completion
from .objectives import HuberLoss as HuberLoss
from .objectives import Sensing as Sensing
from .objectives import SquaredLoss as SquaredLoss
from .solvers import RosenbrockW as RosenbrockW
from .stiffness import AbstractStiffness as AbstractStiffness
from .stiffness import DenseHessian as DenseHessian
from .stiffness import Explicit as Explicit
from .stiffness import LargestComponents as LargestComponents
from .sweep import sweep as sweep
from .sweep import SweepResult as SweepResult
from .trajectory import Trajectory as Trajectory

__version__ = "0.1.0"
