from . import closed_forms as closed_forms
from . import cp as cp
from . import matrix as matrix
from . import descent as descent
from . import htf as htf
from .verdict import Verdict as Verdict
from .verdict import worst as worst
from .verdict import relative_max as relative_max
