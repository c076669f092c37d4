from . import cp as cp
from . import matrix as matrix
from .verdict import Verdict as Verdict
from .verdict import worst as worst
