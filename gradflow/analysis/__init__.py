from . import cp as cp
from .verdict import Verdict as Verdict
from .verdict import worst as worst
